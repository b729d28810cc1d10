"""Run a command while `sapo-retriever` serves an experiment's corpus on loopback (`make reproduce-real`).

    python -m sapo_bench.withserver micro_real -- sapo-sweep micro_real
    python -m sapo_bench.withserver micro_real train.max_steps=2 -- sh -c 'sapo-sweep ... && sapo-report ...'

The experiment (with any overrides) must use `retriever=http` at a loopback URL: the server is
started there over the experiment's corpus (the micro world is generated first if it is missing),
the command runs once `GET /health` answers, and the server is stopped when the command ends —
also when it fails, and when this process gets SIGINT or SIGTERM (which it passes on to the
command first, so that a sweep stops its runs and keeps their checkpoints; the same command then
resumes). The exit status is the command's (128 + signal when stopped by one). The server's log
is `<out_root>/retriever.log`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")
READY_TIMEOUT_S = 300.0   # a first start builds the BM25 index (seconds at micro scale) or a dense one
STOP_GRACE_S = 30.0       # the server's own drain time (server.STOP_GRACE_S)


def server_args(cfg) -> tuple[list[str], str]:
    """The sapo-retriever command line for an experiment's config, and its health URL."""
    r = cfg.retriever
    if r.method != "http":
        raise SystemExit(f"withserver: the experiment's retriever is {r.method!r}, not http: there is no server to "
                         "start (set retriever=http)")
    url = urlsplit(str(r.url))
    if url.hostname not in LOOPBACK or url.port is None:
        raise SystemExit(f"withserver: retriever.url {r.url!r} is not a loopback URL with a port "
                         f"(http://127.0.0.1:PORT/retrieve): a server elsewhere is not this command's to start")
    args = [sys.executable, "-m", "sapo_bench.server", "--corpus", str(cfg.data.corpus), "--host", url.hostname,
            # BM25: on this CPU a dense index would share the two cores with the policy (README).
            "--port", str(url.port), "--method", "bm25"]
    return args, f"http://{url.hostname}:{url.port}/health"


def wait_ready(proc: subprocess.Popen, health: str, log_path: Path, timeout: float = READY_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise SystemExit(f"withserver: sapo-retriever exited with {proc.returncode} before it served "
                             f"(port in use? see {log_path}):\n{tail}")
        try:
            with urllib.request.urlopen(health, timeout=2) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise SystemExit(f"withserver: sapo-retriever did not answer {health} within {timeout:.0f} s (see {log_path})")


def stop(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    if proc.poll() is None:
        proc.terminate()  # the server drains the requests it has, then exits 0
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: python -m sapo_bench.withserver EXPERIMENT [OVERRIDE ...] -- COMMAND [ARG ...]")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m sapo_bench.withserver", description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("overrides", nargs="*")
    a = parser.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if not command:
        raise SystemExit("withserver: no command after --")
    from sapo_bench.runtime import prepare_data
    from sapo_bench.sweep import check_experiment, compose_config

    check_experiment(a.experiment)
    cfg = compose_config([f"experiment={a.experiment}", *a.overrides])
    args, health = server_args(cfg)
    prepare_data(cfg)  # the corpus the server reads
    log_path = Path(cfg.out_root) / "retriever.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stopping: list[int] = []
    child: list[subprocess.Popen] = []

    def on_signal(signum, frame):
        stopping.append(signum)
        if child and child[0].poll() is None:
            # The command's whole process group, not only its first process: `sh -c '...'` does
            # not pass a signal on to the sweep it waits for. It stops first (a sweep keeps its
            # checkpoints), then the server.
            try:
                os.killpg(child[0].pid, signum)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    with open(log_path, "ab") as log:
        # Its own session: a Ctrl-C at the terminal reaches it only through this process, after the command.
        server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            info = wait_ready(server, health, log_path)
            print(f"withserver: sapo-retriever ({info.get('method')}, {info.get('passages')} passages) at "
                  f"{health.rsplit('/', 1)[0]}, pid {server.pid}", flush=True)
            if stopping:
                return 128 + stopping[0]
            # A process group of its own, which on_signal signals as a whole (a Ctrl-C at the
            # terminal reaches this process, which passes it on).
            child.append(subprocess.Popen(command, start_new_session=True))
            while True:
                try:
                    rc = child[0].wait()
                    break
                except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                    continue
        finally:
            stop(server)
            for s, h in old.items():
                signal.signal(s, h)
            print(f"withserver: sapo-retriever stopped (exit {server.returncode})", flush=True)
    return 128 + stopping[0] if stopping and rc != 0 else rc


if __name__ == "__main__":
    sys.exit(main())
