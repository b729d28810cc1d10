"""The warm start's teacher questions: exactly the runs' train set, never a held-out question."""

from dataclasses import replace

import torch

from sapo_bench.data import DATASETS, TRAIN_MIX, eval_split, load_eval, load_split, load_train_and_validation
from sapo_bench.warmstart import WarmStartConfig, teacher_questions


def test_warm_start_never_teaches_a_validation_or_test_question(small_world):
    cfg = WarmStartConfig(n_val=8)
    taught = teacher_questions(small_world, cfg, seed=3)
    train, val = load_train_and_validation(small_world, TRAIN_MIX, n_val=cfg.n_val)
    assert set(taught["id"]) == set(train["id"])  # all of the runs' train set, in another order
    held = {q for ds in val.values() for q in ds["question"]}
    # HotpotQA validates on questions held out of its own train split: the case a leak would hit.
    hotpot_train = set(load_split(small_world, "hotpotqa", "train")["question"])
    assert held & hotpot_train and not held & set(taught["question"])
    tests = {q for ds in load_eval(small_world).values() for q in ds["question"]}
    dev = {q for d in DATASETS if "dev" in {eval_split(small_world, d)} for q in load_split(small_world, d, "dev")["question"]}
    assert not (tests | dev) & set(taught["question"])


def test_teacher_question_limit_takes_a_prefix_of_the_shuffled_train_set(small_world):
    all_rows = teacher_questions(small_world, WarmStartConfig(n_val=8), seed=0)
    some = teacher_questions(small_world, WarmStartConfig(n_val=8, questions=10), seed=0)
    assert some["id"] == all_rows["id"][:10]


def test_policy_weights_scale_the_answer_span_only():
    import torch

    from sapo_bench.warmstart import policy_weights

    A = 9  # the <answer> token id
    ids = torch.tensor([[1, 2, 3, 4, A, 5, 6, 7], [1, A, 2, A, 3, 4, 0, 0]])
    # second row: an <answer> inside a passage (mask 0) must not start the span
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 0, 0]], dtype=torch.float)
    w = policy_weights(ids, mask, A, 4.0)
    assert w.tolist() == [[0, 1, 1, 0, 4, 4, 4, 0], [0, 0, 0, 4, 4, 4, 0, 0]]
    assert policy_weights(ids, mask, A, 1.0) is mask and policy_weights(ids, mask, None, 4.0) is mask



def test_frequent_tokens_count_attended_positions_only():
    import torch

    from sapo_bench.warmstart import frequent_tokens

    ids = torch.tensor([[5, 6, 5, 7, 6, 5, 0, 0], [6, 7, 0, 0, 0, 0, 0, 0]])
    att = torch.tensor([[1] * 6 + [0, 0], [1, 1] + [0] * 6])
    # attended: 5 x3, 6 x3, 7 x2; the padding id 0 (x8) does not count; ties go to the lower id
    assert frequent_tokens(ids, att, 2).tolist() == [5, 6]
    assert frequent_tokens(ids, att, 3).tolist() == [5, 6, 7]


