"""Every metric name the code emits is documented in docs/metrics.md, and nothing stale is."""

import re
from pathlib import Path

import torch

from sapo_bench.diagnostics import isdd_metrics
from sapo_bench.losses import LOSSES, entropy_bonus, policy_loss, ref_kl, value_loss

DOC = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
# The loss and diagnostic sections; the training step's names are checked against a real run's
# metrics.jsonl (tests/integration/test_training.py).
DOCUMENTED = set(re.findall(r"`([a-z_]+/[a-z0-9_]+)`", DOC.split("## From the training step")[0]))


def emitted() -> set[str]:
    logp, old = torch.zeros(2, 3), torch.full((2, 3), -0.1)
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 3)
    names = set(isdd_metrics(logp, old, adv, mask))
    for name in LOSSES:
        params = {"norm_len": 3} if name == "dr_grpo" else {}
        names |= set(policy_loss(name, logp=logp, old_logp=old, advantages=adv, mask=mask, **params).metrics)
    names |= set(ref_kl(logp, old, mask).metrics) | set(entropy_bonus(torch.ones(2, 3), mask).metrics)
    names |= set(value_loss(logp, old, old, mask).metrics)
    return names


def test_every_emitted_metric_is_documented_and_every_documented_one_is_emitted():
    names = emitted()
    assert names - DOCUMENTED == set(), "document these in docs/metrics.md"
    assert DOCUMENTED - names == set(), "docs/metrics.md lists names nothing emits"
