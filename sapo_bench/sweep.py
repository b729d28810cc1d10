"""sapo-sweep: run experiments' grids of runs, in parallel, resumably.

    sapo-sweep micro_main micro_ablation            # every run of both tables (shared runs once)
    sapo-sweep micro_main --jobs 2 train.max_steps=5 out_root=runs/try   # Hydra overrides too
    sapo-sweep micro_main --list                    # the grid and each run's state; runs nothing

An experiment (conf/experiment/<name>.yaml) states its grid in `hydra.sweeper.params`, the same
grid that `sapo-train -m experiment=<name>` hands to Hydra's sweeper (and its SLURM launcher,
`hydra/launcher=slurm`). This driver expands that grid with Hydra's own override parser, then:

1. skips finished runs (result.json of the same configuration), resumes interrupted ones (their
   last checkpoint) and refuses to touch a folder that holds another configuration's result;
2. builds what the runs share (world, tokenizer, index) once, then starts `--jobs` runs at a time,
   each in its own process (`python -m sapo_bench.train`, log in <run_dir>/train.log), ordered
   round-robin over models so that parallel workers build different warm starts; a run whose
   warm start another worker is building waits in the queue, not in a slot (`next_run`);
3. keeps going when a run fails (its error.json names the error, the report flags it) and prints
   runs done / total with an estimate of the time left; exits 1 if any run failed;
4. on SIGTERM or SIGINT stops its workers (SIGTERM, then SIGKILL after STOP_GRACE_S) before it
   exits, so that nothing keeps writing into the run folders; the same command then resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from hydra import compose, initialize_config_dir
# The basic sweeper's own expansion, so that `sapo-sweep X` and `sapo-train -m experiment=X` agree.
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from sapo_bench.checkpoints import RESUMABLE
from sapo_bench.io import atomic_write_json
from sapo_bench.runtime import (CONF_DIR, RUN_CONFIG_KEYS, RunConflict, architecture, config_hash, finished_result,
                                has_warm_start, prepare, run_configs)

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
STOP_GRACE_S = 30.0  # a worker told to stop gets this long before it is killed


@dataclass
class Run:
    """One cell of a grid: the overrides that make it and where it lives."""

    overrides: list[str]
    cfg: DictConfig
    experiments: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @cached_property
    def config_hash(self) -> str:
        return config_hash(self.cfg)

    @property
    def label(self) -> str:
        return f"{self.cfg.model.name}/{self.cfg.algo.name}/seed{self.cfg.seed}"

    def state(self) -> str:
        """done | conflict | failed | partial | new."""
        try:
            if finished_result(self.run_dir, self.config_hash, architecture(self.cfg)) is not None:
                return "done"
        except RunConflict:
            return "conflict"
        if (self.run_dir / "error.json").exists():
            return "failed"
        return "partial" if any((self.run_dir / "checkpoints" / n).exists() for n in RESUMABLE) else "new"

    def error(self) -> str | None:
        path = self.run_dir / "error.json"
        return json.loads(path.read_text())["error"] if path.exists() else None


def compose_config(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_config)


def check_experiment(name: str) -> None:
    if name not in EXPERIMENTS:
        raise SystemExit(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")


def grid(experiment: str, overrides: list[str] = ()) -> list[list[str]]:
    """The override lists of an experiment's runs, as Hydra's basic sweeper would expand them.

    Command-line overrides replace the experiment's sweep parameter of the same key (as in Hydra).
    """
    check_experiment(experiment)
    parser = OverridesParser.create()
    given = parser.parse_overrides(list(overrides))
    keys = {o.get_key_element() for o in given}
    plain = [o.input_line for o in given if not o.is_sweep_override()]
    params = compose_config([f"experiment={experiment}", *plain], hydra_config=True).hydra.sweeper.params or {}
    swept = parser.parse_overrides([f"{k}={v}" for k, v in params.items() if k not in keys])
    (batch,) = BasicSweeper.split_arguments(swept + given, max_batch_size=None)
    return [[f"experiment={experiment}", *job] for job in batch]


def expand(experiments: list[str], overrides: list[str] = ()) -> list[Run]:
    """Every run of the experiments, once each: two tables that share a run share its folder."""
    runs: dict[Path, Run] = {}
    for exp in experiments:
        for job in grid(exp, overrides):
            cfg = compose_config(job)
            run = Run(job, cfg, [exp])
            seen = runs.get(run.run_dir)
            if seen is None:
                runs[run.run_dir] = run
            elif seen.config_hash != run.config_hash:
                raise SystemExit(f"{run.run_dir} is claimed by {seen.experiments[0]} and {exp} with different "
                                 "configurations: give one of them its own `setting`")
            else:
                seen.experiments.append(exp)
    return list(runs.values())


def interleave(runs: list[Run]) -> list[Run]:
    """Round-robin over models, so that the first runs started in parallel warm-start different models."""
    by_model: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_model[r.cfg.model.name].append(r)
    queues, out = list(by_model.values()), []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def warm_start_key(run: Run) -> tuple | None:
    """What runs share a warm start by (runtime.load_policy_for's lock); None without one."""
    return (run.cfg.data.root, run.cfg.model.name) if has_warm_start(run.cfg) else None


def next_run(queue: list[Run], running: list[Run], warmed: set) -> Run | None:
    """Pop the first queued run that can start working now, or None.

    A run whose warm start another worker is still building would only wait on that worker's lock
    and hold its slot meanwhile: it is passed over (until a run of its model finishes) for one that
    can work, and the slot stays free when there is none.
    """
    building = {k for k in map(warm_start_key, running) if k is not None and k not in warmed}
    for i, run in enumerate(queue):
        if warm_start_key(run) not in building:
            return queue.pop(i)
    return None


def uses_gpu(cfg: DictConfig) -> bool:
    import torch

    return torch.cuda.is_available() and cfg.trainer.get("accelerator") in ("gpu", "cuda", "auto")


def default_jobs(cfg: DictConfig) -> int:
    if uses_gpu(cfg):
        import torch

        return max(1, torch.cuda.device_count() // int(cfg.trainer.get("devices") or 1))
    return max(1, (os.cpu_count() or 1) // int(cfg.get("cpu_threads") or 1))


def _fmt_s(s: float) -> str:
    return f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


class Progress:
    """runs done / total and a time-left estimate from the runs finished so far (per worker slot)."""

    def __init__(self, total: int, done: int, jobs: int):
        self.total, self.done, self.failed, self.jobs = total, done, 0, jobs
        self.durations: list[float] = []

    def line(self, running: int, queued: int) -> str:
        parts = [f"[{self.done}/{self.total} done", f"{running} running", f"{queued} queued"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.durations and (running or queued):
            mean = sum(self.durations) / len(self.durations)
            parts.append(f"about {_fmt_s(mean * (queued + running / 2) / self.jobs)} left")
        return ", ".join(parts) + "]"


def launch(run: Run, slot: int, gpu: bool) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", str(run.cfg.get("cpu_threads") or 1))
    if gpu:  # slot k gets its own GPUs: devices k*d .. k*d+d-1
        d = int(run.cfg.trainer.get("devices") or 1)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(slot * d + i) for i in range(d))
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run.run_dir / "train.log", "a", encoding="utf-8")
    log.write(f"\n=== sapo-sweep {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(run.overrides)}\n")
    log.flush()
    proc = subprocess.Popen([sys.executable, "-m", "sapo_bench.train", *run.overrides], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    log.close()
    return proc


class _StopSignals:
    """Within the block, SIGTERM and SIGINT set `signum` instead of ending the process, so that the
    sweep can stop its workers first (a terminated parent leaves its children running). A second
    signal ends the process at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        self.signum = signum
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only there can Python take signals
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def stop_workers(procs: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM each worker (a training run stops after its current step; its last checkpoint
    stays), then SIGKILL whichever has not exited after `grace_s`."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.time() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sweep(runs: list[Run], jobs: int, out=print) -> dict[str, list[Run]]:
    """Run what is not finished; returns the runs by final state (done / failed / conflict)."""
    states = {id(r): r.state() for r in runs}
    conflicts = [r for r in runs if states[id(r)] == "conflict"]
    for r in conflicts:
        out(f"conflict: {r.label}: {r.run_dir}/result.json is another configuration's; left as it is")
    todo = interleave([r for r in runs if states[id(r)] not in ("done", "conflict")])
    progress = Progress(len(runs), sum(states[id(r)] == "done" for r in runs), jobs)
    resumed = sum(states[id(r)] == "partial" for r in todo)
    out(f"sapo-sweep: {len(runs)} runs, {progress.done} finished already, {len(todo)} to run"
        + (f" ({resumed} resume from a checkpoint)" if resumed else "") + f", {jobs} at a time")
    checked = set()
    for r in todo:  # a setting that cannot work stops the sweep before any run starts
        # once per distinct value of what run_configs reads: a backend's fallback warning comes once
        key = OmegaConf.to_yaml(OmegaConf.masked_copy(r.cfg, list(RUN_CONFIG_KEYS)), resolve=True)
        if key not in checked:
            try:
                run_configs(r.cfg)
            except ValueError as e:
                raise SystemExit(f"sapo-sweep: {r.label}: {e}") from None
            checked.add(key)
    prepared = set()
    for r in todo:  # shared caches, built once here rather than raced for by the workers
        key = (r.cfg.data.root, r.cfg.retriever.get("corpus_path"), r.cfg.model.kind == "micro")
        if key not in prepared:
            prepare(r.cfg)
            prepared.add(key)
    gpu = bool(todo) and uses_gpu(todo[0].cfg)
    failed: list[Run] = []
    warmed: set = set()  # warm starts that a finished run has built (or found)
    running: dict[int, tuple[Run, subprocess.Popen, float]] = {}
    queue = list(todo)
    with _StopSignals() as stop:
        try:
            while (queue or running) and not stop.signum:
                for slot in range(jobs):
                    if slot not in running and not stop.signum:
                        run = next_run(queue, [r for r, _, _ in running.values()], warmed)
                        if run is not None:
                            running[slot] = (run, launch(run, slot, gpu), time.time())
                time.sleep(0.2)
                for slot, (run, proc, t0) in list(running.items()):
                    if proc.poll() is None or stop.signum:
                        continue
                    del running[slot]
                    took = time.time() - t0
                    progress.durations.append(took)
                    if proc.returncode == 0 and run.state() == "done":
                        progress.done += 1
                        warmed.add(warm_start_key(run))
                        verdict = f"finished {run.label} in {_fmt_s(took)}"
                    else:
                        progress.failed += 1
                        failed.append(run)
                        if run.error() is None:  # killed before train() could say why (OOM, a signal)
                            tail = (run.run_dir / "train.log").read_text(errors="replace")[-3000:]
                            atomic_write_json(run.run_dir / "error.json", {
                                "error": f"exit code {proc.returncode}; see {run.run_dir / 'train.log'}",
                                "traceback": tail, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
                        err = run.error()
                        verdict = f"FAILED {run.label}: {err}"
                    out(f"{progress.line(len(running), len(queue))} {verdict}")
        except BaseException:
            stop_workers([proc for _, proc, _ in running.values()])
            raise
        if stop.signum:
            name = signal.Signals(stop.signum).name
            out(f"{name}: stopping {len(running)} running: " + ", ".join(r.label for r, _, _ in running.values()))
            stop_workers([proc for _, proc, _ in running.values()])
            out("stopped: run the same command again to resume")
            if stop.signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + stop.signum)
    bad = {id(r) for r in failed + conflicts}
    done = [r for r in runs if id(r) not in bad]
    return {"done": done, "failed": failed, "conflict": conflicts}


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Positional arguments: experiment names, and Hydra overrides (they contain '=')."""
    experiments = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    for name in experiments:
        check_experiment(name)
    if not experiments:
        raise SystemExit(f"name at least one experiment; valid: {', '.join(EXPERIMENTS)}")
    return experiments, overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sapo-sweep", description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="+", metavar="EXPERIMENT|OVERRIDE",
                        help=f"experiments ({', '.join(EXPERIMENTS)}) and Hydra overrides (key=value)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs at a time (default: one per GPU, or CPU cores / cpu_threads)")
    parser.add_argument("--list", action="store_true", help="print the runs and their state; run nothing")
    a = parser.parse_intermixed_args(argv)
    experiments, overrides = split_args(a.args)
    runs = expand(experiments, overrides)
    if a.list:
        for r in runs:
            err = r.error()
            print(f"{r.state():9s} {r.run_dir}" + (f"  ({err})" if err else ""))
        return
    jobs = a.jobs or default_jobs(runs[0].cfg)
    t0 = time.time()
    by_state = sweep(runs, jobs)
    bad = by_state["failed"] + by_state["conflict"]
    print(f"sapo-sweep: {len(by_state['done'])}/{len(runs)} runs finished, {len(bad)} not, "
          f"in {_fmt_s(time.time() - t0)}")
    for r in bad:
        print(f"  {r.label} ({r.run_dir}): {r.error() or r.state()}")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
