"""`sapo-retriever`: Search-R1's retrieval HTTP contract over a local corpus, standard library only.

    POST /retrieve {"queries": [str, ...], "topk": 3, "return_scores": true}
      -> 200 {"result": [[{"document": {"id", "contents"}, "score": float}, ...], ...]}
         (with "return_scores": false, Search-R1's default, each hit is the bare document)
    GET /health -> 200 {"status": "ok", "passages": N, "method": "bm25" | "dense"}

Every error is a JSON `{"error": "..."}`: 413 for a body over the byte limit, 400 for a request
breaking another bound or the schema, 411 without a Content-Length, 404/405 for a wrong
path/method, 500 for an internal failure. A bad request never takes the server down.

Under load: the kernel holds up to `backlog` connections that the server has not accepted yet, and
at most `workers` are served at once; a burst of clients waits its turn instead of being reset.
SIGTERM or SIGINT: stop accepting, answer every request already sent (in flight or waiting in the
backlog), then exit 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from sapo_bench.retrieval import Retriever, build_retriever

log = logging.getLogger(__name__)

DEFAULT_TOPK = 3
MAX_BODY_BYTES = 1 << 20
MAX_QUERIES = 512
MAX_TOPK = 50
MAX_QUERY_CHARS = 2000
DRAIN_BYTES = 64 << 20
# socketserver listens with a backlog of 5: 64 clients connecting at once got connection resets.
# Linux caps it at net.core.somaxconn (4096 on current kernels).
BACKLOG = 1024
# Searches run one at a time (search_lock), so more threads add no throughput, only memory and
# lock contention; enough to overlap reading and writing many clients' requests.
WORKERS = 32
STOP_GRACE_S = 30.0  # how long a stop waits for the requests in flight (the handler's own timeout)
LIMITS = {"max_body_bytes": MAX_BODY_BYTES, "max_queries": MAX_QUERIES,
          "max_topk": MAX_TOPK, "max_query_chars": MAX_QUERY_CHARS}


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RetrievalServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, retriever: Retriever, *, default_topk: int = DEFAULT_TOPK,
                 workers: int = WORKERS, backlog: int = BACKLOG, **limits):
        unknown = set(limits) - set(LIMITS)
        if unknown:
            raise ValueError(f"unknown limits {sorted(unknown)}; valid: {sorted(LIMITS)}")
        if workers < 1 or backlog < 1:
            raise ValueError(f"workers and backlog must be positive, got workers={workers}, backlog={backlog}")
        self.request_queue_size = backlog  # read by listen() in server_activate, below
        self.workers = workers
        self._active = 0  # requests being served; at most `workers`
        self._busy = threading.Condition()
        self.retriever = retriever
        self.default_topk = default_topk
        self.limits = {**LIMITS, **limits}
        # One search at a time: batching happens inside a request, and neither a torch model
        # nor a faiss index promises anything about concurrent callers.
        self.search_lock = threading.Lock()
        super().__init__(address, RetrievalHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request, client_address):
        # Blocks the accept loop while every worker is busy: later connections wait in the
        # listen backlog, in order, rather than each getting a thread of its own.
        with self._busy:
            self._busy.wait_for(lambda: self._active < self.workers)
            self._active += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._finished()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._finished()

    def _finished(self) -> None:
        with self._busy:
            self._active -= 1
            self._busy.notify_all()

    def stop(self, grace_s: float = STOP_GRACE_S) -> int:
        """After `shutdown()`: serve the connections still in the listen backlog (their clients
        have sent their requests), close the socket, and wait up to `grace_s` for every request
        in flight. Returns how many were still running at the deadline."""
        self.socket.setblocking(False)
        while True:
            try:
                request, client_address = self.get_request()
            except OSError:  # BlockingIOError: the backlog is empty
                break
            request.setblocking(True)
            self.process_request(request, client_address)
        # What TCPServer.server_close does. Not ThreadingMixIn's: it joins without a deadline, and
        # only non-daemon threads, which would hold the process up at exit.
        self.socket.close()
        with self._busy:
            self._busy.wait_for(lambda: self._active == 0, timeout=grace_s)
            return self._active


def make_server(retriever: Retriever, host: str = "127.0.0.1", port: int = 8000,
                **options) -> RetrievalServer:
    """A bound, not yet serving server; run `serve_forever()` (e.g. in a thread), then
    `shutdown()` and `server_close()`. Port 0 picks a free port (see `server.url`).
    Options: default_topk, workers, backlog and the LIMITS."""
    return RetrievalServer((host, port), retriever, **options)


def serve_until_signalled(server: RetrievalServer, grace_s: float = STOP_GRACE_S) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully (`RetrievalServer.stop`). A second
    signal kills the process at once. Call from the main thread."""
    stopping = threading.Event()
    received = []

    def on_signal(signum, frame):
        received.append(signal.Signals(signum).name)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)
        stopping.set()

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    accept = threading.Thread(target=server.serve_forever, name="accept", daemon=True)
    accept.start()
    stopping.wait()
    log.info("%s: stopping; answering every request already sent", received[0])
    server.shutdown()
    accept.join()
    left = server.stop(grace_s)
    if left:
        log.warning("%d requests still running %.0f s after %s (stalled clients); exiting anyway",
                    left, grace_s, received[0])
    else:
        log.info("every request answered; exiting")


