"""Baseline rows for the micro tables, scored by the evaluation code on the warm start's questions.

    scores = evaluate_baselines(model, tokenizer, retriever, sets, rcfg, world_dir / "corpus.jsonl")

* `no_search`: the policy's only turn is forced to open with `<answer>`, so it answers from the
  question alone (the SAPO paper's "Direct Generation" row).
* `naive_rag`: the first turn is forced to search the question itself, the retriever's top-k is
  inserted as in any rollout, and the next turn is forced to open with `<answer>`.
* `common_answer`: no model. Every question gets the most common gold answer of the train mix
  (what a policy that ignores the question would learn to say); the world bounds it (world.py).
* `oracle`: no model. It searches the titles of the question's chain passages in order and
  copies the first gold answer if every evidence string was in what it read, else answers
  `unknown`: the ceiling of a policy that asks the ideal queries and copies what it retrieved.

Every baseline runs through `rollout()` (same prompts, budgets, retriever and observation cuts as
RL and the warm-start row) and is scored by `evaluate.evaluate_batches`, greedy, batch by batch.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from sapo_bench.evaluate import evaluate_batches
from sapo_bench.rollout import RolloutConfig, ScriptedEngine, TurnOutput, make_engine, parse_action, rollout

BASELINES = {"common_answer": "Most common train answer",
             "no_search": "Direct answer (no search)",
             "naive_rag": "Naive RAG (one search with the question)",
             "oracle": "Oracle chain (teacher, ceiling)"}
# The pretrained model's own rows, scored before its supervised pass (sapo_bench/realstart.py):
# the SAPO paper's untuned rows. Only the micro_real experiment's warm starts report them.
PRETRAINED_BASELINES = {"zero_shot": "Zero-shot (pretrained, no fine-tuning)",
                        "zero_shot_rag": "Naive RAG, pretrained (no fine-tuning)"}
ANSWER_PREFIX = "<answer>"
UNKNOWN = "unknown"


class ForcedEngine:
    """Wraps an engine and writes some of its turns in advance, in whole or in part.

    forced[episode][turn] is None (the inner engine generates the turn), a text holding a complete
    action such as "<search> q </search>" (the turn is exactly that text; nothing is generated), or
    any other text, a prefix such as "<answer>" (the inner engine writes the rest of the turn with
    what is left of its budget). Forced tokens have log-prob 0; turns past an episode's list are
    free. The inner engine is fed every forced token, so later turns see the context they would
    have seen had the policy written those tokens itself.
    """

    def __init__(self, inner, forced: list[list[str | None]], tokenizer=None):
        self.inner = inner
        self.tok = tokenizer if tokenizer is not None else getattr(inner, "tok", None)
        if self.tok is None:
            raise ValueError("ForcedEngine needs a tokenizer: pass tokenizer=, or wrap an engine that has .tok")
        # (whole action?, token ids) per forced turn, tokenised as ScriptedEngine does
        self.forced = [[None if t is None else (parse_action(t)[0] is not None,
                                                self.tok(t, add_special_tokens=False)["input_ids"])
                        for t in turns] for turns in forced]

    def start(self, prompts: list[list[int]]) -> None:
        if len(prompts) != len(self.forced):
            raise ValueError(f"ForcedEngine has forced turns for {len(self.forced)} episodes, the batch has "
                             f"{len(prompts)}")
        self.slots = list(range(len(prompts)))
        self.turn = [0] * len(prompts)
        # Whole forced turns not yet fed to the inner engine: they go in with the next insertion,
        # as a generated turn's last token does in HFEngine, so that no forward is spent on them alone.
        self.unfed: dict[int, list[int]] = {}
        self.inner.start(prompts)

    def _plan(self, episode: int) -> tuple[bool, list[int]] | None:
        turns, k = self.forced[episode], self.turn[episode]
        self.turn[episode] += 1
        return turns[k] if k < len(turns) else None

    def generate(self, max_new: list[int]) -> list[TurnOutput]:
        plans = [self._plan(ep) for ep in self.slots]
        prefixes, budgets = [], []
        for ep, plan, budget in zip(self.slots, plans, max_new):
            if plan is None:
                prefixes.append([])
                budgets.append(budget)
                continue
            whole, ids = plan
            ids = ids[:budget]
            if whole or len(ids) >= budget:  # nothing left to generate: the turn is the forced text
                self.unfed[ep] = ids
                prefixes.append([])
                budgets.append(0)
            else:
                prefixes.append(ids)
                budgets.append(budget - len(ids))
        # A prefix must be in the inner engine's context before it generates the rest of the turn.
        if any(prefixes):
            self.inner.append(prefixes)
        free = (self.inner.generate(budgets) if any(b > 0 for b in budgets)
                else [TurnOutput([], [], "length") for _ in budgets])
        outs = []
        for ep, plan, prefix, budget, out in zip(self.slots, plans, prefixes, budgets, free):
            if plan is None:
                outs.append(out)
            elif budget == 0:
                whole, ids = plan
                forced = self.unfed[ep]
                outs.append(TurnOutput(list(forced), [0.0] * len(forced),
                                       "stop" if whole and len(forced) == len(ids) else "length"))
            else:
                outs.append(TurnOutput(prefix + out.tokens, [0.0] * len(prefix) + out.logps, out.reason))
        return outs

    def keep(self, episodes: list[int]) -> None:
        self.inner.keep(episodes)
        self.slots = list(episodes)
        self.unfed = {e: self.unfed[e] for e in episodes if e in self.unfed}

    def append(self, token_lists: list[list[int]]) -> None:
        self.inner.append([self.unfed.pop(ep, []) + list(t) for ep, t in zip(self.slots, token_lists)])


def _metadata(row: dict) -> dict:
    meta = row["metadata"]
    return json.loads(meta) if isinstance(meta, str) else meta  # JSON text in a loaded Dataset


class OracleEngine:
    """The ceiling row's actor: no model, one search per chain passage (its title), then an answer
    that depends on what the searches returned. Reads the observations through `append`."""

    def __init__(self, tokenizer, rows: list[dict], titles: dict[str, str], max_turns: int):
        self.tok = tokenizer
        metas = [_metadata(r) for r in rows]
        # Chains are at most 3 passages; a longer one than the turn limit is searched as far as it fits.
        self.queries = [[titles[pid] for pid in m["chain"][:max_turns]] for m in metas]
        self.evidence = [[ev["text"] for ev in m.get("evidence", [])] for m in metas]
        self.golds = [r["golden_answers"][0] for r in rows]

    def start(self, prompts: list[list[int]]) -> None:
        if len(prompts) != len(self.golds):
            raise ValueError(f"OracleEngine knows {len(self.golds)} questions, the batch has {len(prompts)}")
        self.slots = list(range(len(prompts)))
        self.turn = [0] * len(prompts)
        self.read = [""] * len(prompts)

    def _text(self, ep: int) -> str:
        k = self.turn[ep]
        self.turn[ep] += 1
        if k < len(self.queries[ep]):
            return f"<search> {self.queries[ep][k]} </search>"
        found = all(ev in self.read[ep] for ev in self.evidence[ep])
        return f"<answer> {self.golds[ep] if found else UNKNOWN} </answer>"

    def generate(self, max_new: list[int]) -> list[TurnOutput]:
        outs = []
        for ep, budget in zip(self.slots, max_new):
            full = self.tok(self._text(ep), add_special_tokens=False)["input_ids"]
            ids = full[:budget]
            outs.append(TurnOutput(ids, [0.0] * len(ids), "stop" if len(ids) == len(full) else "length"))
        return outs

    def keep(self, episodes: list[int]) -> None:
        self.slots = list(episodes)

    def append(self, token_lists: list[list[int]]) -> None:
        for ep, ids in zip(self.slots, token_lists):
            self.read[ep] += self.tok.decode(ids, skip_special_tokens=True)


def corpus_titles(corpus_path: str | Path) -> dict[str, str]:
    """{passage id: title}; a passage's title is the first line of its contents."""
    titles = {}
    with open(corpus_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                titles[row["id"]] = row["contents"].split("\n", 1)[0]
    return titles


def _forced_policy(model, tokenizer, retriever, sets: dict, rcfg: RolloutConfig, batch_size: int, script) -> dict:
    """The policy, greedy, with `script(question)` forcing the start of its turns."""
    model.eval()

    def run_batch(rows):
        inner = make_engine(rcfg.backend, model, tokenizer, options=rcfg.options(), greedy=True)
        engine = ForcedEngine(inner, [script(q) for q in rows["question"]], tokenizer)
        return rollout(engine, tokenizer, retriever, rows["question"], rcfg)

    return evaluate_batches(sets, run_batch, batch_size)


def no_search(model, tokenizer, retriever, sets: dict, rcfg: RolloutConfig, batch_size: int = 64) -> dict:
    """{dataset: {em, f1, n}} of the policy answering from the question alone."""
    # One turn and no other: an answer left unclosed scores 0 instead of earning a turn that may search.
    return _forced_policy(model, tokenizer, retriever, sets, replace(rcfg, max_turns=0), batch_size,
                          lambda q: [ANSWER_PREFIX])


def naive_rag(model, tokenizer, retriever, sets: dict, rcfg: RolloutConfig, batch_size: int = 64) -> dict:
    """{dataset: {em, f1, n}} of the policy answering after one search with the question as query."""
    # The answer turn is the final one, so no second search can follow whatever the policy writes.
    return _forced_policy(model, tokenizer, retriever, sets, replace(rcfg, max_turns=1), batch_size,
                          lambda q: [f"<search> {q} </search>", ANSWER_PREFIX])


def oracle(tokenizer, retriever, sets: dict, rcfg: RolloutConfig, titles: dict[str, str],
           batch_size: int = 64) -> dict:
    """{dataset: {em, f1, n}} of ideal queries plus copying the answer when it was retrieved."""

    def run_batch(rows):
        engine = OracleEngine(tokenizer, list(rows), titles, rcfg.max_turns)
        return rollout(engine, tokenizer, retriever, rows["question"], rcfg)

    return evaluate_batches(sets, run_batch, batch_size)


def most_common_answer(train_golds: list[list[str]]) -> str:
    """The train mix's most common gold answer, normalised (sapo_bench.world.shortcut_report)."""
    from sapo_bench.world import shortcut_report

    return shortcut_report([{"golden_answers": g} for g in train_golds])["common_answer"]


def common_answer(tokenizer, retriever, sets: dict, rcfg: RolloutConfig, answer: str, batch_size: int = 64) -> dict:
    """{dataset: {em, f1, n}} of answering `answer` to every question, without searching."""

    def run_batch(rows):
        engine = ScriptedEngine(tokenizer, [[f"<answer> {answer} </answer>"]] * len(rows))
        return rollout(engine, tokenizer, retriever, rows["question"], rcfg)

    return evaluate_batches(sets, run_batch, batch_size)


@torch.no_grad()
def evaluate_baselines(model, tokenizer, retriever, sets: dict, rcfg: RolloutConfig, corpus_path: str | Path,
                       train_golds: list[list[str]], batch_size: int = 64) -> dict:
    """{baseline name: {dataset: {em, f1, n}}} for every baseline of BASELINES, in its order;
    train_golds: the gold answers of the questions the warm start was taught."""
    answer = most_common_answer(train_golds)
    out = {"common_answer": common_answer(tokenizer, retriever, sets, rcfg, answer, batch_size),
           "no_search": no_search(model, tokenizer, retriever, sets, rcfg, batch_size),
           "naive_rag": naive_rag(model, tokenizer, retriever, sets, rcfg, batch_size),
           "oracle": oracle(tokenizer, retriever, sets, rcfg, corpus_titles(corpus_path), batch_size)}
    return {name: out[name] for name in BASELINES}
