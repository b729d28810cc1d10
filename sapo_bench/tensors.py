"""Masked reductions and input checks shared by the losses, advantages and diagnostics.

Every quantity in this project is averaged over *unmasked* tokens only: the mask is 1 on
tokens the policy generated and 0 on prompt, retrieved passages, tool feedback and padding.
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    # torch.where, not x * mask: a NaN or inf on a masked position must not leak through.
    z = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return z.sum() if dim is None else z.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Σ x·m / Σ m, and exactly 0 (still differentiable) when the mask is empty."""
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def aggregate(x: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean", norm_len: int | None = None,
              scope: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token quantity to a scalar.

    token-mean               Σ_{i,t} x m / Σ_{i,t} m                   (veRL default, SAPO's code)
    seq-mean-token-mean      mean over sequences with ≥1 token of the per-sequence token mean
                             (the GRPO paper's equation)
    seq-mean-token-sum-norm  Σ_{i,t} x m / (B · norm_len): Dr.GRPO's constant normaliser, which
                             the caller must give (the generation budget, never a padded width)

    `scope` is the mask of the whole optimiser mini-batch that these rows belong to (default: `mask`
    itself): the numerators sum over `mask`, the denominators count over `scope`, so the values of
    a mini-batch's micro-batches add up to the mini-batch's value, and so do their gradients. Rows
    are never split, so a per-sequence mean needs no scope.
    """
    scope = mask if scope is None else scope
    if agg == "token-mean":
        return masked_sum(x, mask) / scope.to(x.dtype).sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        per_seq = masked_mean(x, mask, dim=-1)
        return masked_sum(per_seq, mask.sum(-1) > 0) / (scope.sum(-1) > 0).to(x.dtype).sum().clamp(min=1)
    if agg == "seq-mean-token-sum-norm":
        if norm_len is None:
            raise ValueError("the seq-mean-token-sum-norm aggregation needs norm_len (Dr.GRPO's constant: the "
                             "generation budget in generated tokens)")
        return masked_sum(x, mask) / (scope.shape[0] * norm_len)
    raise ValueError(f"unknown aggregation {agg!r}; valid: {', '.join(AGGREGATIONS)}")


def check_same_shape(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.shape != t0.shape:
            raise ValueError(
                f"shape mismatch: {name0} has shape {tuple(t0.shape)} but {name} has shape {tuple(t.shape)}"
            )


def check_finite(name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise naming the tensor if it holds NaN or inf (only where mask is set, if given)."""
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad & mask.bool()
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(f"{name} holds {int(bad.sum())} non-finite value(s) (first at index {where})")


def token_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sequence advantages (B,) to tokens (B, T); per-token ones pass through."""
    if advantages.dim() == 1:
        if advantages.shape[0] != mask.shape[0]:
            raise ValueError(
                f"shape mismatch: advantages has shape {tuple(advantages.shape)} but mask has shape "
                f"{tuple(mask.shape)} (per-sequence advantages need one value per row)"
            )
        return advantages.unsqueeze(-1).expand_as(mask)
    check_same_shape(mask=mask, advantages=advantages)
    return advantages


def prepare(logp, old_logp, advantages, mask):
    """Validate the four inputs of every policy loss and diagnostic; return clean tensors.

    Returns (logp, old_logp, advantages (B, T), mask (bool)) with masked positions zeroed, so
    that nothing on a masked position can reach a value or a gradient.
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T); got shape {tuple(logp.shape)}")
    check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    m = mask.bool()
    adv = token_advantages(advantages, m)
    check_finite("logp", logp, m)
    check_finite("old_logp", old_logp, m)
    check_finite("advantages", adv, m)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(m, logp, zero)
    old_logp = torch.where(m, old_logp.detach().to(logp.dtype), zero)
    adv = torch.where(m, adv.detach().to(logp.dtype), zero)
    return logp, old_logp, adv, m


def to_floats(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Detach a dict of scalar tensors into Python floats with one device sync, not one per key."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if keys:
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).cpu().tolist()
        out.update(zip(keys, values))
    return {k: out[k] for k in metrics}
