"""The retrieval server over real HTTP on 127.0.0.1: Search-R1's contract, its bounds, bad requests,
bursts of clients and a graceful stop."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sapo_bench import server as srv
from sapo_bench.retrieval import BM25Retriever, HTTPRetriever, Retriever

DOCS = [
    ("d1", "Alden Varrow", "Alden Varrow is a painter born in Quillhaven in 1874."),
    ("d2", "Quillhaven", "Quillhaven is a harbour town and the capital of the Marrow Isles."),
    ("d3", "Brisk Lantern", "Brisk Lantern is a novel written by Ottoline Pesk."),
    ("d4", "Ottoline Pesk", "Ottoline Pesk is a novelist who works for the Tallow Press."),
    ("d5", "Tallow Press", "The Tallow Press is a publishing house founded in Vence."),
]
LIMITS = {"max_body_bytes": 2048, "max_queries": 4, "max_topk": 5, "max_query_chars": 100}
GOOD = {"queries": ["Who wrote Brisk Lantern?"], "topk": 2, "return_scores": True}


def serve(retriever, **limits):
    server = srv.make_server(retriever, "127.0.0.1", 0, **limits)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


def stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "contents": f"{t}\n{x}"}) + "\n" for i, t, x in DOCS))
    return BM25Retriever(path)


@pytest.fixture(scope="module")
def url(retriever):
    server, thread = serve(retriever, **LIMITS)
    assert server.server_address[0] == "127.0.0.1"
    yield server.url
    stop(server, thread)


def call(url, path="/retrieve", body=None, method="POST"):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        assert e.headers["Content-Type"] == "application/json"
        return e.code, json.loads(e.read())


def test_retrieve_with_scores_matches_search_r1s_contract(url, retriever):
    status, reply = call(url, body={"queries": ["Who wrote Brisk Lantern?", "Tallow Press"],
                                    "topk": 2, "return_scores": True})
    assert status == 200 and list(reply) == ["result"] and len(reply["result"]) == 2
    for hits, expected in zip(reply["result"], retriever.search(["Who wrote Brisk Lantern?", "Tallow Press"], 2)):
        assert hits == [{"document": {"id": p.id, "contents": p.contents}, "score": p.score} for p in expected]
    assert reply["result"][0][0]["document"] == {"id": "d3", "contents": "Brisk Lantern\n" + DOCS[2][2]}
    assert isinstance(reply["result"][0][0]["score"], float)


def test_without_scores_each_hit_is_the_document(url):
    for body in ({"queries": ["Tallow Press"], "topk": 1, "return_scores": False}, {"queries": ["Tallow Press"]}):
        status, reply = call(url, body=body)
        assert status == 200
        assert reply["result"][0][0] == {"id": "d5", "contents": "Tallow Press\n" + DOCS[4][2]}
    status, reply = call(url, body={"queries": ["Quillhaven Tallow Press"]})  # matches 4 passages
    assert status == 200 and len(reply["result"][0]) == srv.DEFAULT_TOPK  # topk omitted: the default
    assert call(url, body={"queries": []}) == (200, {"result": []})


def test_health(url):
    assert call(url, "/health", method="GET") == (200, {"status": "ok", "passages": len(DOCS), "method": "bm25"})


def test_http_retriever_returns_what_the_in_process_retriever_does(url, retriever):
    queries = ["Where was Alden Varrow born?", "capital of the Marrow Isles", "publishing house", "qwxz"]
    assert HTTPRetriever(url, timeout=5).search(queries, k=3) == retriever.search(queries, k=3)
    assert HTTPRetriever(url.rstrip("/")).url == url + "/retrieve"


@pytest.mark.parametrize("path, method, body, status, says", [
    ("/retrieve", "POST", b'{"queries": ["x"], ' + b" " * 2100 + b"}", 413, "max_body_bytes=2048"),
    ("/retrieve", "POST", {"queries": ["a", "b", "c", "d", "e"]}, 400, "max_queries=4"),
    ("/retrieve", "POST", {"queries": ["a"], "topk": 6}, 400, "max_topk=5"),
    ("/retrieve", "POST", {"queries": ["ok", "q" * 101]}, 400, "max_query_chars=100"),
    ("/retrieve", "POST", b'{"queries": ["a"', 400, "invalid JSON"),
    ("/retrieve", "POST", b"\xff\xfe", 400, "invalid JSON"),
    ("/retrieve", "POST", {"question": "a"}, 400, 'missing "queries"'),
    ("/retrieve", "POST", ["a"], 400, "JSON object"),
    ("/retrieve", "POST", {"queries": "a"}, 400, "list of strings"),
    ("/retrieve", "POST", {"queries": ["a", 3]}, 400, '"queries"[1] must be a string'),
    ("/retrieve", "POST", {"queries": ["a"], "topk": 0}, 400, "positive integer"),
    ("/retrieve", "POST", {"queries": ["a"], "topk": "3"}, 400, "positive integer"),
    ("/retrieve", "POST", {"queries": ["a"], "return_scores": "yes"}, 400, "true or false"),
    ("/retrieve", "GET", None, 405, "accepts POST"),
    ("/retrieve", "PUT", {"queries": ["a"]}, 405, "accepts POST"),
    ("/health", "POST", {}, 405, "accepts GET"),
    ("/search", "POST", GOOD, 404, "no such path"),
    ("/", "GET", None, 404, "no such path"),
])
def test_bad_requests_get_a_json_4xx_and_the_server_lives_on(url, path, method, body, status, says):
    code, reply = call(url, path, body, method)
    assert code == status and says in reply["error"], reply
    code, reply = call(url, body=GOOD)
    assert code == 200 and reply["result"][0][0]["document"]["id"] == "d3"


def raw(url, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)  # a client that has said all it will say
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_malformed_http_gets_json_errors_too(url):
    reply = raw(url, b"POST /retrieve HTTP/1.0\r\nContent-Type: application/json\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 411") and b'"error": "Content-Length header required"' in reply
    reply = raw(url, b"POST /retrieve HTTP/1.0\r\nContent-Length: many\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 400") and b"bad Content-Length" in reply
    reply = raw(url, b"POST /retrieve HTTP/1.0\r\nContent-Length: 100\r\n\r\n" + b'{"queries": []}')
    assert reply.startswith(b"HTTP/1.0 400") and b"body ended after 15 of 100 bytes" in reply
    reply = raw(url, b"GET /a b HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 400") and b'{"error": "Bad request syntax' in reply
    # No version on the request line is HTTP/0.9, whose responses are a bare body.
    assert json.loads(raw(url, b"garbage\r\n\r\n")) == {"error": "Bad request syntax ('garbage')"}
    assert call(url, body=GOOD)[0] == 200


def test_an_internal_failure_is_a_500_and_not_a_dead_server():
    class Broken(Retriever):
        method = "broken"

        def search(self, queries, k=3):
            if queries == ["boom"]:
                raise KeyError("index corrupted")
            return [[] for _ in queries]

    server, thread = serve(Broken())
    try:
        assert call(server.url, body={"queries": ["boom"]}) == (500, {"error": "internal error: KeyError: 'index corrupted'"})
        assert call(server.url, body={"queries": ["fine"]}) == (200, {"result": [[]]})
        assert call(server.url, "/health", method="GET") == (200, {"status": "ok", "passages": 0, "method": "broken"})
    finally:
        stop(server, thread)


def test_make_server_rejects_unknown_limits(retriever):
    with pytest.raises(ValueError, match="unknown limits.*valid"):
        srv.make_server(retriever, "127.0.0.1", 0, max_bytes=10)
    assert srv.LIMITS == {"max_body_bytes": 1 << 20, "max_queries": 512, "max_topk": 50, "max_query_chars": 2000}


def test_make_server_rejects_nonpositive_workers_or_backlog(retriever):
    for bad in ({"workers": 0}, {"backlog": 0}):
        with pytest.raises(ValueError, match="workers and backlog must be positive"):
            srv.make_server(retriever, "127.0.0.1", 0, **bad)


def request_bytes(body: dict, cut: int | None = None) -> bytes:
    data = json.dumps(body).encode()
    head = f"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode() + (data if cut is None else data[:cut])


def read_reply(sock) -> tuple[int, dict]:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_burst_waits_in_the_backlog_while_every_worker_is_busy(retriever):
    # One worker, held by a client that has sent half its body: 64 more clients connect and send
    # their requests meanwhile. They wait in the listen backlog (socketserver's default of 5 drops
    # them) and each gets its answer once the worker is free.
    server, thread = serve(retriever, workers=1)
    host, port = server.server_address[:2]
    try:
        slow = socket.create_connection((host, port), timeout=10)
        full = request_bytes(GOOD)
        slow.sendall(full[:-5])
        burst = []
        for _ in range(64):
            s = socket.create_connection((host, port), timeout=10)
            s.sendall(request_bytes(GOOD))
            burst.append(s)
        slow.sendall(full[-5:])
        for s in [slow, *burst]:
            with s:
                status, reply = read_reply(s)
                assert status == 200 and reply["result"][0][0]["document"]["id"] == "d3"
    finally:
        stop(server, thread)


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "contents": f"{t}\n{x}"}) + "\n" for i, t, x in DOCS))
    return path


def start_cli(corpus, *args) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sapo_bench.server", "--corpus", str(corpus), "--port",
                             str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if call(f"http://127.0.0.1:{port}", "/health", method="GET")[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("sapo-retriever never answered /health")


def test_sigterm_answers_the_requests_already_sent_then_exits_0(corpus_file):
    proc, port = start_cli(corpus_file, "--workers", "1")
    try:
        # In flight: half a body sent, the rest only after the signal. Waiting: five complete
        # requests behind it (one worker), in the listen backlog when the signal comes.
        inflight = socket.create_connection(("127.0.0.1", port), timeout=10)
        full = request_bytes(GOOD)
        inflight.sendall(full[:-5])
        time.sleep(0.2)
        waiting = []
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(request_bytes({"queries": ["Tallow Press"], "topk": 1}))
            waiting.append(s)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # still answering what was sent
        inflight.sendall(full[-5:])
        with inflight:
            status, reply = read_reply(inflight)
        assert status == 200 and reply["result"][0][0]["document"]["id"] == "d3"
        for s in waiting:
            with s:
                status, reply = read_reply(s)
            assert status == 200 and reply["result"][0][0]["id"] == "d5"
        assert proc.wait(timeout=20) == 0
        log = proc.stdout.read()
        assert "SIGTERM: stopping; answering every request already sent" in log and "every request answered; exiting" in log
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_256_clients_mixed_valid_and_invalid_no_connection_error(micro_world, tmp_path):
    """The load test of the README's numbers (benchmarks/server_load.py), at its smallest bound."""
    out = tmp_path / "load.json"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "benchmarks/server_load.py", "--clients", "256", "--requests", "2000",
                           "--invalid", "0.25", "--world", str(micro_world), "--json", str(out),
                           "--server-log", str(tmp_path / "server.log")],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["clients"] == 256 and rep["requests"] == 2000 and rep["connection_errors"] == 0
    assert rep["invalid_requests"] > 400 and set(rep["invalid_kinds"]) == set(
        ["bad_json", "not_a_list", "too_many_queries", "topk_too_large", "query_too_long", "body_too_large",
         "wrong_path", "wrong_method"])
    assert rep["outcomes"] == {"invalid: ok": rep["invalid_requests"], "valid: ok": rep["valid_requests"]}
    assert rep["server_exit_after_sigterm"] == 0 and rep["p99_ms"] >= rep["p50_ms"] > 0
