"""Policy losses, looked up by name: ``policy_loss("sapo", logp=..., old_logp=..., advantages=..., mask=...)``.

How these differ from the textbook versions (read this before comparing with a paper):

1. Aggregation defaults to a token mean over every unmasked token of the optimiser mini-batch
   (veRL's ``token-mean``, which both the Search-R1 and the SAPO authors' code use). The GRPO
   paper's per-sequence mean is ``agg="seq-mean-token-mean"``.
2. ``sapo`` gates on ``A ≥ 0`` and ``r ≤ τ`` as the SAPO authors' released code does. The paper
   writes ``A > 0`` and ``r < τ``: that is ``strict=True``.
3. SAPO's term K averages over *every* unmasked token of the ``A ≥ 0`` sequences, including
   tokens whose ``r > τ`` contributes 0. So a gated token's gradient is −γ/N whatever its r.
4. The gates are indicators without gradient; only ``old_logp − logp`` carries gradient.
5. ``soft_gate`` is Qwen's *Soft Adaptive Policy Optimization* (arXiv 2511.20347), which TRL and
   veRL also call "SAPO". It is a different method and never goes by that name here.
6. The reference-KL (k3), entropy and value terms are not part of any registered loss: the
   training module adds them identically for every row, so rows differ only in the loss.
7. Masked positions are zeroed before any arithmetic, so NaN or inf on padding never reaches a
   value or a gradient; NaN or inf on an unmasked position is an error naming the tensor.
8. ``exp`` of the log-ratio is taken on a log-ratio clamped to [−20, 20] (as veRL does), so an
   extreme drift gives a tiny or huge but finite ratio; SAPO's term uses the unclamped log-ratio.

An empty mask gives loss exactly 0 (differentiable, zero gradient) and zero metrics.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from sapo_bench.diagnostics import clip_fraction
from sapo_bench.tensors import aggregate, check_finite, check_same_shape, masked_mean, prepare, to_floats

LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LossInputs:
    """What every registered loss sees: validated (B, T) tensors, masked positions zeroed."""

    logp: torch.Tensor       # current policy, carries gradient
    old_logp: torch.Tensor   # behaviour policy, detached
    adv: torch.Tensor        # advantages broadcast to tokens, detached
    mask: torch.Tensor       # bool
    log_ratio: torch.Tensor  # logp − old_logp (unclamped)
    ratio: torch.Tensor      # exp(clamp(log_ratio))


LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {}


def register_loss(*names: str):
    """Register a loss under one or more names. Its keyword-only arguments are its parameters."""

    def deco(fn):
        for name in names:
            if name in LOSSES:
                raise ValueError(f"loss {name!r} is already registered")
            LOSSES[name] = fn
        return fn

    return deco


def get_loss(name: str):
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}") from None


def loss_params(name: str) -> dict[str, object]:
    """The parameters a loss accepts, with their defaults."""
    sig = inspect.signature(get_loss(name))
    return {p.name: p.default for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}


def check_loss_params(name: str, params: dict) -> None:
    valid = loss_params(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for loss {name!r}; valid: {', '.join(valid)}"
        )


def policy_loss(name: str, *, logp, old_logp, advantages, mask, **params) -> LossOutput:
    """Compute a registered policy loss.

    logp, old_logp, mask  (B, T); advantages (B,) per sequence or (B, T) per token.
    Returns LossOutput(loss=differentiable scalar, metrics={name: float}).
    """
    fn = get_loss(name)
    check_loss_params(name, params)
    logp, old_logp, adv, m = prepare(logp, old_logp, advantages, mask)
    log_ratio = logp - old_logp
    ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    loss, metrics = fn(LossInputs(logp, old_logp, adv, m, log_ratio, ratio), **params)
    metrics = {"loss/policy": loss, **metrics}
    return LossOutput(loss=loss, metrics=to_floats(metrics))


# --- the clipped surrogate (PPO, GRPO, Dr.GRPO, DAPO) ----------------------------------------


def clipped_surrogate(x: LossInputs, clip_low: float, clip_high: float, agg: str, norm_len: int | None = None):
    surrogate = -x.adv * x.ratio
    clipped = -x.adv * x.ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = aggregate(torch.maximum(surrogate, clipped), x.mask, agg, norm_len)
    metrics = {"loss/pg": pg, "loss/clip_frac": clip_fraction(x.ratio.detach(), x.adv, x.mask, clip_low, clip_high)}
    return pg, metrics


@register_loss("grpo", "ppo")
def grpo(x: LossInputs, *, clip_eps: float = 0.2, agg: str = "token-mean"):
    """PPO's clipped surrogate; GRPO differs from PPO only in its advantages (Shao et al. 2024)."""
    return clipped_surrogate(x, clip_eps, clip_eps, agg)