def parse_request(body: bytes, limits: dict, default_topk: int) -> tuple[list[str], int, bool]:
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"invalid JSON body: {e}") from None
    if not isinstance(req, dict):
        raise RequestError(400, 'body must be a JSON object {"queries": [...], "topk": 3, "return_scores": true}')
    if "queries" not in req:
        raise RequestError(400, 'missing "queries" (a list of strings)')
    queries = req["queries"]
    if not isinstance(queries, list):
        raise RequestError(400, f'"queries" must be a list of strings, got {type(queries).__name__}')
    if len(queries) > limits["max_queries"]:
        raise RequestError(400, f"{len(queries)} queries exceed max_queries={limits['max_queries']}")
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise RequestError(400, f'"queries"[{i}] must be a string, got {type(q).__name__}')
        if len(q) > limits["max_query_chars"]:
            raise RequestError(400, f'"queries"[{i}] has {len(q)} characters, over '
                                    f"max_query_chars={limits['max_query_chars']}")
    topk = req.get("topk")
    if topk is None:
        topk = default_topk
    elif isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise RequestError(400, f'"topk" must be a positive integer, got {topk!r}')
    elif topk > limits["max_topk"]:
        raise RequestError(400, f"topk={topk} exceeds max_topk={limits['max_topk']}")
    return_scores = req.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise RequestError(400, f'"return_scores" must be true or false, got {return_scores!r}')
    return queries, topk, return_scores


