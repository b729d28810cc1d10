"""Load test of `sapo-retriever` on loopback: many concurrent clients, valid and invalid requests.

    python benchmarks/server_load.py --clients 256 --requests 4000 --json load.json

Starts the real CLI (`python -m sapo_bench.server`) on a free port over the micro world's corpus
(generated into --world if it is missing), then `--clients` threads fire `--requests` requests
between them, all released at once by a barrier. Each request opens its own connection, as
Search-R1's `requests.post` clients do (no keep-alive), which is what fills a listen backlog.
A share (`--invalid`) is invalid in one of several ways, each of which must get its JSON 4xx.
At the end the server gets SIGTERM and must exit 0.

Reports requests and connection errors by kind, p50/p99 latency of the valid requests, and
queries/s (queries answered by valid requests / wall time of the whole burst). Exits 1 when any
connection failed, an invalid request got anything but its 4xx, a valid one anything but 200, or
the server did not exit 0. Client and server share the machine's cores: the numbers are the
whole loopback system's, not the server's alone.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (method, path, body maker(queries) -> bytes, expected status). Bodies break the server's
# default bounds (sapo_bench.server.LIMITS).
INVALID = {
    "bad_json": ("POST", "/retrieve", lambda qs: b'{"queries": [', 400),
    "not_a_list": ("POST", "/retrieve", lambda qs: json.dumps({"queries": qs[0]}).encode(), 400),
    "too_many_queries": ("POST", "/retrieve", lambda qs: json.dumps({"queries": ["q"] * 513}).encode(), 400),
    "topk_too_large": ("POST", "/retrieve", lambda qs: json.dumps({"queries": qs, "topk": 51}).encode(), 400),
    "query_too_long": ("POST", "/retrieve", lambda qs: json.dumps({"queries": ["x" * 2001]}).encode(), 400),
    "body_too_large": ("POST", "/retrieve", lambda qs: b" " * ((1 << 20) + 1), 413),
    "wrong_path": ("POST", "/search", lambda qs: json.dumps({"queries": qs}).encode(), 404),
    "wrong_method": ("GET", "/retrieve", lambda qs: None, 405),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(corpus: Path, port: int, extra: list[str], log: Path) -> subprocess.Popen:
    # Its log goes to a file: a pipe nobody reads fills up and stalls the server's logging.
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sapo_bench.server", "--corpus", str(corpus),
                                 "--port", str(port), *extra], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sapo-retriever exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("sapo-retriever did not answer /health within 120 s")


def one_request(port: int, kind: str, queries: list[str], timeout: float) -> tuple[str, float]:
    """(outcome, seconds): outcome is 'ok', a status mismatch, or the connection error's class."""
    if kind == "valid":
        method, path, body, want = "POST", "/retrieve", json.dumps(
            {"queries": queries, "topk": 3, "return_scores": True}).encode(), 200
    else:
        method, path, make, want = INVALID[kind]
        body = make(queries)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        elapsed = time.perf_counter() - t0
        reply = json.loads(data)
        if resp.status != want:
            return f"status {resp.status} (want {want})", elapsed
        if want == 200 and len(reply["result"]) != len(queries):
            return "short result", elapsed
        if want != 200 and not isinstance(reply.get("error"), str):
            return "4xx without a JSON error", elapsed
        return "ok", elapsed
    except (OSError, http.client.HTTPException) as e:
        return f"connection error: {type(e).__name__}", time.perf_counter() - t0
    except (ValueError, KeyError, TypeError):
        return "malformed reply", time.perf_counter() - t0
    finally:
        conn.close()


def run_load(port: int, questions: list[str], *, clients: int, requests: int, invalid: float,
             queries_per_request: int, timeout: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    kinds = sorted(INVALID)
    plan = []
    for i in range(requests):
        kind = kinds[i % len(kinds)] if rng.random() < invalid else "valid"
        plan.append((kind, rng.sample(questions, queries_per_request)))
    results: list[tuple[str, str, float] | None] = [None] * requests
    counter = iter(range(requests))
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client():
        barrier.wait()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            kind, qs = plan[i]
            outcome, secs = one_request(port, kind, qs, timeout)
            results[i] = (kind, outcome, secs)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    outcomes = Counter((k if k == "valid" else "invalid", o) for k, o, _ in results)
    valid_lat = sorted(s for k, o, s in results if k == "valid" and o == "ok")
    n_valid = sum(k == "valid" for k, _, _ in results)
    answered = sum(o == "ok" for k, o, _ in results if k == "valid")

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] * 1000 if xs else None

    return {
        "clients": clients, "requests": requests, "valid_requests": n_valid, "invalid_requests": requests - n_valid,
        "queries_per_request": queries_per_request, "wall_s": round(wall, 3),
        "connection_errors": sum(o.startswith("connection error") for _, o, _ in results),
        "wrong_answers": sum(o != "ok" and not o.startswith("connection error") for _, o, _ in results),
        "outcomes": {f"{k}: {o}": n for (k, o), n in sorted(outcomes.items())},
        "invalid_kinds": dict(sorted(Counter(k for k, _, _ in results if k != "valid").items())),
        "p50_ms": round(pct(valid_lat, 50), 1) if valid_lat else None,
        "p99_ms": round(pct(valid_lat, 99), 1) if valid_lat else None,
        "max_ms": round(valid_lat[-1] * 1000, 1) if valid_lat else None,
        "queries_per_s": round(answered * queries_per_request / wall, 1),
        "requests_per_s": round(requests / wall, 1),
    }


def load_questions(world: Path) -> list[str]:
    if not (world / "world.json").exists():
        from sapo_bench.world import WorldConfig, write_world

        write_world(world, WorldConfig(seed=0))
    rows = [json.loads(line) for line in (world / "nq" / "test.jsonl").read_text().splitlines()]
    return [r["question"] for r in rows]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--invalid", type=float, default=0.25, help="share of invalid requests")
    ap.add_argument("--queries", type=int, default=16, help="queries per valid request")
    ap.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, s")
    ap.add_argument("--world", type=Path, default=ROOT / ".cache" / "micro-world-seed0",
                    help="micro world whose corpus is served (written if missing)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra sapo-retriever argument, e.g. --server-arg=--workers=8 (repeatable)")
    ap.add_argument("--json", type=Path, help="write the report here too")
    ap.add_argument("--server-log", type=Path, default=Path(tempfile.gettempdir()) / "sapo-retriever-load.log")
    a = ap.parse_args(argv)
    if a.clients < 1 or a.requests < 1 or not 0 <= a.invalid <= 1:
        ap.error("--clients and --requests must be positive, --invalid within [0, 1]")

    questions = load_questions(a.world)
    port = free_port()
    # The server builds its index (cached beside the corpus) before it answers /health: untimed.
    server = start_server(a.world / "corpus.jsonl", port, a.server_arg, a.server_log)
    try:
        report = run_load(port, questions, clients=a.clients, requests=a.requests, invalid=a.invalid,
                          queries_per_request=a.queries, timeout=a.timeout)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            report_exit = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            report_exit = "did not exit within 60 s of SIGTERM"
    report["server_exit_after_sigterm"] = report_exit
    report["command"] = "python benchmarks/server_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(json.dumps(report, indent=2))
    if a.json:
        from sapo_bench.io import atomic_write_json

        atomic_write_json(a.json, report)
    if report["connection_errors"] or report["wrong_answers"] or report_exit != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
