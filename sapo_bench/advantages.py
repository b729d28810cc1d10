"""Advantage estimators, looked up by name like the losses.

Outcome estimators (grpo, dr_grpo, rloo) map one scalar reward per response to one advantage
per response, (N,); the loss broadcasts it to the response's tokens. GAE maps per-token rewards
and values to per-token advantages, (B, T).
"""

from __future__ import annotations

from typing import Callable

import torch

from sapo_bench.tensors import check_finite, check_same_shape, masked_mean


def _group_index(group_ids, n: int) -> torch.Tensor:
    """Map any group labels (ints, strings, a tensor) to dense indices 0..G−1."""
    if isinstance(group_ids, torch.Tensor):
        if group_ids.shape != (n,):
            raise ValueError(f"shape mismatch: rewards has shape ({n},) but group_ids has shape {tuple(group_ids.shape)}")
        return torch.unique(group_ids, return_inverse=True)[1]
    ids = list(group_ids)
    if len(ids) != n:
        raise ValueError(f"shape mismatch: rewards has shape ({n},) but group_ids has length {len(ids)}")
    dense: dict = {}
    return torch.tensor([dense.setdefault(g, len(dense)) for g in ids], dtype=torch.long)


def _group_stats(rewards: torch.Tensor, group_ids):
    """Per-response group mean, unbiased group std and group size; a group of one gets mean 0, std 1."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (N,); got shape {tuple(rewards.shape)}")
    check_finite("rewards", rewards)
    r = rewards.double()
    idx = _group_index(group_ids, r.shape[0]).to(r.device)
    g = int(idx.max()) + 1 if idx.numel() else 0
    count = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, idx, torch.ones_like(r))
    mean = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, idx, r) / count
    sq = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, idx, (r - mean[idx]) ** 2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return r, mean[idx], std[idx], count[idx]


def grpo_advantages(rewards: torch.Tensor, group_ids, eps: float = 1e-6) -> torch.Tensor:
    """(R − group mean) / (group std + eps), unbiased std (Search-R1 / veRL)."""
    r, mean, std, _ = _group_stats(rewards, group_ids)
    return ((r - mean) / (std + eps)).to(rewards.dtype)


def dr_grpo_advantages(rewards: torch.Tensor, group_ids) -> torch.Tensor:
    """Dr.GRPO: R − group mean, without the std division that favours low-variance groups."""
    r, mean, _, _ = _group_stats(rewards, group_ids)
    return (r - mean).to(rewards.dtype)


def rloo_advantages(rewards: torch.Tensor, group_ids) -> torch.Tensor:
    """REINFORCE leave-one-out: R_i − mean of the other responses of its group (R_i for a group of one)."""
    r, mean, _, count = _group_stats(rewards, group_ids)
    loo = count / (count - 1).clamp(min=1) * (r - mean)
    return torch.where(count > 1, loo, r).to(rewards.dtype)


def gae_advantages(token_rewards, values, mask, *, gamma: float = 1.0, lam: float = 1.0,
                   whiten: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the policy's own tokens.

    A multi-turn response has retrieved passages between its generated tokens. The trajectory
    is the sequence of unmasked tokens: the recursion skips masked positions, so with λ < 1 a
    retrieved block is not counted as extra time steps. Rewards must sit on unmasked tokens
    (usually the last one); a reward on a masked token is an error, not silently dropped.

    Returns (advantages, returns), both (B, T), 0 on masked positions; returns = A + V before
    whitening. whiten=True normalises A to mean 0 and std 1 over unmasked tokens (veRL).
    """
    check_same_shape(token_rewards=token_rewards, values=values, mask=mask)
    m = mask.bool()
    check_finite("token_rewards", token_rewards)
    check_finite("values", values, m)
    if bool((token_rewards[~m] != 0).any()):
        raise ValueError("token_rewards has non-zero rewards on masked positions; put each reward on an unmasked token")
    values = values.detach()
    B, T = values.shape
    adv = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    running = torch.zeros_like(next_value)
    for t in range(T - 1, -1, -1):
        mt = m[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        running = torch.where(mt, step, running)
        next_value = torch.where(mt, values[:, t], next_value)
        adv[:, t] = torch.where(mt, step, torch.zeros_like(step))
    returns = torch.where(m, adv + values, torch.zeros_like(adv))
    if whiten and int(m.sum()) > 1:
        mu = masked_mean(adv, m)
        var = masked_mean((adv - mu) ** 2, m)
        adv = torch.where(m, (adv - mu) * torch.rsqrt(var + 1e-8), torch.zeros_like(adv))
    return adv, returns


ADVANTAGES: dict[str, Callable] = {
    "grpo": grpo_advantages,        # outcome: (rewards (N,), group_ids) -> (N,)
    "dr_grpo": dr_grpo_advantages,  # outcome
    "rloo": rloo_advantages,        # outcome
    "gae": gae_advantages,          # per token: (token_rewards, values, mask) -> (A, returns), needs a value head
}


def get_advantage(name: str) -> Callable:
    try:
        return ADVANTAGES[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {', '.join(ADVANTAGES)}") from None
