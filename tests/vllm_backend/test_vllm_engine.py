"""The vLLM engine against transformers: log-probs, seeds, stop strings, multi-turn masks, weight sync."""

import pytest
import torch

from sapo_bench.models import build_micro_model
from sapo_bench.module import token_logp
from sapo_bench.prompts import make_prompt, observation
from sapo_bench.rollout import (EngineOutOfSync, HFEngine, RolloutConfig, engine_exact_logp, make_engine, rollout,
                                sync_engine)

from bigram import bigram_model, script_bigram

pytestmark = pytest.mark.vllm

QUESTIONS = ["where was ann born", "Who founded the Bell Press?", "q", "Which film came out first, A or B?"]
# The scripted episode, token by token: search " born" (stopped by the added token "</search>"),
# read, then answer "Bo" and close with "</answer>" spelled in five byte pieces, which only a
# stop check on the decoded text sees.
SEARCH = [("?Ċ", "<search>"), ("<search>", "Ġborn"), ("Ġborn", "</search>")]
ANSWER = [("ĊĊ", "<answer>"), ("<answer>", "ĠB"), ("ĠB", "o"), ("o", "<"), ("<", "/"), ("/", "an"),
          ("an", "swer"), ("swer", ">")]


def vllm_engine(model, tok, **sampling):
    return make_engine("vllm", model, tok, **sampling)


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


@pytest.fixture(scope="module")
def random_models(micro_tok):
    return {f: build_micro_model(f"{f}-micro-1m", micro_tok, seed=0).eval() for f in ("qwen2", "llama")}


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_sampled_logps_equal_a_transformers_forward_of_the_final_sequences(family, random_models, micro_tok, bm25):
    model = random_models[family]
    cfg = RolloutConfig(max_turns=2, max_new_tokens=12, max_response_tokens=200, backend="vllm")
    b = rollout(vllm_engine(model, micro_tok, generator=torch.Generator().manual_seed(0)), micro_tok, bm25,
                QUESTIONS, cfg)
    assert b.loss_mask.sum() > 40 and max(b.turns) == 3  # several turns: each one resubmitted
    lp, _, _ = token_logp(model, b.input_ids, b.attention_mask)
    diff = ((lp - b.old_logp).abs() * b.loss_mask).max()
    assert float(diff) < 1e-4, float(diff)
    # Later turns were served from the prefix cache (32-token blocks of earlier turns).
    assert b.stats["rollout/prefix_cached_frac"] > 0.2


def test_tempered_logps_are_the_tempered_distributions(random_models, micro_tok, bm25):
    model = random_models["qwen2"]
    cfg = RolloutConfig(max_turns=1, max_new_tokens=10, max_response_tokens=100, temperature=0.7, backend="vllm")
    b = rollout(vllm_engine(model, micro_tok, temperature=0.7, generator=torch.Generator().manual_seed(0)),
                micro_tok, bm25, QUESTIONS, cfg)
    lp, _, _ = token_logp(model, b.input_ids, b.attention_mask, 0.7)
    assert float(((lp - b.old_logp).abs() * b.loss_mask).max()) < 1e-4
    with pytest.raises(ValueError, match="temperature 0.7 with top_p 0.9"):
        vllm_engine(model, micro_tok, temperature=0.7, top_p=0.9)


def test_the_same_seed_gives_the_same_episodes_and_another_seed_others(random_models, micro_tok, bm25):
    model = random_models["llama"]
    cfg = RolloutConfig(max_turns=2, max_new_tokens=10, max_response_tokens=120, backend="vllm")

    def run(seed):
        engine = vllm_engine(model, micro_tok, generator=torch.Generator().manual_seed(seed))
        return rollout(engine, micro_tok, bm25, QUESTIONS, cfg)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.old_logp, b.old_logp)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_greedy_rollouts_equal_the_hf_engines(random_models, micro_tok, bm25):
    cfg = RolloutConfig(max_turns=2, max_new_tokens=10, max_response_tokens=120)
    for model in random_models.values():
        hf = rollout(HFEngine(model, micro_tok, greedy=True), micro_tok, bm25, QUESTIONS, cfg)
        vl = rollout(vllm_engine(model, micro_tok, greedy=True), micro_tok, bm25, QUESTIONS, cfg)
        assert vl.responses == hf.responses
        assert torch.equal(vl.input_ids, hf.input_ids) and torch.equal(vl.loss_mask, hf.loss_mask)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_a_scripted_episode_has_the_hf_engines_tokens_masks_and_turns(family, micro_tok, bm25):
    model = bigram_model(micro_tok, family, SEARCH + ANSWER)
    cfg = RolloutConfig(max_turns=2, max_new_tokens=40, max_obs_tokens=400, max_response_tokens=600)
    qs = ["where was ann born", "who founded the bell press"]
    hf = rollout(HFEngine(model, micro_tok, greedy=True), micro_tok, bm25, qs, cfg)
    vl = rollout(vllm_engine(model, micro_tok, generator=torch.Generator().manual_seed(0)), micro_tok, bm25, qs, cfg)
    assert vl.searches == hf.searches == [1, 1] and vl.turns == hf.turns == [2, 2]
    assert vl.answers == hf.answers == ["Bo", "Bo"]
    for key in ("input_ids", "attention_mask", "loss_mask"):
        assert torch.equal(getattr(vl, key), getattr(hf, key)), key
    assert vl.prompt_lens == hf.prompt_lens and vl.responses == hf.responses
    assert float((vl.old_logp - hf.old_logp).abs().max()) < 1e-4
    # masks: the 3 + 8 scripted tokens are the policy's, the observation between them is not
    assert vl.loss_mask.sum(-1).tolist() == [11.0, 11.0]
    generated = vl.input_ids[0][vl.loss_mask[0].bool()].tolist()
    assert decode(micro_tok, generated) == "<search> born</search><answer> Bo</answer>"
    assert "<information>" in vl.responses[0] and vl.responses[0].endswith("</answer>")