def test_policy_weights_leave_out_the_answer_after_the_tag_in_silent_rows_only():
    import torch

    from sapo_bench.warmstart import policy_weights

    A = 9
    ids = torch.tensor([[1, 2, A, 5, 6], [1, 2, A, 5, 6]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.float)
    silent = torch.tensor([True, False])
    # the silent row keeps its decision (the <answer> tag, weighted) and loses the answer after it
    assert policy_weights(ids, mask, A, 4.0, silent).tolist() == [[0, 1, 4, 0, 0], [0, 1, 4, 4, 4]]
    assert policy_weights(ids, mask, A, 1.0, silent).tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert policy_weights(ids, mask, A, 1.0, torch.tensor([False, False])) is mask


def test_teacher_marks_exactly_the_trajectories_that_stop_after_the_first_hop(small_world, micro_tok, bm25):
    import json

    from sapo_bench.baselines import corpus_titles
    from sapo_bench.rollout import RolloutConfig
    from sapo_bench.warmstart import teacher_batch

    cfg = WarmStartConfig(n_val=8, questions=60, p_stop_early=0.5)
    rows = teacher_questions(small_world, cfg, seed=0)
    batch, early = teacher_batch(micro_tok, bm25, list(rows), corpus_titles(small_world / "corpus.jsonl"),
                                 RolloutConfig(template="micro"), cfg, seed=0)
    hops = [len(json.loads(m)["chain"]) if isinstance(m, str) else len(m["chain"]) for m in rows["metadata"]]
    assert early.shape == (len(rows),) and early.any()
    for stopped, n_hops, searches in zip(early.tolist(), hops, batch.searches):
        assert searches == (1 if stopped else n_hops)
    assert not teacher_batch(micro_tok, bm25, list(rows), corpus_titles(small_world / "corpus.jsonl"),
                             RolloutConfig(template="micro"), WarmStartConfig(n_val=8, questions=60), seed=0)[1].any()


def test_cache_key_is_unchanged_by_a_later_setting_at_its_default_and_changed_otherwise(small_world, micro_tok):
    from dataclasses import asdict

    from sapo_bench.models import build_micro_model
    from sapo_bench.rollout import RolloutConfig
    from sapo_bench.warmstart import LATER_DEFAULTS, cache_key

    model = build_micro_model("qwen2-micro-1m", micro_tok, 0)
    rcfg = RolloutConfig(template="micro")

    def key(cfg):
        return cache_key(small_world, "qwen2-micro-1m", model.config.to_dict(), micro_tok, rcfg, cfg, 0)

    cfg = WarmStartConfig()
    assert set(LATER_DEFAULTS) <= set(asdict(cfg))
    assert all(getattr(cfg, k) == v for k, v in LATER_DEFAULTS.items())
    assert key(WarmStartConfig(early_answer_loss=False)) != key(cfg)
    assert key(WarmStartConfig(stop_early_from=0.8)) != key(cfg)
    assert key(WarmStartConfig(inits=2)) != key(cfg)


def test_warm_start_lock_separates_settings_and_shares_equal_ones():
    from sapo_bench.runtime import warm_start_tag

    # one lock per (model, settings): a sweep over warmstart.* builds its warm starts side by side
    assert warm_start_tag(WarmStartConfig()) == warm_start_tag(WarmStartConfig())
    assert warm_start_tag(WarmStartConfig(p_stop_early=0.2)) != warm_start_tag(WarmStartConfig())


def _teacher_batches(small_world, micro_tok, bm25, cfg):
    from sapo_bench.baselines import corpus_titles
    from sapo_bench.rollout import RolloutConfig
    from sapo_bench.warmstart import teacher_batches

    rows = list(teacher_questions(small_world, cfg, seed=0))
    return teacher_batches(micro_tok, bm25, rows, corpus_titles(small_world / "corpus.jsonl"),
                           RolloutConfig(template="micro"), cfg, seed=0)


def test_full_chain_batch_differs_from_the_stopping_one_only_where_the_teacher_stopped(small_world, micro_tok, bm25):
    cfg = WarmStartConfig(n_val=8, questions=60, p_stop_early=0.5, stop_early_from=0.5)
    late, early, first = _teacher_batches(small_world, micro_tok, bm25, cfg)
    assert early.any() and first is not None
    for i, stopped in enumerate(early.tolist()):
        a, b = late.input_ids[i][late.attention_mask[i].bool()], first.input_ids[i][first.attention_mask[i].bool()]
        assert (late.searches[i] < first.searches[i]) == stopped
        assert stopped or a.tolist() == b.tolist()


def test_sft_trains_on_the_full_chains_before_stop_early_from_and_on_the_stops_after(small_world, micro_tok, bm25):
    from sapo_bench.models import build_micro_model
    from sapo_bench.warmstart import sft

    base = dict(n_val=8, questions=24, p_stop_early=0.5, epochs=1.0, batch_size=4, warmup_steps=1)
    late, early, full = _teacher_batches(small_world, micro_tok, bm25, WarmStartConfig(**base, stop_early_from=0.5))

    def trained(batch, first=None, **over):
        model = build_micro_model("qwen2-micro-1m", micro_tok, 0)
        sft(model, batch, WarmStartConfig(**base, **over), 0, micro_tok.convert_tokens_to_ids("<answer>"), early, first)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    stops, whole = trained(late), trained(full)
    # the whole pass on the full chains is the pass on a full-chain batch; none of it, the plain pass
    assert torch.equal(trained(late, full, stop_early_from=1.0), whole)
    assert torch.equal(trained(late, full, stop_early_from=0.0), stops)
    half = trained(late, full, stop_early_from=0.5)
    assert not torch.equal(half, stops) and not torch.equal(half, whole)


def test_inits_keeps_the_warm_start_with_the_best_validation_em_and_caches_the_choice(small_world, bm25, tmp_path,
                                                                                     monkeypatch):
    import pytest

    import sapo_bench.warmstart as ws
    from sapo_bench.rollout import RolloutConfig
    from sapo_bench.settings import SettingError

    rcfg = RolloutConfig(template="micro", max_new_tokens=8, max_turns=2, max_response_tokens=120)
    one = WarmStartConfig(n_val=4, questions=16, epochs=0.5, warmup_steps=1, eval_limit=2)
    cache = tmp_path / "cache"
    built = {s: ws.warm_start("qwen2-micro-1m", small_world, bm25, rcfg, one, s, cache)[2] for s in (5, 5 + ws.INIT_STRIDE)}
    # tiny models score 0 on everything: the validation EMs are set, and the second candidate wins
    scores = iter([0.1, 0.3])
    monkeypatch.setattr(ws, "em_avg", lambda result: next(scores))
    _, _, report = ws.warm_start("qwen2-micro-1m", small_world, bm25, rcfg, replace(one, inits=2), 5, cache)
    assert report["key"] == built[5 + ws.INIT_STRIDE]["key"] and report["seed"] == 5 + ws.INIT_STRIDE
    assert [(c["seed"], c["val_em"], c["key"]) for c in report["inits"]] == [
        (5, 0.1, built[5]["key"]), (5 + ws.INIT_STRIDE, 0.3, built[5 + ws.INIT_STRIDE]["key"])]
    # started again, the choice is read back, not measured again
    monkeypatch.setattr(ws, "em_avg", lambda result: pytest.fail("the choice was measured again"))
    again = ws.warm_start("qwen2-micro-1m", small_world, bm25, rcfg, replace(one, inits=2), 5, cache)[2]
    assert again["key"] == report["key"] and again["inits"] == report["inits"]
    with pytest.raises(SettingError, match="warmstart.n_val"):
        WarmStartConfig(inits=2, n_val=0)


def test_inits_is_refused_for_a_pretrained_model_which_has_one_init(small_world, bm25):
    import pytest

    from sapo_bench.realstart import pretrained_warm_start
    from sapo_bench.rollout import RolloutConfig
    from sapo_bench.settings import SettingError

    with pytest.raises(SettingError, match="micro models only"):
        pretrained_warm_start({"name": "smollm2-135m-instruct"}, small_world, bm25, RolloutConfig(template="micro"),
                              WarmStartConfig(inits=2))
