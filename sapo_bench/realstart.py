"""Warm start for a pretrained chat model (SmolLM2-135M-Instruct) on the micro world (experiment=micro_real).

Zero-shot, the instruct model writes prose ("The answer to this question is: ...") and never a
`<search>` call, so RL from it sees only zero rewards (measured: EM 0.000 on all seven mirrors).
The SAPO paper's tables start RL from such a model too, but report an "SFT" row: a supervised pass
in the published format. This is that pass, from the micro warm start's teacher (warmstart.py):
the same scripted trajectories (search the chain's titles, answer the gold), rolled out through
the real retriever and *this* model's rollout config, so that the prompt is the paper's template
wrapped in the model's chat template and the passages sit in `<information>` (or `<documents>`)
blocks exactly as in RL, masked exactly as in RL.

It reuses the micro warm start's settings block (`warmstart:`; the experiment sets values fitting
a pretrained model: few questions, a small learning rate, no passage loss) and its `sft` loop
and cache scheme, under a key of its own (the micro warm starts' keys do not change), in
`<world>/.cache/sft-<model>-<key>/`: the model and tokenizer (save_pretrained, fp32) and
warmstart.json. The report holds, besides the micro warm start's fields, the pretrained model's
own scores (`zero_shot`, `zero_shot_rag`: scored before the supervised pass) among the baselines.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from sapo_bench.baselines import corpus_titles, evaluate_baselines, naive_rag
from sapo_bench.data import DATASETS, eval_split, load_split
from sapo_bench.evaluate import em_avg, evaluate_policy
from sapo_bench.rollout import RolloutConfig
from sapo_bench.settings import SettingError
from sapo_bench.warmstart import (Laps, WarmStartConfig, answer_em, cache_key, save_warm_start, sft, teacher_batches,
                                  teacher_questions)

log = logging.getLogger(__name__)
# Part of the cache key (beside warmstart.FORMAT_VERSION): what this module computes.
SFT_VERSION = 1


def sft_cache_key(world_dir: Path, model_name: str, model, tokenizer, rcfg: RolloutConfig, cfg: WarmStartConfig,
                  seed: int) -> str:
    # The micro key's fields, under a name no micro model has: a micro warm start's key is unchanged.
    return cache_key(world_dir, f"{model_name}+sft{SFT_VERSION}", model.config.to_dict(), tokenizer, rcfg, cfg, seed)


def pretrained_warm_start(model_cfg, world_dir: str | Path, retriever, rcfg: RolloutConfig, cfg: WarmStartConfig,
                          seed: int = 0, cache_root: str | Path | None = None):
    """(model, tokenizer, report) for the pretrained model of `model_cfg` (a conf/model mapping)
    fine-tuned on the teacher's trajectories, from the cache when possible."""
    from sapo_bench.models import load_policy, load_pretrained

    if cfg.inits != 1:  # a pretrained model has one init: there is nothing to choose among
        raise SettingError(f"warmstart.inits={cfg.inits} applies to micro models only; a pretrained model's SFT "
                           "warm start has one init (warmstart.inits=1)")
    world_dir = Path(world_dir)
    model, tokenizer = load_policy(model_cfg)
    name = model_cfg["name"]
    key = sft_cache_key(world_dir, name, model, tokenizer, rcfg, cfg, seed)
    root = Path(cache_root) if cache_root else world_dir / ".cache"
    target = root / f"sft-{name}-{key}"
    if (target / "warmstart.json").exists():
        # The dtype of the base model's config: a run from the cache computes what a fresh one does.
        model, tokenizer = load_pretrained(str(target), dtype=model_cfg.get("dtype") or "float32")
        return model.eval(), tokenizer, json.loads((target / "warmstart.json").read_text())
    lap = Laps()
    sets = {d: load_split(world_dir, d, eval_split(world_dir, d), limit=cfg.eval_limit) for d in DATASETS}
    # The pretrained model first, before the supervised pass changes its weights in place: the
    # paper's untuned rows (its prompt, free generation; one forced search with the question).
    zero_shot = evaluate_policy(model, tokenizer, retriever, sets, rcfg)
    zero_shot_rag = naive_rag(model, tokenizer, retriever, sets, rcfg)
    lap("zero_shot_s")
    titles = corpus_titles(world_dir / "corpus.jsonl")
    rows = teacher_questions(world_dir, cfg, seed)
    batch, _, first = teacher_batches(tokenizer, retriever, list(rows), titles, rcfg, cfg, seed)
    teacher_em = answer_em(batch, rows)
    lap("teacher_s")
    # `<answer>` is several tokens in a pretrained vocabulary: no answer-span weight (answer_id None),
    # and so no early answers left out either (warmstart.early_answer_loss acts on micro models only).
    curve = sft(model, batch, cfg, seed, answer_id=None, first=first)
    lap("sft_s")
    report = {"model": name, "key": key, "seed": seed, "config": asdict(cfg), "teacher_em": teacher_em,
              "questions": len(rows), "sft_loss": curve, "test": evaluate_policy(model, tokenizer, retriever, sets, rcfg)}
    report["test_em_avg"] = em_avg(report["test"])
    lap("eval_s")
    baselines = evaluate_baselines(model, tokenizer, retriever, sets, rcfg, world_dir / "corpus.jsonl",
                                   rows["golden_answers"])
    report["baselines"] = {"zero_shot": zero_shot, "zero_shot_rag": zero_shot_rag, **baselines}
    lap("baselines_s")
    report["time"], report["seconds"] = lap.times, sum(lap.times.values())
    save_warm_start(model, tokenizer, report, target)
    log.info("SFT warm start %s: teacher EM %.3f, loss %s, test EM avg %.3f (zero-shot %.3f), %.0f s", name,
             teacher_em, [round(c, 3) for c in curve], report["test_em_avg"],
             em_avg(zero_shot), report["seconds"])
    # Reloaded from what was saved: the run trains from the cached weights whether or not it built them.
    model, tokenizer = load_pretrained(str(target), dtype=model_cfg.get("dtype") or "float32")
    return model.eval(), tokenizer, report
