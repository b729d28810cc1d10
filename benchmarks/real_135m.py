"""Memory and speed of SmolLM2-135M-Instruct on this CPU (README, "The real-model path"): rollout
tokens/s, one optimiser step's time and peak RSS, full fine-tuning against gradient checkpointing
and LoRA (peft), paired.

    python benchmarks/real_135m.py --repeats 2 --out benchmarks/reports/real_135m.json

Each variant runs in a process of its own (so that its peak RSS is its own), in the order
A B C A B C ...: on a noisy machine a pair measured side by side says more than two absolute
numbers, so the report gives each variant's ratio to full fine-tuning per repeat, and their median.
A step: micro_real's update shapes (a mini-batch of 8 responses in micro-batches of 4, the teacher's
trajectories at micro_real's rollout budgets), forward + backward + AdamW.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sapo_bench.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("full", "checkpointing", "lora")


def _setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sapo_bench.models import load_policy
    from sapo_bench.retrieval import build_retriever
    from sapo_bench.rollout import RolloutConfig
    from sapo_bench.runtime import prepare_data

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        # In-process BM25 over the same corpus: micro_real's server is not running here, and what
        # is measured is the model (its `retriever.url` would otherwise reach BM25's settings).
        cfg = compose(config_name="config", overrides=["experiment=micro_real", "retriever=bm25", "~retriever.url"])
    prepare_data(cfg)
    retriever = build_retriever(**OmegaConf.to_container(cfg.retriever, resolve=True))
    rcfg = RolloutConfig(**OmegaConf.to_container(cfg.rollout, resolve=True), chat_template=True)
    model, tok = load_policy(cfg.model)
    return cfg, model, tok, retriever, rcfg


def measure(variant: str, threads: int, steps: int) -> dict:
    """One variant in this process: {step_s (each), rss_mb, ...}."""
    import torch

    from sapo_bench.baselines import corpus_titles
    from sapo_bench.module import token_logp
    from sapo_bench.rollout import make_engine, rollout
    from sapo_bench.warmstart import WarmStartConfig, teacher_batch, teacher_questions

    cfg, model, tok, retriever, rcfg = _setup(threads)
    out = {"variant": variant, "threads": threads}
    wcfg = WarmStartConfig(questions=8, n_val=cfg.data.n_val)
    rows = list(teacher_questions(cfg.data.root, wcfg, 0))
    if variant == "rollout":  # sampled, as in training: 8 questions x 2 responses, micro_real's budgets
        qs = [r["question"] for r in rows] * 2
        t = time.perf_counter()
        batch = rollout(make_engine("hf", model, tok, temperature=1.0, top_p=1.0), tok, retriever, qs, rcfg)
        dt = time.perf_counter() - t
        gen = int(batch.loss_mask.sum())
        out.update(rollout_s=dt, generated_tokens=gen, tokens_per_s=gen / dt, episodes=len(qs),
                   inserted_tokens=int((batch.attention_mask.sum() - batch.loss_mask.sum()).item()))
    else:
        batch, _ = teacher_batch(tok, retriever, rows, corpus_titles(Path(cfg.data.corpus)), rcfg, wcfg, 0)
        if variant == "checkpointing":
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        if variant == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"]))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-6)
        model.train()
        times = []
        for s in range(steps + 1):  # the first step allocates (Adam state, kernels): not timed
            t = time.perf_counter()
            for lo in (0, 4):  # a mini-batch of 8 in micro-batches of 4, as micro_real trains
                idx = slice(lo, lo + 4)
                w = int(batch.attention_mask[idx].sum(-1).max())
                m = batch.loss_mask[idx, :w]
                logp, _, _ = token_logp(model, batch.input_ids[idx, :w], batch.attention_mask[idx, :w], mask=m)
                (-(logp * m).sum() / batch.loss_mask[:8].sum()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if s:
                times.append(time.perf_counter() - t)
        out.update(step_s=times, trainable=sum(p.numel() for p in params),
                   tokens=int(batch.attention_mask[:8].sum()))
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed optimiser steps per process")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "reports" / "real_135m.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this variant here, print JSON
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(measure(a.one, a.threads, a.steps)), flush=True)
        return
    variants = a.variants.split(",")
    runs = []
    for rep in range(a.repeats):
        for v in ["rollout", *variants]:
            done = subprocess.run([sys.executable, __file__, "--one", v, "--threads", str(a.threads),
                                   "--steps", str(a.steps)], capture_output=True, text=True, cwd=ROOT)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not line:
                raise SystemExit(f"{v}: exit {done.returncode}\n{done.stderr[-3000:]}")
            runs.append({"repeat": rep, **json.loads(line[0][7:])})
            print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        summary[v] = {"step_s_median": statistics.median(t for r in mine for t in r["step_s"]),
                      "rss_mb_max": max(r["rss_mb"] for r in mine), "trainable": mine[0]["trainable"]}
        if v != "full":  # per repeat: this variant's median step over full's, measured beside it
            ratios = [statistics.median(r["step_s"]) / statistics.median(f["step_s"])
                      for r, f in zip(mine, [x for x in runs if x["variant"] == "full"])]
            summary[v].update(time_ratio_vs_full=ratios, time_ratio_median=statistics.median(ratios))
    roll = [r for r in runs if r["variant"] == "rollout"]
    summary["rollout"] = {"tokens_per_s": [round(r["tokens_per_s"], 1) for r in roll],
                          "rss_mb_max": max(r["rss_mb"] for r in roll)}
    report = {"runs": runs, "summary": summary, "threads": a.threads,
              "note": "contended machine: other processes shared the 2 cores (README)"}
    atomic_write_json(a.out, report)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
