"""Warm start for micro models: a short supervised pass on teacher trajectories (DESIGN §8).

A randomly initialised micro model cannot search, so RL would have nothing to work with. The
teacher knows each question's chain of passages (world metadata) and writes trajectories in the
exact rollout format; they run through the real rollout loop (`ScriptedEngine` + the real
retriever), so inserted passages are real and masked exactly as in RL.

The teacher can be made imperfect (all off by default: the student's limited capacity already
leaves it well below the teacher, and the oracle baseline row measures that headroom):
* `p_no_search`: answers at once with a guess (some other entity's name);
* `p_wrong_entity`: searches a distractor entity and answers from it;
* `p_stop_early`: on multi-hop questions, answers after the first hop with the bridge entity;
  with `stop_early_from`, only in the last part of the supervised pass (the same questions go
  through their full chains before it).

Warm starts are cached by a hash of everything that determines them (world, model, tokenizer,
this config, seed, format version); the cache holds the model, the tokenizer and warmstart.json
with the loss curve and the warm-start EM per dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from sapo_bench.data import DATASETS, TRAIN_MIX, eval_split, load_split, load_train_and_validation
from sapo_bench.io import atomic_write_json
from sapo_bench.baselines import corpus_titles, evaluate_baselines
from sapo_bench.evaluate import em_avg, evaluate_policy
from sapo_bench.rewards import exact_match
from sapo_bench.rollout import RolloutConfig, ScriptedEngine, rollout
from sapo_bench.settings import SettingError, check_int, check_number
from sapo_bench.tensors import masked_mean

# 2: no <think> text in teacher turns (see _search). 3: baseline rows; validation never taught.
FORMAT_VERSION = 3
log = logging.getLogger(__name__)


@dataclass
class WarmStartConfig:
    questions: int | None = None  # train-mix questions the teacher answers (None: all of them)
    epochs: float = 2.5
    lr: float = 2e-3
    warmup_steps: int = 375  # ~10% of the default pass: conf/config.yaml says why
    batch_size: int = 8
    p_no_search: float = 0.0
    p_wrong_entity: float = 0.0
    p_stop_early: float = 0.0
    eval_limit: int | None = 100  # test questions per dataset for the reported warm-start EM (None: all)
    n_val: int = 50        # the runs' validation questions per train dataset: never taught (no leak)
    # Weight of a language-model loss on the inserted passages. Passages repeat their titles
    # ("Doc 1(Title: Ann Lee) Ann B. Lee is ...") and name what questions ask for, so predicting
    # them trains the copying that the policy's own ~15 tokens per episode teach slowly, in the
    # same forward pass. Measured on qwen2-micro-1m (3,000 steps): avg test EM 0.08 -> 0.25 at 0.3.
    # 1.0 since the template words left the targets (aux_skip_top): what is left is the copying
    # itself. qwen2-micro-1m on world seed 3, the cell that failed at 0.3 with two inits: 0.223 ->
    # 0.309 at the same cost; on the default world, not used to choose, qwen2 0.339 -> 0.347 and
    # llama-micro-1m 0.341 -> 0.340 (README, World seeds never tuned on).
    aux_lm: float = 1.0
    # Weight of the answer span's tokens in the policy loss (a weighted mean). The student's typical
    # error is an answer of the right kind copied from the wrong place ("1948" for "born ... in
    # 1911"): the two or three answer tokens carry the skill that the other ~12 policy tokens do not.
    # With 2.5 epochs (and bf16, since turned off), measured on world seed 2 (never tuned on),
    # qwen2-micro-1m: avg test EM 0.16 (weight 1, 2 epochs) -> 0.34.
    answer_weight: float = 4.0
    # The passage loss leaves out, as targets, the `aux_skip_top` most frequent tokens of the
    # teacher's trajectories: template words ("was", "born", "Doc", "(Title"; the top 30 are 56% of
    # the passage tokens), learnt in the first epoch, after which they cost the vocabulary
    # projection and dilute the mean without teaching anything. What is left is names, numbers and
    # relation words: the copying. Measured on world seed 2, two at once: qwen2-micro-1m avg test
    # EM 0.243 -> 0.416, llama-micro-1m 0.391 -> 0.366, each warm start 546-574 s instead of
    # 700-1,300. Only names copied from earlier in the sequence (16%) did worse: 0.20 / 0.23.
    aux_skip_top: int = 30
    # bfloat16 autocast for the forward pass. Off: on this CPU it is no faster per step (paired
    # over 26 batches: 0.96-1.04x) and slower over a whole warm start (qwen2-micro-1.3m, two started
    # together: fp32 done in 1,054 s, bf16 past 1,600 s of CPU), and the four-layer 1.3m sizes
    # learn worse with it (world seed 0, qwen2-micro-1.3m: avg test EM 0.213 in bf16, 0.314 in fp32).
    # It may pay on a GPU.
    bf16: bool = False
    # Whether the answers the teacher gives after stopping early (p_stop_early: the bridge entity,
    # an answer of the wrong kind) are trained on. False keeps the decision to answer (the
    # `<answer>` tag) and leaves out the wrong answer's tokens. Tried as the cause of what the early
    # stops cost the warm start (qwen2-micro-1m, world v3, same init; avg test EM, seeds 0 / 2:
    # p_stop_early 0: 0.351 / 0.280; 0.5: 0.203 / 0.157; 0.5 without the early answers: 0.159 /
    # 0.173): it is not, so the default keeps them (README, Results).
    early_answer_loss: bool = True
    # The fraction of the supervised pass before which the teacher shows no early stops: until then
    # the same questions are answered through the full chain, after it with p_stop_early's stops.
    # Copying is learnt first (it appears after ~1,500 steps at 1M) and the decision to stop is left
    # unsettled at the end, for RL to take up. 0: the stops throughout.
    stop_early_from: float = 0.0
    # Independent warm starts to build (init seeds seed, seed + 1000, ...), keeping the one with the
    # best EM on the runs' validation questions (never on test). At 1M parameters whether the copying
    # is learnt depends on the init (README, Results): k draws cost k times as much and make a
    # backbone's row a statement about the recipe's better draws. 1: the one warm start.
    inits: int = 1

    def __post_init__(self):
        if self.questions is not None:
            check_int("warmstart.questions", self.questions)
        check_number("warmstart.epochs", self.epochs, positive=True)
        check_number("warmstart.lr", self.lr, positive=True)
        check_int("warmstart.warmup_steps", self.warmup_steps, minimum=0)
        check_int("warmstart.batch_size", self.batch_size)
        for name in ("p_no_search", "p_wrong_entity", "p_stop_early"):
            check_number(f"warmstart.{name}", getattr(self, name), minimum=0, maximum=1)
        if self.p_no_search + self.p_wrong_entity > 1:
            raise SettingError("warmstart.p_no_search + warmstart.p_wrong_entity must be at most 1, got "
                               f"{self.p_no_search + self.p_wrong_entity}")
        if self.eval_limit is not None:
            check_int("warmstart.eval_limit", self.eval_limit)
        check_int("warmstart.n_val", self.n_val, minimum=0)
        check_number("warmstart.aux_lm", self.aux_lm, minimum=0)
        check_number("warmstart.answer_weight", self.answer_weight, positive=True)
        check_int("warmstart.aux_skip_top", self.aux_skip_top, minimum=0)
        check_number("warmstart.stop_early_from", self.stop_early_from, minimum=0, maximum=1)
        check_int("warmstart.inits", self.inits)
        if self.inits > 1 and self.n_val < 1:
            raise SettingError(f"warmstart.inits={self.inits} chooses by validation EM: warmstart.n_val must be at "
                               "least 1, got 0")


# No <think> text: the micro template does not ask for it and the reward ignores it. Measured on
# qwen2-micro-1m (2000 questions x 3 epochs): the boilerplate words cost ~0 loss once learnt, while
# the name copies inside <think> were as unlearnt as the query/answer copies (~3 nats/token), and
# they made sequences longer (SFT 154 s -> 117 s without them, with bucketing) at the same test EM.
def _search(title: str) -> str:
    return f"<search> {title} </search>"


def _answer(text: str) -> str:
    return f"<answer> {text} </answer>"


def teacher_script(row: dict, titles: dict[str, str], all_titles: list[str], rng: random.Random,
                   cfg: WarmStartConfig) -> tuple[list[str], bool]:
    """The turns the teacher writes for one question (imperfect only where cfg's flaws say so), and
    whether it stopped early (answered a multi-hop question after its first hop)."""
    meta = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
    chain = [titles[pid] for pid in meta["chain"]]
    # Search for the subject as the question writes it (a lower-cased question gets a lower-cased
    # query): copying is learnable by a tiny model, changing case is not. Later hops copy names
    # from passages.
    question = row["question"]
    chain = [t if t in question or t.lower() not in question else t.lower() for t in chain[:1]] + chain[1:]
    gold = row["golden_answers"][0]
    u = rng.random()
    if u < cfg.p_no_search:
        return [_answer(rng.choice(all_titles))], False
    if u < cfg.p_no_search + cfg.p_wrong_entity:
        return [_search(rng.choice(all_titles)), _answer(rng.choice(all_titles))], False
    turns = [_search(chain[0])]
    if len(chain) > 1 and meta.get("type") != "comparison" and rng.random() < cfg.p_stop_early:
        return turns + [_answer(chain[1])], True
    turns += [_search(t) for t in chain[1:]]
    return turns + [_answer(gold)], False


def teacher_batch(tokenizer, retriever, rows, titles, rcfg: RolloutConfig, cfg: WarmStartConfig, seed: int):
    """The teacher's trajectories as a rollout batch, and a bool tensor: which of them stopped early."""
    rng = random.Random(f"teacher/{seed}")
    all_titles = list(titles.values())
    scripts, early = zip(*(teacher_script(r, titles, all_titles, rng, cfg) for r in rows))
    batch = rollout(ScriptedEngine(tokenizer, list(scripts)), tokenizer, retriever, [r["question"] for r in rows], rcfg)
    return batch, torch.tensor(early, dtype=torch.bool)


def teacher_batches(tokenizer, retriever, rows, titles, rcfg: RolloutConfig, cfg: WarmStartConfig, seed: int):
    """teacher_batch's (batch, early), and the batch that sft trains on before cfg.stop_early_from:
    the same questions through their full chains (the same draws, none of them a stop); None where
    there is no such first part."""
    batch, early = teacher_batch(tokenizer, retriever, rows, titles, rcfg, cfg, seed)
    first = None
    if cfg.stop_early_from > 0 and early.any():
        first, _ = teacher_batch(tokenizer, retriever, rows, titles, rcfg, replace(cfg, p_stop_early=0.0), seed)
    return batch, early, first


def policy_weights(ids, mask, answer_id: int | None, answer_weight: float, silent=None):
    """Per-token weights of the policy loss: `mask`, times answer_weight from the policy's `<answer>`
    token on (the answer span and its closing tag), a weighted mean's numerator. In the rows that
    `silent` (bool, one per row) marks, the tokens after that `<answer>` tag weigh 0."""
    if answer_id is None or (answer_weight == 1.0 and (silent is None or not silent.any())):
        return mask
    tag = (ids == answer_id) * mask
    seen = tag.cumsum(-1)
    w = mask * (1 + (answer_weight - 1) * (seen > 0))
    if silent is not None:
        w = w * ~(silent[:, None] & (seen - tag > 0))
    return w


def frequent_tokens(ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """The k most frequent token ids where attention_mask is set (ties: the lower id)."""
    counts = torch.bincount(ids[attention_mask.bool()], minlength=int(ids.max()) + 1)
    return counts.argsort(descending=True, stable=True)[:k]


class _SftBatch:
    """One teacher batch's tensors as the supervised pass reads them."""

    def __init__(self, batch, cfg: WarmStartConfig, early=None):
        self.ids, self.att, self.mask = batch.input_ids, batch.attention_mask, batch.loss_mask
        self.lengths = batch.attention_mask.sum(-1)
        self.silent = early if early is not None and not cfg.early_answer_loss else None
        # The inserted passages and tool feedback: the response's tokens that the policy did not write.
        passages = torch.zeros_like(batch.loss_mask)
        for i, p in enumerate(batch.prompt_lens):
            passages[i, p:] = 1.0
        passages = passages * batch.attention_mask * (1 - batch.loss_mask)
        if cfg.aux_skip_top:
            passages = passages * ~torch.isin(batch.input_ids, frequent_tokens(batch.input_ids, batch.attention_mask,
                                                                               cfg.aux_skip_top))
        self.passages = passages


def sft(model, batch, cfg: WarmStartConfig, seed: int, answer_id: int | None = None, early=None,
        first=None) -> list[float]:
    """Cross-entropy on the generated (loss-mask) tokens, plus cfg.aux_lm times a language-model loss
    on the inserted passages, for cfg.epochs passes (a fraction runs part of the last); returns the
    mean policy loss (generated tokens, answers weighted by cfg.answer_weight) of each pass.
    `early` marks the trajectories that stopped early: their answers are left out unless
    cfg.early_answer_loss. `first`, a teacher batch of the same questions in the same order, is
    trained on instead of `batch` for the first cfg.stop_early_from of the steps."""
    from sapo_bench.module import token_logp

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    n = batch.input_ids.shape[0]
    if first is not None and first.input_ids.shape[0] != n:
        raise ValueError(f"sft: the first-phase batch has {first.input_ids.shape[0]} trajectories, the batch {n}")
    per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    total = max(1, round(cfg.epochs * per_epoch))
    switch = round(cfg.stop_early_from * total) if first is not None else 0
    warm = max(1, min(cfg.warmup_steps, total // 10))
    # Linear warm-up, then cosine to zero: copying appears late (after ~1,000 steps at 1M), so the
    # rate stays high for long and is annealed only at the end.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    late = _SftBatch(batch, cfg, early)
    src = _SftBatch(first, cfg) if switch else late
    model.train()
    device_type = next(model.parameters()).device.type
    curve, step = [], 0
    while step < total:
        # Length bucketing: sort each window of 16 batches by length, then shuffle the batches.
        # Sequences run 60-340 tokens (one or two passage blocks), so random batches spend much time on
        # padding to the longest of each batch; bucketing trains 1.7x more sequences per second at 1
        # thread (measured on qwen2-micro-1m, batch 8: 164 vs 273 ms per step).
        order = torch.randperm(n, generator=gen)
        order = torch.cat([w[src.lengths[w].argsort(stable=True)] for w in order.split(16 * cfg.batch_size)])
        batches = list(order.split(cfg.batch_size))
        losses = []
        for b in torch.randperm(len(batches), generator=gen).tolist()[:total - step]:
            if step == switch:
                src = late
            idx = batches[b]
            width = int(src.lengths[idx].max())
            ids, att, mask = src.ids[idx, :width], src.att[idx, :width], src.mask[idx, :width]
            obs = src.passages[idx, :width]
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logp, _, _ = token_logp(model, ids, att, mask=mask + obs if cfg.aux_lm > 0 else mask)
            w = policy_weights(ids, mask, answer_id, cfg.answer_weight, None if src.silent is None else src.silent[idx])
            policy_loss = -(logp * w).sum() / w.sum().clamp(min=1)
            loss = policy_loss - cfg.aux_lm * masked_mean(logp, obs) if cfg.aux_lm > 0 else policy_loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(policy_loss.item())
            step += 1
            if step % max(1, total // 10) == 0:  # a warm start runs for minutes: say how far it is
                log.info("supervised pass: step %d of %d, policy loss %.3f (mean of this pass so far)", step, total,
                         sum(losses) / len(losses))
        curve.append(sum(losses) / len(losses))
    model.eval()
    return curve


def teacher_questions(world_dir: str | Path, cfg: WarmStartConfig, seed: int = 0):
    """The train-mix questions the teacher answers: the runs' train set exactly, so the questions
    held out of HotpotQA's train split for validation are never taught (dev and test splits are
    other files, and their subjects never start a training question: world.py, point 4)."""
    rows, _ = load_train_and_validation(world_dir, TRAIN_MIX, n_val=cfg.n_val)
    rows = rows.shuffle(seed=seed)
    return rows if cfg.questions is None else rows.select(range(min(cfg.questions, len(rows))))


# Which engine generates does not change a warm start: its teacher is scripted and its greedy
# evaluation agrees across engines (tests/vllm_backend). So the key leaves the engine fields out, and keeps
# "backend" at "hf", its value when hf was the only engine, so that caches built then stay valid.
ENGINE_FIELDS = ("backend", "fallback", "engine_options")
# Settings added after FORMAT_VERSION 3, left out of the key at these values (what was computed
# before they existed), so that the warm starts cached then stay valid.
LATER_DEFAULTS = {"early_answer_loss": True, "stop_early_from": 0.0, "inits": 1}
# The candidates of warmstart.inits > 1: the first is the warm start that inits=1 builds (its cache
# is reused), the others are drawn `INIT_STRIDE` apart so that no world seed's own draw is among them.
INIT_STRIDE = 1000


def cache_key(world_dir: Path, model_name: str, model_config: dict, tokenizer, rcfg: RolloutConfig,
              cfg: WarmStartConfig, seed: int) -> str:
    rollout = {k: v for k, v in asdict(rcfg).items() if k not in ENGINE_FIELDS} | {"backend": "hf"}
    warmstart = {k: v for k, v in asdict(cfg).items() if not (k in LATER_DEFAULTS and LATER_DEFAULTS[k] == v)}
    blob = json.dumps({"world": hashlib.sha256((Path(world_dir) / "world.json").read_bytes()).hexdigest(),
                       "model": model_name, "config": model_config, "vocab": sorted(tokenizer.get_vocab().items()),
                       "rollout": rollout, "warmstart": warmstart, "seed": seed, "version": FORMAT_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]



def save_warm_start(model, tokenizer, report: dict, target: Path) -> None:
    """Write a warm start (weights, tokenizer, warmstart.json) to `target` atomically: built in a
    temporary folder beside it and renamed, so a cache folder is complete or absent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
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

class Laps:
    """Where a warm start's minutes go: `lap(name)` records the seconds since the previous lap
    (warmstart.json's `time`, which the README's budget quotes)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name], self._last = round(now - self._last, 1), now


def answer_em(batch, rows) -> float:
    """EM of a rollout batch's answers against `rows`' golds (no answer scores 0): the teacher's
    own score, below 1 only where its flaws say so."""
    return sum(0.0 if a is None else exact_match(a, g) for a, g in zip(batch.answers, rows["golden_answers"])) / len(rows)


def warm_start(model_name: str, world_dir: str | Path, retriever, rcfg: RolloutConfig, cfg: WarmStartConfig,
               seed: int = 0, cache_root: str | Path | None = None):
    """Return (model, tokenizer, report) for a warm-started micro model, from the cache when possible."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from sapo_bench.models import build_micro_model, micro_tokenizer

    world_dir = Path(world_dir)
    if cfg.inits > 1:
        return best_of_inits(model_name, world_dir, retriever, rcfg, cfg, seed, cache_root)
    tokenizer = micro_tokenizer(world_dir)
    model = build_micro_model(model_name, tokenizer, seed)
    key = cache_key(world_dir, model_name, model.config.to_dict(), tokenizer, rcfg, cfg, seed)
    root = Path(cache_root) if cache_root else world_dir / ".cache"
    target = root / f"warmstart-{model_name}-{key}"
    if (target / "warmstart.json").exists():
        model = AutoModelForCausalLM.from_pretrained(target)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(target)
        return model.eval(), tokenizer, json.loads((target / "warmstart.json").read_text())
    lap = Laps()
    titles = corpus_titles(world_dir / "corpus.jsonl")
    rows = teacher_questions(world_dir, cfg, seed)
    batch, early, first = teacher_batches(tokenizer, retriever, list(rows), titles, rcfg, cfg, seed)
    teacher_em = answer_em(batch, rows)
    lap("teacher_s")
    curve = sft(model, batch, cfg, seed, tokenizer.convert_tokens_to_ids("<answer>"), early, first)
    lap("sft_s")
    sets = {d: load_split(world_dir, d, eval_split(world_dir, d), limit=cfg.eval_limit) for d in DATASETS}
    report = {"model": model_name, "key": key, "seed": seed, "config": asdict(cfg), "teacher_em": teacher_em,
              "questions": len(rows), "sft_loss": curve, "test": evaluate_policy(model, tokenizer, retriever, sets, rcfg)}
    report["test_em_avg"] = em_avg(report["test"])
    lap("eval_s")
    # Scored once per warm start, on the same questions: what trivial and ideal policies get here.
    report["baselines"] = evaluate_baselines(model, tokenizer, retriever, sets, rcfg, world_dir / "corpus.jsonl",
                                             rows["golden_answers"])
    lap("baselines_s")
    report["time"], report["seconds"] = lap.times, sum(lap.times.values())
    save_warm_start(model, tokenizer, report, target)
    log.info("warm start %s: teacher EM %.3f, SFT loss %s, test EM avg %.3f (%.0fs)", model_name, teacher_em,
             [round(c, 3) for c in curve], report["test_em_avg"], report["seconds"])
    return model, tokenizer, report


def best_of_inits(model_name: str, world_dir: Path, retriever, rcfg: RolloutConfig, cfg: WarmStartConfig,
                  seed: int, cache_root: str | Path | None = None):
    """warm_start's (model, tokenizer, report) for the best of cfg.inits warm starts by validation EM
    (the first wins a tie). Each candidate is an ordinary warm start, cached by its own key; the
    choice is cached beside them. The report is the chosen one's, with `inits`: every candidate's
    seed, validation EM and test EM (the test EM is reported, never used to choose)."""
    from sapo_bench.models import build_micro_model, micro_tokenizer

    one = replace(cfg, inits=1)
    tokenizer = micro_tokenizer(world_dir)
    config = build_micro_model(model_name, tokenizer, seed).config.to_dict()
    root = Path(cache_root) if cache_root else world_dir / ".cache"
    choice = root / f"warmstart-{model_name}-{cache_key(world_dir, model_name, config, tokenizer, rcfg, cfg, seed)}.json"
    if choice.exists():
        picked = json.loads(choice.read_text())
        model, tokenizer, report = warm_start(model_name, world_dir, retriever, rcfg, one, picked["seed"], cache_root)
        return model, tokenizer, {**report, "inits": picked["inits"]}
    _, val = load_train_and_validation(world_dir, TRAIN_MIX, n_val=cfg.n_val)
    candidates, best = [], None
    for i in range(cfg.inits):
        s = seed + INIT_STRIDE * i
        model, tokenizer, report = warm_start(model_name, world_dir, retriever, rcfg, one, s, cache_root)
        val_em = em_avg(evaluate_policy(model, tokenizer, retriever, val, rcfg))
        candidates.append({"seed": s, "key": report["key"], "val_em": val_em, "test_em_avg": report["test_em_avg"]})
        log.info("warm start %s, init %d of %d (seed %d): validation EM %.3f", model_name, i + 1, cfg.inits, s, val_em)
        if best is None or val_em > best[0]:
            best = (val_em, s, model, tokenizer, report)
    _, chosen, model, tokenizer, report = best
    atomic_write_json(choice, {"seed": chosen, "inits": candidates})
    return model, tokenizer, {**report, "inits": candidates}
