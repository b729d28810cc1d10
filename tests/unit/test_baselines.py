"""Forced turns through the real rollout loop, and the three baseline rows scored on known answers."""

import json

import pytest
import torch

from sapo_bench.baselines import (BASELINES, ForcedEngine, OracleEngine, common_answer, corpus_titles,
                                  evaluate_baselines, most_common_answer,
                                  naive_rag, no_search, oracle)
from sapo_bench.data import load_split
from sapo_bench.prompts import make_prompt
from sapo_bench.rewards import exact_match
from sapo_bench.rollout import ENGINES, HFEngine, RolloutConfig, ScriptedEngine, TurnOutput, rollout

CFG = RolloutConfig(max_turns=2, max_new_tokens=12, max_obs_tokens=60, max_response_tokens=200)


@pytest.fixture(scope="module")
def tiny_model(micro_tok):
    from sapo_bench.models import build_micro_model

    return build_micro_model("qwen2-micro-1m", micro_tok, seed=0).eval()


@pytest.fixture(scope="module")
def titles(small_world):
    return corpus_titles(small_world / "corpus.jsonl")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def response_ids(batch, i):
    n = int(batch.attention_mask[i].sum())
    return batch.input_ids[i, batch.prompt_lens[i]:n].tolist()


def same_batch(a, b):
    for name in ("input_ids", "attention_mask", "loss_mask", "old_logp"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.responses, a.answers, a.turns, a.searches, a.invalid, a.stats) == \
           (b.responses, b.answers, b.turns, b.searches, b.invalid, b.stats)


def test_forced_turns_appear_verbatim_and_the_policy_continues_in_their_context(tiny_model, micro_tok, bm25, titles):
    from sapo_bench.module import token_logp

    search = f"<search> {next(iter(titles.values()))} </search>"
    forced = [[search, "<answer>"],           # a whole turn, then a prefix
              ["<answer> Ann </answer>"],     # done after turn 0, while the others go on
              [None, search],                 # free, then forced
              []]                             # free throughout
    qs = ["where was ann born", "who founded the bell press?", "q", "which film came out first, a or b?"]
    engine = ForcedEngine(HFEngine(tiny_model, micro_tok, generator=torch.Generator().manual_seed(0)), forced)
    b = rollout(engine, micro_tok, bm25, qs, CFG)
    assert b.answers[1] == "Ann" and b.turns[1] == 1  # left the batch after turn 0; the others went on
    p, n = b.prompt_lens[0], int(b.attention_mask[0].sum())
    resp, mask, old = response_ids(b, 0), b.loss_mask[0, p:n].tolist(), b.old_logp[0, p:n].tolist()
    first = len(ids(micro_tok, search))
    second = mask.index(1.0, first)  # turn 1 begins after the inserted passages
    # forced tokens are the policy's to rollout (loss mask 1), with log-prob 0; the passages are masked
    assert resp[:first] == ids(micro_tok, search) and mask[:first] == [1.0] * first and old[:first] == [0.0] * first
    assert set(mask[first:second]) == {0.0} and micro_tok.decode(resp[first:second]).startswith("\n\n<information>")
    assert [resp[second]] == ids(micro_tok, "<answer>") and old[second] == 0.0 and old[second + 1] != 0.0
    assert b.responses[0].startswith(search + "\n\n<information>") and b.searches[0] == 1
    assert search in b.responses[2] and b.searches[2] == 1 and b.turns[2] == 3
    # every sampled token's log-prob is what a full forward of the final sequences gives: the
    # inner engine saw the forced tokens exactly where they stand
    lp, _, _ = token_logp(tiny_model, b.input_ids, b.attention_mask)
    sampled = b.old_logp != 0
    assert sampled.sum() > 20
    assert float(((lp.detach() - b.old_logp).abs() * sampled).max()) < 1e-4


@pytest.mark.parametrize("cut", [False, True])
def test_forcing_every_turn_is_the_scripted_engine(tiny_model, micro_tok, bm25, titles, cut):
    names = list(titles.values())
    scripts = [[f"<search> {names[0]} </search>", "<answer> Ann Lee </answer>"],
               ["<answer> Bo </answer>"],
               [f"<search> {names[1]} </search>"] * 3]  # the third is the final turn: not executed
    cfg = CFG
    if cut:  # every turn cut by a 4-token budget: invalid actions, until the final turn
        cfg = RolloutConfig(max_turns=2, max_new_tokens=4, max_response_tokens=200)
        scripts = [[f"<search> {names[0]} </search>"] * 3, ["<answer> Bo Dee Lee </answer>"] * 3]
    qs = [f"question {i}" for i in range(len(scripts))]
    forced = rollout(ForcedEngine(HFEngine(tiny_model, micro_tok, greedy=True), scripts), micro_tok, bm25, qs, cfg)
    same_batch(forced, rollout(ScriptedEngine(micro_tok, scripts), micro_tok, bm25, qs, cfg))
    assert forced.invalid == ([2, 2] if cut else [0, 0, 0])


