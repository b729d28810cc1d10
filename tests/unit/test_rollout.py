"""The episode loop with a scripted engine (exact), and the KV-cache engine against references."""

import importlib.util
import json
import logging

import pytest
import torch

from sapo_bench.prompts import INVALID_ACTION, make_prompt
from sapo_bench.rollout import HFEngine, RolloutConfig, ScriptedEngine, parse_action, rollout

CFG = RolloutConfig(max_turns=2, max_new_tokens=40, max_obs_tokens=400, max_response_tokens=1000)


def run(tok, retriever, scripts, cfg=CFG, questions=None):
    questions = questions or [f"question {i}" for i in range(len(scripts))]
    return rollout(ScriptedEngine(tok, scripts), tok, retriever, questions, cfg)


def generated_text(tok, batch, i):
    ids = batch.input_ids[i][batch.loss_mask[i].bool()]
    return tok.decode(ids.tolist(), skip_special_tokens=True)


def inserted_text(tok, batch, i):
    keep = batch.attention_mask[i].bool() & ~batch.loss_mask[i].bool()
    keep[: batch.prompt_lens[i]] = False
    return tok.decode(batch.input_ids[i][keep].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("text,action", [
    ("<think> x </think>\n<search> Ann Lee </search>", ("search", "Ann Lee")),
    ("<answer> Paris </answer> <search> late </search>", ("answer", "Paris")),
    ("<search> a </answer>", (None, "")),
    ("no tags", (None, "")),
])
def test_parse_action_takes_the_first_complete_action(text, action):
    assert parse_action(text) == action


@pytest.fixture(scope="module")
def title(small_world):
    first = json.loads((small_world / "corpus.jsonl").read_text().splitlines()[0])
    return first["contents"].split("\n", 1)[0]


def test_search_then_answer_masks_exactly_the_inserted_passages(micro_tok, bm25, title):
    scripts = [[f"<think> find it </think>\n<search> {title} </search>", "<answer> Ann </answer>"]]
    b = run(micro_tok, bm25, scripts)
    assert (b.searches, b.invalid, b.turns, b.answers) == ([1], [0], [2], ["Ann"])
    assert generated_text(micro_tok, b, 0) == "".join(scripts[0])
    obs = inserted_text(micro_tok, b, 0)
    assert obs.startswith("\n\n<information>Doc 1(Title: ") and obs.endswith("</information>\n\n")
    assert f"Doc 1(Title: {title})" in obs  # BM25 finds the entity's own passage first
    assert b.responses[0] == scripts[0][0] + obs + scripts[0][1]
    prompt = micro_tok.decode(b.input_ids[0, : b.prompt_lens[0]].tolist())
    assert prompt == make_prompt("question 0")
    assert float(b.loss_mask[0, : b.prompt_lens[0]].sum()) == 0


def test_invalid_action_inserts_feedback_and_the_answer_comes_from_generated_text(micro_tok, bm25):
    b = run(micro_tok, bm25, [["I am not sure", "<answer> Bo </answer>"], ["still unsure", "unsure", "unsure"]])
    assert b.invalid == [1, 2] and b.searches == [0, 0]
    assert inserted_text(micro_tok, b, 0) == INVALID_ACTION
    assert b.answers == ["Bo", None]  # the feedback's own "<answer> and </answer>" is never an answer


def test_turn_limit_then_one_final_turn_without_search(micro_tok, bm25, title):
    search = f"<search> {title} </search>"
    b = run(micro_tok, bm25, [[search] * 5])
    # max_turns = 2 searching turns, then one final turn whose search is not executed
    assert b.turns == [3] and b.searches == [2]
    assert b.responses[0].count("<information>") == 2 and b.responses[0].endswith(search)
    assert b.answers == [None]


def test_observation_and_response_budgets_are_enforced_and_counted(micro_tok, bm25, title):
    cfg = RolloutConfig(max_turns=3, max_new_tokens=40, max_obs_tokens=10, max_response_tokens=400)
    b = run(micro_tok, bm25, [[f"<search> {title} </search>", "<answer> a </answer>"]], cfg)
    inserted = b.attention_mask[0].sum() - b.prompt_lens[0] - b.loss_mask[0].sum()
    assert int(inserted) == 10 and b.stats["rollout/obs_truncated"] == 1.0
    cfg = RolloutConfig(max_turns=3, max_new_tokens=40, max_obs_tokens=200, max_response_tokens=30)
    b = run(micro_tok, bm25, [[f"<search> {title} </search>"] * 4], cfg)
    assert int(b.attention_mask[0].sum()) - b.prompt_lens[0] == 30
    assert b.stats["rollout/context_truncated"] == 1.0
    cfg = RolloutConfig(max_new_tokens=3)
    b = run(micro_tok, bm25, [["<answer> a long answer </answer>"]], cfg)
    # the cut turn has no complete action: feedback, then the script is over (end of sequence)
    assert int(b.loss_mask[0].sum()) == 3 + 1 and b.invalid == [1] and b.answers == [None]


def test_eos_ends_the_episode_and_prompts_are_cut_from_the_left(micro_tok, bm25):
    b = run(micro_tok, bm25, [[]])
    assert b.turns == [1] and b.input_ids[0, b.prompt_lens[0]] == micro_tok.eos_token_id
    cfg = RolloutConfig(max_prompt_tokens=20)
    b = run(micro_tok, bm25, [["<answer> a </answer>"]], cfg, questions=["what is the capital of nowhere"])
    assert b.prompt_lens == [20] and b.stats["rollout/prompt_truncated"] == 1.0
    assert micro_tok.decode(b.input_ids[0, :20].tolist()).endswith("what is the capital of nowhere?\n")


@pytest.fixture(scope="module")
def tiny_model(micro_tok):
    from sapo_bench.models import build_micro_model

    return build_micro_model("qwen2-micro-1m", micro_tok, seed=0).eval()


def test_sampled_logps_equal_a_full_forward_of_the_final_sequences(tiny_model, micro_tok, bm25):
    from sapo_bench.module import token_logp

    qs = ["where was ann born", "Who founded the Bell Press?", "q", "Which film came out first, A or B?"]
    engine = HFEngine(tiny_model, micro_tok, generator=torch.Generator().manual_seed(0))
    b = rollout(engine, micro_tok, bm25, qs, RolloutConfig(max_turns=2, max_new_tokens=12, max_response_tokens=200))
    assert b.loss_mask.sum() > 20
    lp, _, _ = token_logp(tiny_model, b.input_ids, b.attention_mask)
    diff = ((lp.detach() - b.old_logp).abs() * b.loss_mask).max()
    assert float(diff) < 1e-4


def test_batched_greedy_rollout_equals_each_episode_alone(tiny_model, micro_tok, bm25):
    qs = ["where was ann born", "Who founded the Bell Press?", "what?", "Are A and B headquartered in the same city?"]
    cfg = RolloutConfig(max_turns=2, max_new_tokens=10, max_response_tokens=120)
    together = rollout(HFEngine(tiny_model, micro_tok, greedy=True), micro_tok, bm25, qs, cfg)
    for i, q in enumerate(qs):
        alone = rollout(HFEngine(tiny_model, micro_tok, greedy=True), micro_tok, bm25, [q], cfg)
        assert together.responses[i] == alone.responses[0]
        n = int(alone.attention_mask[0].sum())
        assert together.input_ids[i, :n].tolist() == alone.input_ids[0, :n].tolist()


def test_sampling_draws_from_the_tempered_distribution_and_respects_top_p(tiny_model, micro_tok):
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.log().expand(40000, 4)
    tok, logp = HFEngine(tiny_model, micro_tok, generator=torch.Generator().manual_seed(0))._sample(logits)
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    assert torch.allclose(freq, probs, atol=0.01) and freq[3] == 0
    assert torch.allclose(logp, probs.log()[tok])  # the behaviour log-prob of what was drawn
    nucleus = HFEngine(tiny_model, micro_tok, top_p=0.6, generator=torch.Generator().manual_seed(0))
    tok, _ = nucleus._sample(logits)
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    assert freq[2] == 0 and freq[3] == 0 and abs(float(freq[0]) - 0.5 / 0.8) < 0.01


def test_rollout_backends_are_looked_up_by_name(tiny_model, micro_tok, small_world, bm25):
    from sapo_bench import rollout as rollout_mod
    from sapo_bench.data import load_split
    from sapo_bench.evaluate import evaluate_policy

    with pytest.raises(ValueError, match="unknown rollout backend 'nope'; valid: hf, vllm"):
        RolloutConfig(backend="nope")
    with pytest.raises(ValueError, match="engine_options names unknown backend.*'vlm'"):
        RolloutConfig(engine_options={"vlm": {}})
    calls = []

    def counting(model, tokenizer, **sampling):  # a third-party backend: HFEngine, counting its turns
        engine = HFEngine(model, tokenizer, **sampling)
        generate = engine.generate
        engine.generate = lambda max_new: calls.append(len(max_new)) or generate(max_new)
        return engine

    rollout_mod.register_engine("counting")(counting)
    try:
        with pytest.raises(ValueError, match="already registered"):
            rollout_mod.register_engine("counting")(counting)
        sets = {"nq": load_split(small_world, "nq", "test", limit=3)}
        cfg = RolloutConfig(max_turns=1, max_new_tokens=4, backend="counting")
        assert evaluate_policy(tiny_model, micro_tok, bm25, sets, cfg)["nq"]["n"] == 3
        assert calls and calls[0] == 3
    finally:
        del rollout_mod.ENGINES["counting"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_without_vllm_says_how_to_install_it_and_a_fallback_is_taken_with_a_warning(caplog):
    from sapo_bench.rollout import BackendUnavailable

    with pytest.raises(BackendUnavailable, match=r"vLLM is not installed .*`make install-vllm` builds .venv-vllm"):
        RolloutConfig(backend="vllm")
    with caplog.at_level(logging.WARNING, logger="sapo_bench"):
        cfg = RolloutConfig(backend="vllm", fallback="hf")
    assert cfg.backend == "hf"
    assert "rollout.backend=vllm cannot run here" in caplog.text and "make install-vllm" in caplog.text


def test_the_hf_engine_stops_on_a_stop_string_spelled_in_byte_pieces(tiny_model, micro_tok):
    """The micro tokenizer has "</answer>" as one token, but a policy can also write it in pieces."""
    engine = HFEngine(tiny_model, micro_tok)
    pieces = [micro_tok.convert_tokens_to_ids(t) for t in ("<", "/", "an", "swer", ">")]
    assert micro_tok.decode(pieces) == "</answer>" and None not in pieces
    assert engine._stopped(micro_tok("<answer> Bo", add_special_tokens=False)["input_ids"] + pieces)
    assert not engine._stopped(pieces[:-1])
