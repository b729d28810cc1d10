"""The warm start's teacher questions: exactly the runs' train set, never a held-out question."""

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
