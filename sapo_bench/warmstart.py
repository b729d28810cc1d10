"""Warm start for micro models: a short supervised pass on teacher trajectories (DESIGN §8).

A randomly initialised micro model cannot search, so RL would have nothing to work with. The
teacher knows each question's chain of passages (world metadata) and writes trajectories in the
exact rollout format; they run through the real rollout loop (`ScriptedEngine` + the real
retriever), so inserted passages are real and masked exactly as in RL.

The teacher is imperfect on purpose, so RL has room to improve:
* `p_no_search`: answers at once with a guess (some other entity's name);
* `p_wrong_entity`: searches a distractor entity and answers from it;
* `p_stop_early`: on multi-hop questions, answers after the first hop with the bridge entity.

Warm starts are cached by a hash of everything that determines them (world, model, tokenizer,
this config, seed, format version); the cache holds the model, the tokenizer and warmstart.json
with the loss curve and the warm-start EM per dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sapo_bench.data import DATASETS, eval_split, load_split, load_train_mix
from sapo_bench.io import atomic_write_json
from sapo_bench.evaluate import evaluate_policy
from sapo_bench.rewards import exact_match
from sapo_bench.rollout import RolloutConfig, ScriptedEngine, rollout
from sapo_bench.tensors import masked_mean

# 2: no <think> text in teacher turns (see _search).
FORMAT_VERSION = 2
log = logging.getLogger(__name__)


@dataclass
class WarmStartConfig:
    questions: int = 2000
    epochs: int = 3
    lr: float = 3e-3
    batch_size: int = 8
    p_no_search: float = 0.1
    p_wrong_entity: float = 0.1
    p_stop_early: float = 0.3
    eval_limit: int = 100  # test questions per dataset for the reported warm-start EM


# No <think> text: the micro template does not ask for it and the reward ignores it. Measured on
# qwen2-micro-1m (2000 questions x 3 epochs): the boilerplate words cost ~0 loss once learnt, while
# the name copies inside <think> were as unlearnt as the query/answer copies (~3 nats/token), and
# they made sequences longer (SFT 154 s -> 117 s without them, with bucketing) at the same test EM.
def _search(title: str) -> str:
    return f"<search> {title} </search>"


def _answer(text: str) -> str:
    return f"<answer> {text} </answer>"


def teacher_script(row: dict, titles: dict[str, str], all_titles: list[str], rng: random.Random,
                   cfg: WarmStartConfig) -> list[str]:
    """The turns a (deliberately imperfect) teacher writes for one question."""
    meta = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
    chain = [titles[pid] for pid in meta["chain"]]
    # Search for the subject as the question writes it (NQ's questions are lower-case): copying is
    # learnable by a tiny model, changing case is not. Later hops copy names from passages.
    question = row["question"]
    chain = [t if t in question or t.lower() not in question else t.lower() for t in chain[:1]] + chain[1:]
    gold = row["golden_answers"][0]
    u = rng.random()
    if u < cfg.p_no_search:
        return [_answer(rng.choice(all_titles))]
    if u < cfg.p_no_search + cfg.p_wrong_entity:
        return [_search(rng.choice(all_titles)), _answer(rng.choice(all_titles))]
    turns = [_search(chain[0])]
    if len(chain) > 1 and meta.get("type") != "comparison" and rng.random() < cfg.p_stop_early:
        return turns + [_answer(chain[1])]
    turns += [_search(t) for t in chain[1:]]
    return turns + [_answer(gold)]


def teacher_batch(tokenizer, retriever, rows, titles, rcfg: RolloutConfig, cfg: WarmStartConfig, seed: int):
    rng = random.Random(f"teacher/{seed}")
    all_titles = list(titles.values())
    scripts = [teacher_script(r, titles, all_titles, rng, cfg) for r in rows]
    return rollout(ScriptedEngine(tokenizer, scripts), tokenizer, retriever, [r["question"] for r in rows], rcfg)


def sft(model, batch, cfg: WarmStartConfig, seed: int) -> list[float]:
    """Cross-entropy on generated (loss-mask) tokens only; returns the loss per epoch."""
    from sapo_bench.module import token_logp

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    n = batch.input_ids.shape[0]
    total = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / total))
    lengths = batch.attention_mask.sum(-1)
    model.train()
    curve = []
    for _ in range(cfg.epochs):
        # Length bucketing: sort each window of 16 batches by length, then shuffle the batches.
        # Sequences run 60-340 tokens (one or two passage blocks), so random batches spend much time on
        # padding to the longest of each batch; bucketing trains 1.7x more sequences per second at 1
        # thread (measured on qwen2-micro-1m, batch 8: 164 vs 273 ms per step).
        order = torch.randperm(n, generator=gen)
        order = torch.cat([w[lengths[w].argsort(stable=True)] for w in order.split(16 * cfg.batch_size)])
        batches = list(order.split(cfg.batch_size))
        losses = []
        for b in torch.randperm(len(batches), generator=gen).tolist():
            idx = batches[b]
            width = int(lengths[idx].max())
            ids, att, mask = batch.input_ids[idx, :width], batch.attention_mask[idx, :width], batch.loss_mask[idx, :width]
            logp, _, _ = token_logp(model, ids, att, mask=mask)
            loss = -masked_mean(logp, mask)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        curve.append(sum(losses) / len(losses))
    model.eval()
    return curve


def cache_key(world_dir: Path, model_name: str, model_config: dict, tokenizer, rcfg: RolloutConfig,
              cfg: WarmStartConfig, seed: int) -> str:
    blob = json.dumps({"world": hashlib.sha256((Path(world_dir) / "world.json").read_bytes()).hexdigest(),
                       "model": model_name, "config": model_config, "vocab": sorted(tokenizer.get_vocab().items()),
                       "rollout": asdict(rcfg), "warmstart": asdict(cfg), "seed": seed, "version": FORMAT_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warm_start(model_name: str, world_dir: str | Path, retriever, rcfg: RolloutConfig, cfg: WarmStartConfig,
               seed: int = 0, cache_root: str | Path | None = None):
    """Return (model, tokenizer, report) for a warm-started micro model, from the cache when possible."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from sapo_bench.models import build_micro_model, micro_tokenizer

    world_dir = Path(world_dir)
    tokenizer = micro_tokenizer(world_dir)
    model = build_micro_model(model_name, tokenizer, seed)
    key = cache_key(world_dir, model_name, model.config.to_dict(), tokenizer, rcfg, cfg, seed)
    root = Path(cache_root) if cache_root else world_dir / ".cache"
    target = root / f"warmstart-{model_name}-{key}"
    if (target / "warmstart.json").exists():
        model = AutoModelForCausalLM.from_pretrained(target)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(target)
        return model.eval(), tokenizer, json.loads((target / "warmstart.json").read_text())
    start = time.perf_counter()
    titles = {}
    with open(world_dir / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            titles[row["id"]] = row["contents"].split("\n", 1)[0]
    rows = load_train_mix(world_dir, seed=seed)
    rows = rows.select(range(min(cfg.questions, len(rows))))
    batch = teacher_batch(tokenizer, retriever, list(rows), titles, rcfg, cfg, seed)
    teacher_em = sum(0.0 if a is None else exact_match(a, g) for a, g in zip(batch.answers, rows["golden_answers"])) / len(rows)
    curve = sft(model, batch, cfg, seed)
    sets = {d: load_split(world_dir, d, eval_split(world_dir, d), limit=cfg.eval_limit) for d in DATASETS}
    report = {"model": model_name, "key": key, "seed": seed, "config": asdict(cfg), "teacher_em": teacher_em,
              "sft_loss": curve, "test": evaluate_policy(model, tokenizer, retriever, sets, rcfg),
              "seconds": time.perf_counter() - start}
    report["test_em_avg"] = sum(r["em"] for r in report["test"].values()) / len(report["test"])
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "warmstart.json", report)
        if target.exists():  # a concurrent run finished first; theirs is identical
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("warm start %s: teacher EM %.3f, SFT loss %s, test EM avg %.3f (%.0fs)", model_name, teacher_em,
             [round(c, 3) for c in curve], report["test_em_avg"], report["seconds"])
    return model, tokenizer, report
