"""Rollout–training mismatch: truncated importance sampling weights and how the module applies them."""

import math

import pytest
import torch

from sapo_bench.algos import Algo
from sapo_bench.losses import policy_loss
from sapo_bench.module import SearchAgentRLModule, TrainConfig, tis_weights
from sapo_bench.rollout import RolloutConfig


def test_tis_weights_are_the_capped_ratio_of_training_to_engine_probabilities_on_generated_tokens():
    old = torch.tensor([[-1.0, -1.0, -2.0, 0.0]])
    behaviour = torch.tensor([[-1.5, -0.5, -2.0 - math.log(5.0), 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = tis_weights(old, behaviour, mask, cap=2.0)
    assert torch.allclose(w, torch.tensor([[math.exp(0.5), math.exp(-0.5), 2.0, 1.0]]))
    assert not w.requires_grad


def _grad(loss, logp, old, adv, mask):
    (g,) = torch.autograd.grad(policy_loss(loss, logp=logp, old_logp=old, advantages=adv, mask=mask).loss, logp)
    return g


@pytest.mark.parametrize("loss", ["grpo", "dapo", "gspo", "soft_gate"])
def test_weighting_the_advantages_weights_each_tokens_policy_gradient(loss):
    """What the module does with tis=true: A·w per token. For a loss linear in A (gated on its
    sign), each token's policy-gradient term is the unweighted one times its w."""
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(3, 5, generator=g) * 0.1 - 1.0).requires_grad_()
    old = logp.detach() + torch.randn(3, 5, generator=g) * 0.1
    adv, mask = torch.tensor([1.0, -0.5, 0.0])[:, None].expand(3, 5), torch.ones(3, 5)
    mask[2, 3:] = 0
    w = torch.rand(3, 5, generator=g) * 2 + 0.1
    assert torch.allclose(_grad(loss, logp, old, adv * w, mask), _grad(loss, logp, old, adv, mask) * w, atol=1e-6)


def test_sapos_term_is_not_reweighted_by_tis():
    """K reads only the sign of A, which a positive weight keeps: sapo − grpo is the same with TIS."""
    g = torch.Generator().manual_seed(1)
    logp = (torch.randn(4, 6, generator=g) * 0.1 - 1.0).requires_grad_()
    old = logp.detach() + torch.randn(4, 6, generator=g) * 0.1
    adv, mask = torch.tensor([1.0, -0.5, 0.0, 2.0])[:, None].expand(4, 6), torch.ones(4, 6)
    w = torch.rand(4, 6, generator=g) * 2 + 0.1
    k_weighted = _grad("sapo", logp, old, adv * w, mask) - _grad("grpo", logp, old, adv * w, mask)
    k_plain = _grad("sapo", logp, old, adv, mask) - _grad("grpo", logp, old, adv, mask)
    assert k_plain.abs().sum() > 0 and torch.allclose(k_weighted, k_plain, atol=1e-7)


def test_tis_needs_recomputed_old_logps_and_a_positive_cap():
    algo = Algo.from_config({"name": "grpo", "loss": "grpo", "advantage": "grpo"})
    net = torch.nn.Linear(1, 1)

    def module(**train):
        return SearchAgentRLModule(net, None, torch.nn.Linear(1, 1), None, algo, [], {}, {}, RolloutConfig(),
                                   TrainConfig(**train))

    assert module().recompute is False  # hf: the behaviour log-probs are the training forward's
    assert module(recompute_old_logp=True, tis=True).recompute is True
    with pytest.raises(ValueError, match="train.tis=true .*needs the old log-probs recomputed"):
        module(recompute_old_logp=False, tis=True)
    with pytest.raises(ValueError, match="tis_cap must be positive"):
        module(recompute_old_logp=True, tis=True, tis_cap=0.0)
