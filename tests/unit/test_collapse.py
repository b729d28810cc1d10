"""The collapse detector on synthetic traces, and the per-step metrics it reads (off-policy only)."""

import math

import pytest
import torch

from sapo_bench.module import CollapseDetector, step_metrics

HEALTHY = (0.9, 0.0)   # off-policy p5 of r, fraction of sequences drifted (length-aware)
DRIFT = (0.03, 0.2)


def run(trace, **kw):
    """trace: [(reward, (p5, seq_frac))] for steps 1..; returns the detector after all of them."""
    det = CollapseDetector(30, **kw)  # 30 steps: window 3, first step that may fire 6
    for step, (reward, (p5, seq)) in enumerate(trace, start=1):
        det.update(step, reward, p5, seq)
    return det


def test_window_and_start_scale_with_the_run_length():
    assert (CollapseDetector(15).window, CollapseDetector(15).start) == (2, 3)
    assert (CollapseDetector(30).window, CollapseDetector(30).start) == (3, 6)
    assert (CollapseDetector(300).window, CollapseDetector(300).start) == (30, 60)


def test_drift_then_reward_collapse_fires():
    det = run([(0.4, HEALTHY)] * 12 + [(0.0, DRIFT)] * 18)
    # step 13, window 11-13: p5 mean (0.9 + 0.9 + 0.03)/3 = 0.61, drifted share (0 + 0 + 0.2)/3 = 0.067: no drift.
    # step 14, window 12-14: p5 0.32 >= 0.2 but drifted share 0.4/3 = 0.133 >= 0.1: drift; reward
    # (0.4 + 0 + 0)/3 = 0.133 < 0.5 x best 0.4: collapsed at 14.
    assert (det.drift_step, det.step) == (14, 14)


def test_reward_collapse_without_drift_does_not_fire():
    det = run([(0.4, HEALTHY)] * 12 + [(0.0, HEALTHY)] * 18)
    assert det.step is None and det.drift_step is None


def test_drift_without_reward_collapse_is_recorded_but_does_not_fire():
    det = run([(0.4, HEALTHY)] * 12 + [(0.4, (0.03, 0.0))] * 18)
    # p5 alone: window 13-15 is the first whose mean (0.03) is below 0.2
    assert det.step is None and det.drift_step == 15


def test_noisy_first_steps_raise_no_alarm():
    trace = [(1.0, (0.01, 0.5))] * 3 + [(0.2, HEALTHY)] * 27
    assert run(trace).step is None
    # what the start guards against: allowed to fire from step 3, the same trace fires at step 5
    # (window 3-5: reward (1 + 0.2 + 0.2)/3 = 0.467 < 0.5 x 1.0; drifted share 0.5/3 = 0.167)
    assert run(trace, start_frac=0.01).step == 5


def test_no_off_policy_minibatch_means_no_drift_and_no_collapse():
    assert run([(0.4, (None, None))] * 12 + [(0.0, (None, None))] * 18).step is None


def test_state_round_trips():
    det = run([(0.4, HEALTHY)] * 12 + [(0.0, DRIFT)] * 3)
    again = CollapseDetector(30)
    again.load_state_dict(det.state_dict())
    for d in (det, again):
        d.update(16, 0.0, *DRIFT)
    assert again.state_dict() == det.state_dict()


def _minibatch(log_r):
    return torch.tensor(log_r, dtype=torch.float64)


def test_step_metrics_split_on_and_off_policy_and_pool_the_off_policy_tokens():
    # 4 rows of 2 tokens; rows 0-1 are the on-policy mini-batch (r = 1 -/+ 1e-7: the ratio gate's coin
    # flip), rows 2-3 and 0-1 again (a second epoch) are off-policy.
    mask, adv, old = torch.ones(4, 2), torch.tensor([1.0, 0.0, 1.0, -1.0]), torch.zeros(4, 2, dtype=torch.float64)
    on = _minibatch([[-1e-7, 1e-7], [-1e-7, 1e-7]])
    off1 = _minibatch([[math.log(0.5), 0.0], [0.0, 0.0]])
    off2 = _minibatch([[math.log(1e-4), 0.0], [0.0, math.log(2.0)]])
    done = [(True, [0, 1], on, {"loss/sapo_gated_frac": 0.5}), (False, [2, 3], off1, {"loss/sapo_gated_frac": 0.25}),
            (False, [0, 1], off2, {"loss/sapo_gated_frac": 0.75})]
    m = step_metrics(done, mask, old, adv, tau=1.0, seq_len_ref=16)
    assert m["on/is_ratio/pos_frac_below_tau"] == pytest.approx(0.5)  # 2 of the 4 A >= 0 tokens: noise
    # off-policy A >= 0 tokens: row 2 (0.5, 1) and rows 0, 1 of the second epoch (1e-4, 1, 1, 2): r < 1 for 2 of 6
    assert m["off/is_ratio/pos_frac_below_tau"] == pytest.approx(2 / 6)
    assert m["off/is_ratio/n_tokens"] == 8 and m["on/is_ratio/n_tokens"] == 4
    assert m["off/is_ratio/min"] == pytest.approx(1e-4)
    # Definition 1 pooled over the 4 off-policy sequences: only row 0 of epoch 2 (∏ r = 1e-4)
    assert m["off/isdd/frac_seq_prod_below_eps"] == pytest.approx(1 / 4)
    assert m["off/loss/sapo_gated_frac"] == pytest.approx(0.5) and m["on/loss/sapo_gated_frac"] == 0.5
    # plain names: the mean over the three mini-batches (the lowest for the minima)
    assert m["loss/sapo_gated_frac"] == pytest.approx(0.5)
    assert m["is_ratio/min"] == pytest.approx(1e-4)
    assert m["is_ratio/n_tokens"] == pytest.approx(4)
