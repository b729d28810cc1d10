"""Answer extraction, QA metrics and the rewards built from them (DESIGN §5).

Normalisation is SQuAD's: lower-case, drop punctuation, drop the articles a/an/the, collapse
whitespace. Every metric takes a prediction and one gold string or a list of aliases and
returns the best score over the aliases.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Iterable

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_SPECIAL = ("yes", "no", "noanswer")


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _golds(golds: str | Iterable[str]) -> list[str]:
    return [golds] if isinstance(golds, str) else list(golds)


def exact_match(pred: str, golds: str | Iterable[str]) -> float:
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in _golds(golds)))


def cover_exact_match(pred: str, golds: str | Iterable[str]) -> float:
    """1 if some normalised gold occurs inside the normalised prediction (as a token span)."""
    p = f" {normalize_answer(pred)} "
    return float(any(normalize_answer(g) and f" {normalize_answer(g)} " in p for g in _golds(golds)))


def token_f1(pred: list[str], gold: list[str]) -> float:
    """Token F1 of two normalised, split answers (the world's shortcut check calls it directly)."""
    # HotpotQA's rule: a yes/no/noanswer on either side only scores when both are the same.
    if (" ".join(pred) in _SPECIAL or " ".join(gold) in _SPECIAL) and pred != gold:
        return 0.0
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _f1(pred: str, gold: str) -> float:
    return token_f1(normalize_answer(pred).split(), normalize_answer(gold).split())


def f1_score(pred: str, golds: str | Iterable[str]) -> float:
    return max((_f1(pred, g) for g in _golds(golds)), default=0.0)


def extract_answer(response: str) -> str | None:
    """The stripped text of the last <answer>…</answer> in the response; None if there is none.

    Pass the response only: Search-R1's prompt itself contains "<answer> Beijing </answer>".
    """
    matches = _ANSWER.findall(response)
    return matches[-1].strip() if matches else None


METRICS: dict[str, Callable[[str, str | Iterable[str]], float]] = {
    "em": exact_match,
    "f1": f1_score,
    "cover_em": cover_exact_match,
}


def get_metric(name: str):
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; valid: {', '.join(METRICS)}") from None


def answer_reward(name: str, response: str, golds: str | Iterable[str]) -> float:
    """Reward of a whole response: the metric `name` on its extracted answer, 0 without one."""
    metric = get_metric(name)
    answer = extract_answer(response)
    return 0.0 if answer is None else metric(answer, golds)