def test_forcing_nothing_is_the_plain_engine(tiny_model, micro_tok, bm25):
    qs = ["where was ann born", "who founded the bell press?", "what?"]

    def engine():
        return HFEngine(tiny_model, micro_tok, generator=torch.Generator().manual_seed(3))

    forced = rollout(ForcedEngine(engine(), [[None, None], [], [None] * 5]), micro_tok, bm25, qs, CFG)
    same_batch(forced, rollout(engine(), micro_tok, bm25, qs, CFG))


def test_a_prefix_is_continued_by_the_inner_engine_with_the_rest_of_the_budget(micro_tok, bm25):
    inner = ScriptedEngine(micro_tok, [[" Ann </answer>"], [" a very long answer indeed </answer>"]])
    b = rollout(ForcedEngine(inner, [["<answer>"], ["<answer>"]]), micro_tok, bm25, ["q0", "q1"],
                RolloutConfig(max_turns=0, max_new_tokens=8))
    assert b.responses[0] == "<answer> Ann </answer>" and b.answers == ["Ann", None]
    assert len(response_ids(b, 1)) == 8  # "<answer>" took one token of the eight, the inner engine the rest


def test_forced_turns_must_cover_the_batch(micro_tok, bm25):
    with pytest.raises(ValueError, match="forced turns for 1 episodes, the batch has 2"):
        rollout(ForcedEngine(ScriptedEngine(micro_tok, [[], []]), [[None]]), micro_tok, bm25, ["a", "b"], CFG)


# --- the baselines -------------------------------------------------------------------------------


class Recording:
    """A retriever that remembers its queries."""

    def __init__(self, inner):
        self.inner, self.queries = inner, []

    def search(self, queries, k=3):
        self.queries += list(queries)
        return self.inner.search(queries, k)


class Knower:
    """A test backend that reads its context and answers the gold answer of the questions at even
    positions of the set, "nobody" at the others."""

    def __init__(self, tok, golds: dict[str, tuple[int, str]]):
        self.tok, self.golds = tok, golds

    def start(self, prompts):
        self.prompts = [self.tok.decode(p) for p in prompts]
        self.context = list(self.prompts)
        self.slots = list(range(len(prompts)))

    def answer(self, ep):
        pos, gold = self.golds[self.prompts[ep]]
        return gold if pos % 2 == 0 else "nobody"

    def generate(self, max_new):
        outs = []
        for ep, budget in zip(self.slots, max_new):
            toks = ids(self.tok, f" {self.answer(ep)} </answer>")[:budget]
            self.context[ep] += self.tok.decode(toks)
            outs.append(TurnOutput(toks, [-1.0] * len(toks), "stop"))
        return outs

    def keep(self, episodes):
        self.slots = list(episodes)

    def append(self, token_lists):
        for ep, t in zip(self.slots, token_lists):
            self.context[ep] += self.tok.decode(t)

    def after_prompts(self):
        """(what followed the prompt, the answer it gave) per episode."""
        return [(c[len(p):], self.answer(ep)) for ep, (p, c) in enumerate(zip(self.prompts, self.context))]


@pytest.fixture
def knower(small_world):
    nq = load_split(small_world, "nq", "test", limit=5)
    golds = {make_prompt(q, CFG.template): (i, g[0]) for i, (q, g) in enumerate(zip(nq["question"], nq["golden_answers"]))}
    made = []

    def factory(model, tokenizer, **sampling):
        made.append(Knower(tokenizer, golds))
        return made[-1]

    ENGINES["knower"] = factory
    try:
        yield {"nq": nq}, made
    finally:
        del ENGINES["knower"]


def test_no_search_answers_from_the_question_alone(micro_tok, bm25, knower):
    sets, made = knower
    retriever = Recording(bm25)
    cfg = RolloutConfig(max_turns=2, max_new_tokens=40, max_response_tokens=400, backend="knower")
    res = no_search(torch.nn.Linear(1, 1), micro_tok, retriever, sets, cfg, batch_size=2)
    assert res == {"nq": {"em": pytest.approx(0.6), "f1": pytest.approx(0.6), "n": 5}}  # questions 0, 2 and 4
    assert retriever.queries == [] and len(made) == 3  # batches of 2, 2 and 1
    for e in made:
        for after, answer in e.after_prompts():
            assert after == f"<answer> {answer} </answer>"  # the forced "<answer>", then the policy's own words


