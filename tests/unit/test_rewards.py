import pytest

from sapo_bench.rewards import (
    answer_reward, cover_exact_match, exact_match, extract_answer, f1_score, get_metric, normalize_answer,
)


@pytest.mark.parametrize("raw,norm", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  a  cat, an apple  ", "cat apple"),
    ("Théâtre", "théâtre"),
    ("there", "there"),  # 'the' only as a whole word
    ("U.S.A.", "usa"),
    ("", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("pred,golds,em", [
    ("Paris", ["paris"], 1.0),
    ("the Paris.", "Paris", 1.0),
    ("Paris, France", ["Paris"], 0.0),
    ("NYC", ["New York City", "NYC"], 1.0),
    ("", ["Paris"], 0.0),
    ("x", [], 0.0),
])
def test_exact_match(pred, golds, em):
    assert exact_match(pred, golds) == em


@pytest.mark.parametrize("pred,golds,f1", [
    ("Paris", ["Paris"], 1.0),
    ("Paris France", ["Paris"], 2 * 0.5 * 1 / 1.5),
    ("the big red dog", ["red dog", "big cat"], 2 * (2 / 3) * 1 / (2 / 3 + 1)),
    ("yes", ["no"], 0.0),
    ("yes", ["yes"], 1.0),
    ("yes it is", ["yes"], 0.0),       # gold is 'yes': only an exact 'yes' scores
    ("no", ["no way"], 0.0),           # prediction is 'no': only an exact 'no' scores
    ("noanswer", ["noanswer"], 1.0),
    ("London", ["Paris"], 0.0),
    ("", ["Paris"], 0.0),
])
def test_f1_score(pred, golds, f1):
    assert f1_score(pred, golds) == pytest.approx(f1)


@pytest.mark.parametrize("pred,golds,cem", [
    ("It is Paris, France", ["paris"], 1.0),
    ("Parisian", ["Paris"], 0.0),      # whole tokens, not substrings
    ("New York City", ["york"], 1.0),
    ("anything", [""], 0.0),            # an empty gold never covers
])
def test_cover_exact_match(pred, golds, cem):
    assert cover_exact_match(pred, golds) == cem


@pytest.mark.parametrize("response,answer", [
    ("<think>x</think><answer> Paris </answer>", "Paris"),
    ("<answer>a</answer> then <answer>b</answer>", "b"),
    ("<answer>multi\nline</answer>", "multi\nline"),
    ("no tags here", None),
    ("<answer>unclosed", None),
    ("<answer></answer>", ""),
])
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


def test_answer_reward_by_name():
    r = "<search>q</search><information>..</information><answer>the Paris</answer>"
    assert answer_reward("em", r, ["Paris"]) == 1.0
    assert answer_reward("f1", "<answer>Paris France</answer>", ["Paris"]) == pytest.approx(2 / 3)
    assert answer_reward("em", "Paris", ["Paris"]) == 0.0  # no answer tag, no reward
    with pytest.raises(ValueError, match="unknown reward 'acc'; valid: em, f1, cover_em"):
        get_metric("acc")
