import math

import pytest
import torch

from sapo_bench.advantages import (
    ADVANTAGES, dr_grpo_advantages, gae_advantages, get_advantage, grpo_advantages, rloo_advantages,
)

D = torch.float64


def test_grpo_advantages_by_hand_with_unbiased_std_and_interleaved_groups():
    rewards = torch.tensor([1.0, 5.0, 0.0, 5.0, 0.0, 1.0], dtype=D)
    groups = ["q1", "q2", "q1", "q2", "q1", "q3"]
    adv = grpo_advantages(rewards, groups)
    # q1 = [1, 0, 0]: mean 1/3, unbiased std sqrt(1/3); q2 all equal -> 0; q3 alone -> mean 0, std 1
    s = math.sqrt(1 / 3)
    expected = [(2 / 3) / (s + 1e-6), 0.0, (-1 / 3) / (s + 1e-6), 0.0, (-1 / 3) / (s + 1e-6), 1 / (1 + 1e-6)]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=D))


def test_group_ids_may_be_a_tensor_and_dtype_is_kept():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    adv = grpo_advantages(rewards, torch.tensor([7, 7, 3, 3]))
    assert adv.dtype == torch.float32
    assert adv[2] == 0 and adv[3] == 0
    assert adv[0] == pytest.approx(-adv[1].item())


def test_dr_grpo_advantages_do_not_divide_by_std():
    adv = dr_grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 3.0], dtype=D), [0, 0, 0, 1])
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, 3.0], dtype=D))


def test_rloo_baseline_leaves_one_out():
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 2.0], dtype=D), [0, 0, 0, 1])
    torch.testing.assert_close(adv, torch.tensor([1.0, -0.5, -0.5, 2.0], dtype=D))


def test_group_advantage_errors():
    with pytest.raises(ValueError, match=r"rewards has shape \(3,\) but group_ids has length 2"):
        grpo_advantages(torch.zeros(3), [0, 1])
    with pytest.raises(ValueError, match="^rewards holds"):
        grpo_advantages(torch.tensor([1.0, float("nan")]), [0, 0])
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'; valid: grpo, dr_grpo, rloo, gae"):
        get_advantage("ppo")
    assert set(ADVANTAGES) == {"grpo", "dr_grpo", "rloo", "gae"}


def test_gae_with_unit_gamma_lambda_is_return_minus_value_on_generated_tokens():
    mask = torch.tensor([[1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    values = torch.tensor([[0.2, 0.4, 9.0, 9.0, 0.7, 9.0]], dtype=D)
    rewards = torch.tensor([[0, 0, 0, 0, 1.0, 0]], dtype=D)
    adv, ret = gae_advantages(rewards, values, mask, whiten=False)
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.6, 0, 0, 0.3, 0]], dtype=D))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 0, 0, 1.0, 0]], dtype=D))


def test_gae_skips_masked_blocks_as_if_they_were_not_there():
    g, lam = 0.9, 0.5
    rewards = torch.tensor([[0, 0, 0, 0, 1.0]], dtype=D)
    values = torch.tensor([[0.1, 0.2, 5.0, 5.0, 0.3]], dtype=D)
    mask = torch.tensor([[1, 1, 0, 0, 1]], dtype=torch.bool)
    adv, _ = gae_advantages(rewards, values, mask, gamma=g, lam=lam, whiten=False)
    compact, _ = gae_advantages(rewards[:, [0, 1, 4]], values[:, [0, 1, 4]], torch.ones(1, 3, dtype=torch.bool),
                                gamma=g, lam=lam, whiten=False)
    torch.testing.assert_close(adv[:, [0, 1, 4]], compact)
    # by hand: d2 = 1 - 0.3, d1 = 0.9*0.3 - 0.2, d0 = 0.9*0.2 - 0.1
    d2, d1, d0 = 0.7, 0.27 - 0.2, 0.18 - 0.1
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    torch.testing.assert_close(compact, torch.tensor([[a0, a1, a2]], dtype=D))


def test_gae_whitening_and_reward_on_masked_token():
    mask = torch.ones(2, 3, dtype=torch.bool)
    rewards = torch.tensor([[0, 0, 1.0], [0, 0, 0.0]], dtype=D)
    adv, _ = gae_advantages(rewards, torch.zeros(2, 3, dtype=D), mask)
    assert adv.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert adv.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="non-zero rewards on masked positions"):
        gae_advantages(rewards, torch.zeros(2, 3, dtype=D), torch.tensor([[1, 1, 0], [1, 1, 1]]))