def test_naive_rag_searches_the_question_once_then_answers(micro_tok, bm25, knower):
    sets, made = knower
    retriever = Recording(bm25)
    cfg = RolloutConfig(max_turns=3, max_new_tokens=40, max_response_tokens=400, backend="knower")
    res = naive_rag(torch.nn.Linear(1, 1), micro_tok, retriever, sets, cfg, batch_size=64)
    assert res["nq"]["em"] == pytest.approx(0.6) and res["nq"]["n"] == 5
    assert retriever.queries == list(sets["nq"]["question"])
    for q, (after, answer) in zip(sets["nq"]["question"], made[0].after_prompts()):
        assert after.startswith(f"<search> {q} </search>\n\n<information>Doc 1(Title: ")
        assert after.endswith(f"</information>\n\n<answer> {answer} </answer>") and after.count("<search>") == 1


def test_the_oracle_searches_the_chain_and_copies_the_answer_only_when_it_read_the_evidence(micro_tok, bm25,
                                                                                           small_world, titles):
    sets = {d: load_split(small_world, d, "test" if d == "nq" else "dev", limit=6) for d in ("nq", "musique")}
    retriever = Recording(bm25)
    res = oracle(micro_tok, retriever, sets, CFG, titles, batch_size=4)
    assert res == {d: {"em": 1.0, "f1": 1.0, "n": 6} for d in sets}
    expected = []  # per batch: every episode's first query, then the second ones of the two-passage chains
    for d, ds in sets.items():
        chains = [json.loads(m)["chain"] for m in ds["metadata"]]
        assert all(len(c) == (1 if d == "nq" else 2) for c in chains)
        for s in (0, 4):
            expected += [titles[c[k]] for k in (0, 1) for c in chains[s:s + 4] if len(c) > k]
    assert retriever.queries == expected
    # passages cut to 2 tokens hold no evidence: it says it does not know
    short = RolloutConfig(max_turns=2, max_new_tokens=12, max_obs_tokens=2, max_response_tokens=200)
    assert oracle(micro_tok, bm25, sets, short, titles)["nq"]["em"] == 0.0
    # one searching turn for a two-passage chain: only the first is searched, and the answer is copied
    # only where that search happened to return the second hop's evidence too (on this world: nowhere)
    rows = list(sets["musique"])
    b = rollout(OracleEngine(micro_tok, rows, titles, max_turns=1), micro_tok, bm25, [r["question"] for r in rows],
                RolloutConfig(max_turns=1, max_new_tokens=40))
    assert b.searches == [1] * 6 and b.answers.count("unknown") >= 1
    for row, response, answer in zip(rows, b.responses, b.answers):
        read = response.rsplit("<answer>", 1)[0]
        found = all(ev["text"] in read for ev in json.loads(row["metadata"])["evidence"])
        assert answer == (row["golden_answers"][0] if found else "unknown")


def test_evaluate_baselines_names_every_baseline_in_order(tiny_model, micro_tok, bm25, small_world):
    sets = {"nq": load_split(small_world, "nq", "test", limit=2)}
    res = evaluate_baselines(tiny_model, micro_tok, bm25, sets, CFG, small_world / "corpus.jsonl",
                             [["yes"], ["no"], ["yes"], ["Ann Lee"]])
    assert list(res) == list(BASELINES) == ["common_answer", "no_search", "naive_rag", "oracle"]
    assert all(r["nq"]["n"] == 2 and 0 <= r["nq"]["em"] <= 1 for r in res.values())
    assert res["oracle"]["nq"]["em"] == 1.0


def test_common_answer_says_the_train_mix_s_most_common_gold_to_every_question(micro_tok, bm25, small_world):
    assert most_common_answer([["Ann Lee", "Ann B. Lee"], ["yes"], ["Ann Lee"], ["no"]]) == "ann lee"
    sets = {"nq": load_split(small_world, "nq", "test", limit=6)}
    gold = sets["nq"]["golden_answers"][0][0]
    res = common_answer(micro_tok, bm25, sets, CFG, gold)
    expected = sum(exact_match(gold, g) for g in sets["nq"]["golden_answers"]) / 6
    assert res["nq"]["n"] == 6 and res["nq"]["em"] == pytest.approx(expected) and expected > 0
