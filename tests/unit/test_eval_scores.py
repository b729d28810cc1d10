from types import SimpleNamespace

import torch

from sapo_bench.evaluate import evaluate_batches
from sapo_bench.module import SearchAgentRLModule


def test_a_runs_test_scores_equal_sapo_evals_exactly(monkeypatch):
    # F1 values whose float32 sum rounds (2/3 of 1/95, ...): the run's own test (the module's
    # _eval_end) and sapo-eval (evaluate_batches) must report the same numbers, to the last digit.
    scores = [(0.0, 2 / 3 / 95), (1.0, 1.0), (0.0, 0.1), (0.0, 1 / 3)] * 5
    logged = {}
    module = SimpleNamespace(_eval={"nq": list(scores)}, device=torch.device("cpu"), rollout_step=3,
                             trainer=SimpleNamespace(strategy=SimpleNamespace(reduce=lambda t, reduce_op: t)),
                             log_dict=lambda m, **_: logged.update(m))
    ours = SearchAgentRLModule._eval_end(module, "test")

    # evaluate_batches over the same scores, in batches that do not divide them
    it = iter(scores)
    monkeypatch.setattr("sapo_bench.evaluate.score", lambda answers, golds: [next(it) for _ in answers])
    rows = _Rows([{"question": "q", "golden_answers": ["x"]}] * len(scores))
    theirs = evaluate_batches({"nq": rows}, lambda r: SimpleNamespace(answers=["x"] * len(r)), batch_size=7)
    assert ours == theirs
    assert ours["nq"]["f1"] == sum(s[1] for s in scores) / len(scores)
    assert ours["nq"]["f1"] != float(torch.tensor([s[1] for s in scores]).sum() / len(scores))  # what float32 gave
    assert logged["test/f1/nq"] == ours["nq"]["f1"] and logged["train/step"] == 3.0


class _Rows:
    """The slice of a datasets.Dataset that evaluate_batches uses: len, select, a column."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def select(self, idx):
        return _Rows([self.rows[i] for i in idx])

    def __getitem__(self, column):
        return [r[column] for r in self.rows]
