"""sapo-eval: greedy rollout EM/F1 of any policy on the seven test sets, with the training rollout.

    sapo-eval model=qwen2.5-3b-instruct data=flashrag retriever=http rollout=search_r1 \\
        model.hub_id=PeterJinGo/SearchR1-nq_hotpotqa_train-qwen2.5-3b-em-ppo
    sapo-eval checkpoint=runs/micro/default/qwen2-micro-1m/sapo/seed0/checkpoints/last.ckpt

`checkpoint` may be a Lightning checkpoint of a sapo-train run (its model config is read from the
run's config.yaml), a folder saved with save_pretrained, or omitted (the model config's own weights:
a hub id, a local path, or a micro model's warm start). Writes eval.json next to the checkpoint, or
to `out`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from sapo_bench.data import DATASETS, load_eval
from sapo_bench.export import check_checkpoint, load_policy_weights, run_config
from sapo_bench.io import atomic_write_json
from sapo_bench.rewards import exact_match, f1_score
from sapo_bench.rollout import RolloutConfig, make_engine, rollout
from sapo_bench.runtime import CONF_DIR, RetryingRetriever, load_policy_for, prepare_data, set_threads


def score(answers: list[str | None], golds: list[list[str]]) -> list[tuple[float, float]]:
    """(EM, F1) per example; no extracted answer scores 0."""
    return [(0.0, 0.0) if a is None else (exact_match(a, g), f1_score(a, g)) for a, g in zip(answers, golds)]


def score_totals(scores: list[tuple[float, float]]) -> tuple[float, float, int]:
    """(EM sum, F1 sum, n): summed in order as Python floats, so that every path that scores a
    set (sapo-eval here, a run's own validation and test in module.py) reports the same numbers."""
    return sum(s[0] for s in scores), sum(s[1] for s in scores), len(scores)


def em_avg(results: dict) -> float:
    """The Avg column: the unweighted mean of each set's EM in a {dataset: {em, f1, n}} result."""
    return sum(r["em"] for r in results.values()) / len(results)


@torch.no_grad()
def evaluate_batches(sets: dict, run_batch, batch_size: int = 64) -> dict:
    """{dataset: {em, f1, n}}: `run_batch(rows)` rolls out one batch of a set's rows (a
    `datasets.Dataset` slice) and returns its RolloutBatch. Every policy and baseline row of a
    table is scored here, so they differ only in who acts."""
    out = {}
    for name, ds in sets.items():
        scores = []
        for s in range(0, len(ds), batch_size):
            rows = ds.select(range(s, min(s + batch_size, len(ds))))
            scores += score(run_batch(rows).answers, rows["golden_answers"])
        em, f1, n = score_totals(scores)
        out[name] = {"em": em / max(n, 1), "f1": f1 / max(n, 1), "n": n}
    return out


@torch.no_grad()
def evaluate_policy(model, tokenizer, retriever, sets: dict, rcfg: RolloutConfig, batch_size: int = 64) -> dict:
    """{dataset: {em, f1, n}} by greedy rollout."""
    model.eval()

    def run_batch(rows):
        engine = make_engine(rcfg.backend, model, tokenizer, options=rcfg.options(), greedy=True)
        return rollout(engine, tokenizer, retriever, rows["question"], rcfg)

    return evaluate_batches(sets, run_batch, batch_size)


def _policy(cfg: DictConfig, retriever, rcfg: RolloutConfig):
    ckpt = cfg.get("checkpoint")
    if ckpt and Path(ckpt).is_dir():
        from sapo_bench.models import load_pretrained

        return load_pretrained(str(ckpt))
    if ckpt:
        run_cfg = run_config(ckpt)
        if run_cfg is not None:  # evaluate the run's own model, whatever model= says
            cfg = OmegaConf.merge(cfg, {"model": run_cfg.model})
    model, tok, _ = load_policy_for(cfg, retriever, rcfg)
    if ckpt:
        load_policy_weights(model, ckpt)
    return model, tok


def run_eval(cfg: DictConfig) -> dict:
    from sapo_bench.retrieval import build_retriever

    start = time.time()
    if cfg.get("checkpoint") and not Path(cfg.checkpoint).is_dir():
        check_checkpoint(cfg.checkpoint)  # before the retriever and the policy are built
    set_threads(cfg)
    prepare_data(cfg)  # the retriever reads the world's corpus: a world seed never used before is written now
    rcfg = RolloutConfig(**OmegaConf.to_container(cfg.rollout, resolve=True), chat_template=bool(cfg.model.chat_template))
    retriever = RetryingRetriever(build_retriever(**OmegaConf.to_container(cfg.retriever, resolve=True)))
    model, tok = _policy(cfg, retriever, rcfg)
    sets = load_eval(cfg.data.source, tuple(cfg.get("datasets") or DATASETS), limit=cfg.data.test_limit)
    test = evaluate_policy(model, tok, retriever, sets, rcfg, batch_size=cfg.eval.batch_size)
    result = {"model": cfg.model.name, "checkpoint": cfg.get("checkpoint"), "test": test,
              "test_em_avg": em_avg(test), "wall_s": round(time.time() - start, 1)}
    out = Path(cfg.out) if cfg.get("out") else (Path(cfg.checkpoint).parent if cfg.get("checkpoint") else Path(cfg.run_dir))
    atomic_write_json(out / "eval.json" if out.suffix != ".json" else out, result)
    return result


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(json.dumps(run_eval(cfg), indent=2))


if __name__ == "__main__":
    main()