@register_loss("dr_grpo")
def dr_grpo(x: LossInputs, *, clip_eps: float = 0.2, norm_len: int | None = None):
    """Dr.GRPO (Liu et al. 2025): no per-sequence length normalisation; Σ over tokens / (B · norm_len)."""
    return clipped_surrogate(x, clip_eps, clip_eps, "seq-mean-token-sum-norm", norm_len)


@register_loss("dapo")
def dapo(x: LossInputs, *, clip_low: float = 0.2, clip_high: float = 0.28, agg: str = "token-mean"):
    """DAPO's clip-higher (Yu et al. 2025): a wider upper clip so low-probability tokens can rise."""
    return clipped_surrogate(x, clip_low, clip_high, agg)


# --- SAPO and its ablations (arXiv 2603.10069, Table 2) ---------------------------------------


def _with_kl_term(x: LossInputs, *, gamma, clip_eps, agg, token_gate, denominator):
    """GRPO + γ·K, K = aggregate((old_logp − logp) · token_gate, over `denominator` tokens)."""
    pg, metrics = clipped_surrogate(x, clip_eps, clip_eps, agg)
    term = (x.old_logp - x.logp) * token_gate.to(x.logp.dtype)
    k = aggregate(term, denominator, agg)
    metrics["loss/sapo_term"] = k
    metrics["loss/sapo_gated_frac"] = masked_mean((token_gate & denominator).float(), x.mask)
    return pg + gamma * k, metrics


def _gates(x: LossInputs, tau: float, strict: bool):
    ratio = x.log_ratio.detach().exp()  # unclamped: the gate must see the true ratio
    ratio_gate = ratio < tau if strict else ratio <= tau
    adv_gate = x.adv > 0 if strict else x.adv >= 0
    return ratio_gate, adv_gate


@register_loss("sapo")
def sapo(x: LossInputs, *, gamma: float = 0.1, tau: float = 1.0, strict: bool = False,
         clip_eps: float = 0.2, agg: str = "token-mean"):
    """SAPO: GRPO + γ · masked_mean((old_logp − logp)·1[r ≤ τ], mask·1[A ≥ 0])."""
    ratio_gate, adv_gate = _gates(x, tau, strict)
    return _with_kl_term(x, gamma=gamma, clip_eps=clip_eps, agg=agg,
                         token_gate=ratio_gate & adv_gate, denominator=x.mask & adv_gate)


@register_loss("sapo_kl_r")
def sapo_kl_r(x: LossInputs, *, gamma: float = 0.1, tau: float = 1.0, strict: bool = False,
              clip_eps: float = 0.2, agg: str = "token-mean"):
    """Ablation: SAPO's term with the ratio gate only, averaged over every unmasked token."""
    ratio_gate, _ = _gates(x, tau, strict)
    return _with_kl_term(x, gamma=gamma, clip_eps=clip_eps, agg=agg, token_gate=ratio_gate, denominator=x.mask)


@register_loss("sapo_kl")
def sapo_kl(x: LossInputs, *, gamma: float = 0.1, clip_eps: float = 0.2, agg: str = "token-mean"):
    """Ablation: the −log r term on every unmasked token, no gates."""
    return _with_kl_term(x, gamma=gamma, clip_eps=clip_eps, agg=agg, token_gate=x.mask, denominator=x.mask)