def test_stop_strings_end_the_turn_on_the_token_that_completes_them_then_eos_and_length(micro_tok):
    model = bigram_model(micro_tok, "qwen2", SEARCH + ANSWER + [(">", "Ġborn")])  # would go on after ">"
    prompt = micro_tok(make_prompt("where was ann born", "micro"), add_special_tokens=False)["input_ids"]
    obs = micro_tok(observation("Doc 1(Title: Ann) Ann was born in Bo.", "micro"), add_special_tokens=False)["input_ids"]
    for engine in (HFEngine(model, micro_tok, greedy=True), vllm_engine(model, micro_tok, greedy=True)):
        engine.start([prompt, prompt])
        first = engine.generate([40, 2])
        assert decode(micro_tok, first[0].tokens) == "<search> born</search>" and first[0].reason == "stop"
        assert decode(micro_tok, first[1].tokens) == "<search> born" and first[1].reason == "length"
        engine.keep([0])
        engine.append([obs])
        second = engine.generate([40])[0]
        # "</answer>" in byte pieces: cut right after ">", nothing generated past it
        assert decode(micro_tok, second.tokens) == "<answer> Bo</answer>" and second.reason == "stop"
        assert len(second.logps) == len(second.tokens) == 8
    eos = [("?Ċ", micro_tok.eos_token)]
    script_bigram(model, micro_tok, eos)
    for engine in (HFEngine(model, micro_tok, greedy=True), vllm_engine(model, micro_tok, greedy=True)):
        engine.start([prompt])
        out = engine.generate([40])[0]
        assert out.tokens == [micro_tok.eos_token_id] and out.reason == "eos"


def test_weights_are_pushed_after_an_update_and_checked(random_models, micro_tok, bm25):
    model = build_micro_model("qwen2-micro-1m", micro_tok, seed=3).eval()
    cfg = RolloutConfig(max_turns=1, max_new_tokens=8, max_response_tokens=60, backend="vllm")
    rollout(vllm_engine(model, micro_tok, generator=torch.Generator().manual_seed(0)), micro_tok, bm25, QUESTIONS, cfg)
    assert not engine_exact_logp("vllm") and engine_exact_logp("hf")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([[5, 6, 7, 8]])
    lp, _, _ = token_logp(model, ids, torch.ones_like(ids))
    (-lp.sum()).backward()
    opt.step()  # an in-place update, as training does
    metrics = sync_engine("vllm", model)
    assert metrics["rollout/sync_parity_gap"] < 1e-3 and metrics["time/sync_s"] > 0
    again = sync_engine("vllm", model)  # nothing changed: checked, not pushed
    assert again["rollout/sync_parity_gap"] == pytest.approx(metrics["rollout/sync_parity_gap"], abs=1e-6)
    b = rollout(vllm_engine(model, micro_tok, generator=torch.Generator().manual_seed(1)), micro_tok, bm25,
                QUESTIONS, cfg)
    new, _, _ = token_logp(model, b.input_ids, b.attention_mask)
    assert float(((new - b.old_logp).abs() * b.loss_mask).max()) < 1e-4
    # An update that nobody syncs is still seen: the next engine pushes it (weights' version counters).
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    b = rollout(vllm_engine(model, micro_tok, generator=torch.Generator().manual_seed(2)), micro_tok, bm25,
                QUESTIONS, cfg)
    new, _, _ = token_logp(model, b.input_ids, b.attention_mask)
    assert float(((new - b.old_logp).abs() * b.loss_mask).max()) < 1e-4


def test_a_push_without_the_tied_lm_head_fails_the_parity_check_loudly(micro_tok, bm25, monkeypatch):
    from sapo_bench import vllm_engine as ve

    model = build_micro_model("qwen2-micro-1m", micro_tok, seed=4).eval()  # tied embeddings, as Qwen2.5-3B
    vllm_engine(model, micro_tok, greedy=True)
    runner = ve.VLLMBackend().runner()
    # named_parameters() lists a tied head once, under the embedding's name: vLLM's CPU build then
    # loads the embedding, keeps its old LM head and reports success.
    monkeypatch.setattr(runner, "weights", lambda m: list(m.named_parameters()))
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(torch.randn_like(model.get_input_embeddings().weight) * 0.05)
    with pytest.raises(EngineOutOfSync, match=r"differ from the training forward's by up to .*stale or partial"):
        sync_engine("vllm", model)
    monkeypatch.undo()  # the whole state dict, tied head included: in sync again
    assert sync_engine("vllm", model)["rollout/sync_parity_gap"] < 1e-3


def test_bad_options_are_clear_errors(random_models, micro_tok):
    model = random_models["qwen2"]
    with pytest.raises(ValueError, match=r"unknown rollout.engine_options.vllm option\(s\) 'tp'; valid: tensor_"):
        make_engine("vllm", model, micro_tok, options={"tp": 2})
    with pytest.raises(ValueError, match="sleep mode is not available"):
        make_engine("vllm", model, micro_tok, options={"sleep": True})
    with pytest.raises(ValueError, match="multiple of 32"):
        make_engine("vllm", model, micro_tok, options={"block_size": 16})
