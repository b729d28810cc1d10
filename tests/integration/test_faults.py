"""Fault injection on tiny real runs: crashes around checkpoints, damaged checkpoints, a retrieval
server that dies mid-run, a full disk, and SIGTERM to a sweep. Each time: a clear stop, nothing
half-written, and the next attempt resumes."""

import errno
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from sapo_bench import io, rollout, train as train_mod
from sapo_bench.checkpoints import LAST, PREVIOUS, CheckpointError, checkpoint_problem
from sapo_bench.runtime import RetryingRetriever
from sapo_bench.sweep import expand
from sapo_bench.train import train

from test_training import CONF, lines, tiny_overrides


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One small world for the module: its warm start is built by the first run and reused."""
    return tmp_path_factory.mktemp("faults") / "world"


def cfg_for(tmp, world, *extra, steps=3):
    over = [o if not o.startswith("data.root=") else f"data.root={world}" for o in tiny_overrides(tmp, steps=steps)]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=over + ["eval.val_every=100", *extra])


def train_steps(run_dir):
    return [m["train/step"] for m in lines(run_dir) if "train/reward_mean" in m]


class Crash(Exception):
    pass


def crash_after_save(monkeypatch, n, then=None):
    """The n-th checkpoint is published, then the run dies (or `then()` runs): a kill between steps."""
    real, count = train_mod.publish, []

    def publish(tmp, path):
        real(tmp, path)
        count.append(path)
        if len(count) == n:
            if then is None:
                raise Crash(f"killed after checkpoint {n}")
            then()

    monkeypatch.setattr(train_mod, "publish", publish)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def crash_run(cfg, monkeypatch, n):
    """Train until the n-th checkpoint is published, then die."""
    with monkeypatch.context() as m:
        crash_after_save(m, n)
        with pytest.raises(Crash):
            train(cfg)


def zero_fill(path):
    path.write_bytes(bytes(path.stat().st_size))


@pytest.mark.parametrize("damage", [truncate, zero_fill])
def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one(tmp_path, world, monkeypatch, caplog, damage):
    cfg = cfg_for(tmp_path, world)
    run = Path(cfg.run_dir)
    crash_run(cfg, monkeypatch, 2)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [LAST, PREVIOUS] and train_steps(run) == [1.0, 2.0]
    damage(ckpts / LAST)  # what a kill during a non-atomic save, or a bad disk, leaves
    with caplog.at_level(logging.INFO, logger="sapo_bench"):
        result = train(cfg)
    assert f"checkpoint {ckpts / LAST} is unusable (it is truncated or corrupt" in caplog.text
    assert f"resuming {run} from {ckpts / PREVIOUS}" in caplog.text
    assert result["run"]["steps"] == 3 and train_steps(run) == [1.0, 2.0, 3.0]  # step 2 replayed once
    assert (run / "result.json").exists() and not (run / "error.json").exists()
    assert (ckpts / "last.ckpt.bad").exists() and checkpoint_problem(ckpts / LAST) is None


def test_an_unfinished_run_of_another_configuration_is_not_resumed(tmp_path, world, monkeypatch):
    from sapo_bench.runtime import RunConflict

    cfg = cfg_for(tmp_path, world)
    run = Path(cfg.run_dir)
    crash_run(cfg, monkeypatch, 1)
    # The same folder (model, algorithm, setting, seed), another setting that the folder's name
    # does not hold: it must not carry on from the first run's weights.
    other = cfg_for(tmp_path, world, "train.lr=1e-4")
    assert Path(other.run_dir) == run
    with pytest.raises(RunConflict, match="unfinished run of another configuration"):
        train(other)
    assert (run / "checkpoints" / LAST).exists() and train_steps(run) == [1.0]  # nothing lost
    assert train(cfg)["run"]["steps"] == 3  # its own configuration resumes it


def test_no_usable_checkpoint_is_a_clear_error_and_moving_it_away_restarts(tmp_path, world, monkeypatch):
    cfg = cfg_for(tmp_path, world, steps=2)
    run = Path(cfg.run_dir)
    crash_run(cfg, monkeypatch, 1)
    ckpts = run / "checkpoints"
    truncate(ckpts / LAST)
    with pytest.raises(CheckpointError) as e:
        train(cfg)
    for says in (f"{ckpts / LAST}: it is truncated or corrupt", f"mv {ckpts} {ckpts}.broken", "restart the run"):
        assert says in str(e.value)
    assert json.loads((run / "error.json").read_text())["error"].startswith("CheckpointError: cannot resume")
    assert (ckpts / LAST).exists()  # left for the user to decide
    shutil.move(ckpts, f"{ckpts}.broken")  # the advice, followed
    assert train(cfg)["run"]["steps"] == 2 and train_steps(run) == [1.0, 2.0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(corpus, port):
    proc = subprocess.Popen([sys.executable, "-m", "sapo_bench.server", "--corpus", str(corpus), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            assert proc.poll() is None, "sapo-retriever exited"
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("sapo-retriever did not start")


def always_search(monkeypatch):
    """A policy whose every turn that is not an answer is a search: the tiny warm start rarely
    searches on its own, and this test needs the retriever called after the server dies."""
    real = rollout.parse_action

    def parse(text):
        action, content = real(text)
        return (action, content) if action == "answer" else ("search", content.strip() or text.strip() or "who")

    monkeypatch.setattr(rollout, "parse_action", parse)


def test_the_retrieval_server_dies_mid_run_the_run_stops_clearly_and_resumes_once_it_is_back(
        tmp_path, world, monkeypatch):
    port = free_port()
    cfg = cfg_for(tmp_path, world, "retriever=http", f"retriever.url=http://127.0.0.1:{port}/retrieve",
                  "retriever.retries=1", "+retriever.backoff=0.01")
    run = Path(cfg.run_dir)
    train_mod.prepare_data(cfg)  # the world, for the server's corpus
    server = start_server(cfg.data.corpus, port)
    monkeypatch.setattr(train_mod, "RetryingRetriever", functools.partial(RetryingRetriever, wait=0.01))
    always_search(monkeypatch)
    try:
        with monkeypatch.context() as m:
            crash_after_save(m, 1, then=lambda: (server.kill(), server.wait()))
            with pytest.raises(RuntimeError) as e:
                train(cfg)
        msg = str(e.value)
        assert "retriever failed 3 times, stopping the run (the last checkpoint is kept)" in msg
        assert f"retriever at http://127.0.0.1:{port}/retrieve unavailable after 2 attempts" in msg
        assert "Connection refused" in msg
        assert json.loads((run / "error.json").read_text())["error"].startswith("RuntimeError: retriever failed")
        assert checkpoint_problem(run / "checkpoints" / LAST) is None and not (run / "result.json").exists()
        assert train_steps(run) == [1.0]
        server = start_server(cfg.data.corpus, port)  # back, on the same address
        result = train(cfg)
        assert result["run"]["steps"] == 3 and train_steps(run) == [1.0, 2.0, 3.0]
        assert not (run / "error.json").exists()
        assert all(m["rollout/searches_mean"] > 0 for m in lines(run) if "train/reward_mean" in m)
    finally:
        server.kill()
        server.wait()


def test_a_full_disk_leaves_no_partial_metrics_line_or_result_and_the_rerun_resumes(tmp_path, world, monkeypatch):
    cfg = cfg_for(tmp_path, world, steps=2)
    run = Path(cfg.run_dir)
    metrics, real_write = run / "metrics.jsonl", os.write

    def full_after_first_line(fd, data):
        # metrics.jsonl's first line goes in; the next gets half of its bytes, then ENOSPC.
        if os.readlink(f"/proc/self/fd/{fd}") == str(metrics) and os.fstat(fd).st_size > 0:
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    with monkeypatch.context() as m:
        m.setattr(io.os, "write", full_after_first_line)
        with pytest.raises(OSError, match="No space left on device"):
            train(cfg)
    text = metrics.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 1 and json.loads(text)["train/step"] == 1.0
    assert "No space left on device" in json.loads((run / "error.json").read_text())["error"]

    real_fdopen = os.fdopen

    def result_disk_full(fd, *args, **kwargs):  # the result's temporary file fills the disk
        f = real_fdopen(fd, *args, **kwargs)
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".result.json."):
            f.write('{"run": {"steps": ')
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f

    with monkeypatch.context() as m:
        m.setattr(io.os, "fdopen", result_disk_full)
        with pytest.raises(OSError, match="No space left on device"):
            train(cfg)
    assert not (run / "result.json").exists() and not list(run.glob(".result.json.*"))
    assert train_steps(run) == [1.0, 2.0]

    result = train(cfg)  # space again: resumes from the step-2 checkpoint, tests, writes the result
    assert json.loads((run / "result.json").read_text()) == json.loads(json.dumps(result))
    assert train_steps(run) == [1.0, 2.0] and all(json.loads(line) for line in metrics.read_text().splitlines())


def descendants(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_to_a_sweep_stops_its_workers_and_the_next_sweep_resumes(tmp_path, world, caplog):
    # Warm start built in-process first (the module's other runs share it), so the sweep's worker
    # reaches its first checkpoint in seconds.
    over = [o for o in tiny_overrides(tmp_path, steps=4) if not o.startswith(("data.root=", "algo="))]
    over += [f"data.root={world}", "eval.val_every=100", "model=qwen2-micro-1m", "algo=grpo", "seed=0"]
    cmd = [sys.executable, "-m", "sapo_bench.sweep", "micro_smoke", "--jobs", "1", *over]
    train(cfg_for(tmp_path / "warm", world, steps=1))
    sweep = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "runs" / "micro" / "default" / "qwen2-micro-1m" / "grpo" / "seed0"
    try:
        deadline = time.time() + 240
        while not (run_dir / "checkpoints" / LAST).exists():
            assert time.time() < deadline and sweep.poll() is None, "no checkpoint before the deadline"
            time.sleep(0.1)
        workers = descendants(sweep.pid)
        assert len(workers) == 1 and alive(workers[0])
        sweep.send_signal(signal.SIGTERM)
        out = sweep.communicate(timeout=60)[0]
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM: stopping 1 running: qwen2-micro-1m/grpo/seed0" in out and "run the same command again" in out
    assert not alive(workers[0])  # before this fix it trained on, an orphan
    assert not (run_dir / "result.json").exists() and not (run_dir / "error.json").exists()
    assert "stopped by SIGTERM; its last checkpoint is kept" in (run_dir / "train.log").read_text()
    # It stopped between steps and checkpointed the last one it logged: nothing to redo.
    saved = torch.load(run_dir / "checkpoints" / LAST, map_location="cpu", weights_only=False)
    assert saved["sapo_bench"]["rollout_step"] == len(train_steps(run_dir)) >= 1

    # The next call resumes: the sweep sees a partial run and starts its worker, which is train()
    # on this configuration (in-process here: a second sweep would spend ~10 s starting up).
    (run,) = expand(["micro_smoke"], over)
    assert run.run_dir == run_dir and run.state() == "partial"
    with caplog.at_level(logging.INFO, logger="sapo_bench"):
        assert train(run.cfg)["run"]["steps"] == 4
    assert f"resuming {run_dir} from {run_dir / 'checkpoints' / LAST}" in caplog.text
    assert train_steps(run_dir) == [1.0, 2.0, 3.0, 4.0]