# --- other stabilisers ------------------------------------------------------------------------


@register_loss("gspo")
def gspo(x: LossInputs, *, clip_low: float = 3e-4, clip_high: float = 4e-4, agg: str = "seq-mean-token-mean"):
    """GSPO (Zheng et al. 2025): clip the sequence ratio s = exp(mean_t log r).

    Written in the GSPO-token form (value s_i on every token, gradient s_i·∇log π_t), which with
    per-sequence advantages and a per-sequence mean equals the sequence-level objective.
    """
    seq_log_ratio = masked_mean(x.log_ratio, x.mask, dim=-1).detach().clamp(max=10.0)
    s = (x.logp - x.logp.detach() + seq_log_ratio.unsqueeze(-1)).exp()
    surrogate = -x.adv * s
    clipped = -x.adv * s.clamp(1 - clip_low, 1 + clip_high)
    pg = aggregate(torch.maximum(surrogate, clipped), x.mask, agg)
    return pg, {"loss/pg": pg, "loss/clip_frac": clip_fraction(s.detach(), x.adv, x.mask, clip_low, clip_high)}


@register_loss("soft_gate")
def soft_gate(x: LossInputs, *, tau_pos: float = 1.0, tau_neg: float = 1.05, agg: str = "token-mean"):
    """Qwen's Soft Adaptive Policy Optimization (arXiv 2511.20347) — NOT the SAPO of this project.

    −A · σ(τ(r − 1)) · 4/τ in place of clipping, τ = tau_pos where A > 0 else tau_neg; the gate's
    gradient equals the plain policy gradient at r = 1 and decays smoothly away from it.
    """
    t = torch.where(x.adv > 0, torch.full_like(x.ratio, tau_pos), torch.full_like(x.ratio, tau_neg))
    gate = torch.sigmoid(t * (x.ratio - 1)) * 4 / t
    pg = aggregate(-x.adv * gate, x.mask, agg)
    return pg, {"loss/pg": pg}


# --- terms every algorithm shares ---------------------------------------------------------------


def ref_kl(logp, ref_logp, mask, *, beta: float = 0.001, agg: str = "token-mean") -> LossOutput:
    """β · k3 KL to the frozen reference: k3 = exp(ref − logp) − (ref − logp) − 1, clamped to [−10, 10]."""
    check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    check_finite("logp", logp, mask)
    check_finite("ref_logp", ref_logp, mask)
    m = mask.bool()
    diff = torch.where(m, ref_logp.detach().to(logp.dtype) - logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    diff = diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # keeps exp finite, as veRL does
    k3 = (diff.exp() - diff - 1).clamp(-10, 10)
    kl = aggregate(k3, m, agg)
    return LossOutput(loss=beta * kl, metrics=to_floats({"loss/ref_kl": kl}))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits) over the last dimension."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_bonus(entropy, mask, *, coef: float = 0.001, agg: str = "token-mean") -> LossOutput:
    """−coef · mean entropy over unmasked tokens (veRL's default, kept by both papers)."""
    check_finite("entropy", entropy, mask)
    h = aggregate(entropy, mask.bool(), agg)
    return LossOutput(loss=-coef * h, metrics=to_floats({"policy/entropy": h}))


def value_loss(values, old_values, returns, mask, *, clip_eps: float = 0.5, coef: float = 1.0,
               agg: str = "token-mean") -> LossOutput:
    """PPO's clipped value loss: coef · ½ · mean(max((V − R)², (clip(V, V_old ± ε) − R)²))."""
    check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    for name, t in (("values", values), ("old_values", old_values), ("returns", returns)):
        check_finite(name, t, mask)
    m = mask.bool()
    old_values, returns = old_values.detach(), returns.detach()
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    per_token = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    vl = 0.5 * aggregate(per_token, m, agg)
    frac = masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).float(), m)
    return LossOutput(loss=coef * vl, metrics=to_floats({"loss/value": vl, "loss/value_clip_frac": frac}))
