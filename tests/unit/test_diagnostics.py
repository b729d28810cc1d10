import math

import pytest
import torch

from sapo_bench.diagnostics import clip_fraction, isdd_metrics

D = torch.float64


def test_isdd_metrics_by_hand():
    ratios = torch.tensor([[1.0, 0.5, 2.0, 1.0], [1e-2, 1e-2, 1.0, 4.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=D)
    adv = torch.tensor([1.0, -1.0], dtype=D)
    m = isdd_metrics(ratios.log(), torch.zeros_like(ratios), adv, mask)
    vals = sorted([1.0, 0.5, 2.0, 1e-2, 1e-2, 1.0])
    assert m["is_ratio/n_tokens"] == 6
    assert m["is_ratio/mean"] == pytest.approx(sum(vals) / 6)
    assert m["is_ratio/min"] == pytest.approx(1e-2)
    assert m["is_ratio/max"] == pytest.approx(2.0)
    assert m["is_ratio/median"] == pytest.approx(torch.tensor(vals).quantile(0.5).item())
    assert m["is_ratio/p5"] == pytest.approx(torch.tensor(vals).quantile(0.05).item())
    assert m["is_ratio/frac_below_tau"] == pytest.approx(3 / 6)
    assert m["is_ratio/pos_frac_below_tau"] == pytest.approx(1 / 3)  # only seq0 has A >= 0
    # per-sequence sum of log r: seq0 = log(1) + log(.5) + log(2) = 0; seq1 = 2 log(1e-2) < log(1e-3)
    assert m["isdd/seq_log_ratio_mean"] == pytest.approx(math.log(1e-4) / 2)
    assert m["isdd/seq_log_ratio_min"] == pytest.approx(math.log(1e-4))
    assert m["isdd/frac_seq_prod_below_eps"] == 0.5
    kl = sum(r - 1 - math.log(r) for r in vals) / 6
    assert m["policy/approx_kl"] == pytest.approx(kl)


def test_isdd_metrics_tau_and_empty_cases():
    ratios = torch.tensor([[0.7, 0.9]], dtype=D)
    m = isdd_metrics(ratios.log(), torch.zeros_like(ratios), torch.tensor([-1.0], dtype=D), torch.ones(1, 2), tau=0.8)
    assert m["is_ratio/frac_below_tau"] == 0.5
    assert math.isnan(m["is_ratio/pos_frac_below_tau"])  # no A >= 0 token to describe
    empty = isdd_metrics(ratios.log(), torch.zeros_like(ratios), torch.tensor([1.0], dtype=D), torch.zeros(1, 2))
    assert empty["is_ratio/n_tokens"] == 0
    assert math.isnan(empty["is_ratio/mean"]) and math.isnan(empty["isdd/frac_seq_prod_below_eps"])


def test_isdd_metrics_validates_like_the_losses():
    with pytest.raises(ValueError, match="^old_logp holds"):
        isdd_metrics(torch.zeros(1, 2), torch.tensor([[0.0, float("nan")]]), torch.zeros(1), torch.ones(1, 2))


def test_clip_fraction_counts_binding_tokens_only():
    r = torch.tensor([[1.3, 1.3, 0.7, 0.7, 1.0]])
    a = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0]])
    assert clip_fraction(r, a, torch.ones_like(r), 0.2, 0.2).item() == pytest.approx(2 / 5)
    assert clip_fraction(r, a, torch.ones_like(r), 0.2, 0.4).item() == pytest.approx(1 / 5)