class RetrievalHandler(BaseHTTPRequestHandler):
    server: RetrievalServer
    server_version = "sapo-retriever"
    timeout = 30  # seconds a client may stall mid-request before its thread gives up

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        routes = {"/retrieve": ("POST", self._retrieve), "/health": ("GET", self._health)}
        try:
            path = urlsplit(self.path).path
            if path not in routes:
                raise RequestError(404, f"no such path {path!r}; try POST /retrieve or GET /health")
            allowed, handler = routes[path]
            if method != allowed:
                self.close_connection = True  # any request body stays unread
                raise RequestError(405, f"{path} accepts {allowed}, not {method}")
            status, reply = 200, handler()
        except RequestError as e:
            status, reply = e.status, {"error": str(e)}
        except (ConnectionError, TimeoutError) as e:
            # The client stalled or hung up mid-request: there is nobody to answer.
            self.close_connection = True
            log.info("%s %s: client gone (%s)", method, self.path, e)
            return
        except Exception as e:
            log.error("internal error on %s %s:\n%s", method, self.path, traceback.format_exc())
            status, reply = 500, {"error": f"internal error: {type(e).__name__}: {e}"}
        try:
            self._send(status, reply)
        except OSError as e:
            self.close_connection = True
            log.info("%s %s: client gone before its answer (%s)", method, self.path, e)

    def _health(self) -> dict:
        return {"status": "ok", "passages": len(getattr(self.server.retriever, "passages", ())),
                "method": self.server.retriever.method}

    def _retrieve(self) -> dict:
        limits = self.server.limits
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError(411, "Content-Length header required")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {length!r}") from None
        if n > limits["max_body_bytes"]:
            self._discard(n)
            raise RequestError(413, f"body of {n} bytes exceeds max_body_bytes={limits['max_body_bytes']}")
        body = self.rfile.read(n)
        if len(body) < n:
            self.close_connection = True
            raise RequestError(400, f"body ended after {len(body)} of {n} bytes")
        queries, topk, return_scores = parse_request(body, limits, self.server.default_topk)
        with self.server.search_lock:
            hits = self.server.retriever.search(queries, k=topk) if queries else []
        docs = [[({"document": {"id": p.id, "contents": p.contents}, "score": p.score}
                  if return_scores else {"id": p.id, "contents": p.contents}) for p in q]
                for q in hits]
        return {"result": docs}

    def _discard(self, n: int) -> None:
        """Read and drop an oversized body: a client still sending it would otherwise see a
        connection reset instead of the 413. Past DRAIN_BYTES it is not worth it; just close."""
        self.close_connection = True
        if n > DRAIN_BYTES:
            return
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                break
            n -= len(chunk)

    def _send(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            self.send_header("Allow", "POST" if urlsplit(self.path).path == "/retrieve" else "GET")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        # The base class answers malformed request lines and unknown verbs with HTML; keep JSON.
        self.close_connection = True
        try:
            self._send(code, {"error": message or HTTPStatus(code).phrase})
        except Exception:
            pass

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="sapo-retriever", description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", required=True, help="JSONL corpus, one {id, contents} per line")
    ap.add_argument("--method", choices=("bm25", "dense"), default="bm25")
    ap.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default="intfloat/e5-base-v2", help="dense: hub id or local directory")
    ap.add_argument("--device", default=None, help="dense: torch device (default: cuda if available)")
    ap.add_argument("--cache-dir", default=None, help="index cache (default: <corpus dir>/.index)")
    ap.add_argument("--topk", type=int, default=DEFAULT_TOPK, help="when a request gives none")
    ap.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    ap.add_argument("--max-queries", type=int, default=MAX_QUERIES)
    ap.add_argument("--max-topk", type=int, default=MAX_TOPK)
    ap.add_argument("--max-query-chars", type=int, default=MAX_QUERY_CHARS)
    ap.add_argument("--workers", type=int, default=WORKERS, help="requests served at once")
    ap.add_argument("--backlog", type=int, default=BACKLOG,
                    help="connections the kernel queues before the server accepts them")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    kwargs = {"corpus_path": args.corpus, "cache_dir": args.cache_dir}
    if args.method == "dense":
        kwargs.update(model=args.model, device=args.device)
    try:
        retriever = build_retriever(args.method, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        sys.exit(f"sapo-retriever: {e}")
    try:
        server = make_server(retriever, args.host, args.port, default_topk=args.topk, workers=args.workers,
                             backlog=args.backlog, max_body_bytes=args.max_body_bytes,
                             max_queries=args.max_queries, max_topk=args.max_topk,
                             max_query_chars=args.max_query_chars)
    except (OSError, ValueError) as e:
        sys.exit(f"sapo-retriever: cannot serve on {args.host}:{args.port}: {e}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this interface can query the corpus", args.host)
    log.info("%s retriever over %d passages of %s at %s/retrieve (%d workers, backlog %d)", args.method,
             len(retriever.passages), args.corpus, server.url, server.workers, server.request_queue_size)
    serve_until_signalled(server)


if __name__ == "__main__":
    main()
