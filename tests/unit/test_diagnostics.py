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


def test_the_length_aware_companion_of_definition_1_ignores_length_alone():
    # row 0: 100 tokens at log r = -0.1 each (a response at the length limit, no drift per token):
    #   Σ = -10 < log 1e-3 = -6.91, so Definition 1 flags it; its mean -0.1 > log(1e-3)/16 = -0.432: not drifted.
    # row 1: 4 tokens at log r = -2 (Σ = -8, mean -2): drifted by both. row 2: 4 tokens at log r = -0.5
    #   (Σ = -2: not by Definition 1; mean -0.5 < -0.432: drifted per token).
    log_r = torch.zeros(3, 100, dtype=D)
    mask = torch.zeros(3, 100, dtype=D)
    log_r[0], mask[0] = -0.1, 1
    log_r[1, :4], log_r[2, :4], mask[1:, :4] = -2.0, -0.5, 1
    m = isdd_metrics(log_r, torch.zeros_like(log_r), torch.ones(3, dtype=D), mask)
    assert m["isdd/frac_seq_prod_below_eps"] == pytest.approx(2 / 3)
    assert m["isdd/frac_seq_geo_below_eps"] == pytest.approx(2 / 3)  # rows 1 and 2, not row 0
    # at seq_len_ref = 100 the companion agrees with Definition 1 on a 100-token response
    long = isdd_metrics(log_r[:1], torch.zeros(1, 100, dtype=D), torch.ones(1, dtype=D), mask[:1], seq_len_ref=100)
    assert long["isdd/frac_seq_geo_below_eps"] == long["isdd/frac_seq_prod_below_eps"] == 1.0
