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
9. Micro-batching never changes a loss. Every mean divides by counts over the whole optimiser
   mini-batch (its ``Scope``), not over the micro-batch it is computed on: token counts, sequence
   counts, SAPO's ``A ≥ 0`` token count, LLDS's ``A ≥ 0`` response count, Dr.GRPO's B · budget. So
   the micro-batches' losses, metrics and gradients add up to the mini-batch's exactly. Veto of the
   common alternative (scale each micro-batch's mean by its share of tokens): exact for a token mean
   only.
10. Dr.GRPO's normaliser is the generation budget in generated tokens (``Scope.gen_budget``, the
   rollout's ``generation_budget()``) unless ``norm_len`` is given: a constant, never the padded
   width of prompt + passages + response, which changes with every batch.
11. ``llds`` is LLDS (arXiv 2512.04220) as the paper writes it: per response of ``Y_pre`` (A ≥ 0),
   then over them; its authors' code divides by every generated token of the batch instead
   (``denominator="all_tokens"``). SAPO's term is LLDS's token-level gate with another weight and
   denominator: ``(old_logp − logp)·1[r ≤ 1] = max(0, Δ)``.

An empty mask gives loss exactly 0 (differentiable, zero gradient) and zero metrics.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from sapo_bench.diagnostics import clip_fraction
from sapo_bench.settings import SettingError, check_int, check_number
from sapo_bench.tensors import (AGGREGATIONS, aggregate, check_finite, check_same_shape, masked_mean, masked_sum,
                                prepare, to_floats, token_advantages)

LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Scope:
    """The optimiser mini-batch that a micro-batch belongs to: what every mean divides by (note 9).

    mask (B, T) and adv (B, T) are the mini-batch's whole (widths may exceed the micro-batch's);
    gen_budget is the most tokens a response can generate (Dr.GRPO's constant normaliser).
    """

    mask: torch.Tensor
    adv: torch.Tensor
    gen_budget: int | None = None

    @classmethod
    def of(cls, mask, advantages, gen_budget: int | None = None) -> "Scope":
        m = mask.bool()
        adv = token_advantages(advantages, m).detach()
        return cls(m, torch.where(m, adv, torch.zeros((), dtype=adv.dtype, device=adv.device)), gen_budget)

    def select(self, gate=None) -> torch.Tensor:
        """The mini-batch's tokens inside an advantage gate (a function of A), all of them without one."""
        return self.mask if gate is None else self.mask & gate(self.adv)


@dataclass(frozen=True)
class LossInputs:
    """What every registered loss sees: validated (B, T) tensors, masked positions zeroed."""

    logp: torch.Tensor       # current policy, carries gradient
    old_logp: torch.Tensor   # behaviour policy, detached
    adv: torch.Tensor        # advantages broadcast to tokens, detached
    mask: torch.Tensor       # bool
    log_ratio: torch.Tensor  # logp − old_logp (unclamped)
    ratio: torch.Tensor      # exp(clamp(log_ratio))
    scope: Scope             # the whole mini-batch: denominators count over it

    def select(self, gate=None) -> torch.Tensor:
        """These rows' tokens inside an advantage gate (a function of A), all of them without one."""
        return self.mask if gate is None else self.mask & gate(self.adv)

    def mean(self, values, agg: str = "token-mean", gate=None, norm_len: int | None = None):
        """`aggregate` over these tokens (inside the advantage gate `gate`, if any), dividing by the
        scope's count of the same tokens."""
        return aggregate(values, self.select(gate), agg, norm_len, scope=self.scope.select(gate))


LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {}


# Parameters whose value is one of a few names; every other parameter is checked against the type
# of its default (check_loss_params).
CHOICES = {"agg": AGGREGATIONS, "gate": ("action", "response", "token"), "denominator": ("responses", "all_tokens")}


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
    """Names, then values: a value of the wrong kind fails at start-up naming algo.loss_params.<key>."""
    valid = loss_params(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for loss {name!r}; valid: {', '.join(valid)}"
        )
    for key, value in params.items():
        setting, default = f"algo.loss_params.{key}", valid[key]
        if key in CHOICES:
            if value not in CHOICES[key]:
                raise SettingError(f"{setting} must be one of {', '.join(CHOICES[key])}, got {value!r}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise SettingError(f"{setting} must be true or false, got {value!r}")
        elif default is None or isinstance(default, int) and not isinstance(default, bool):
            if value is not None:  # an optional count (Dr.GRPO's norm_len)
                check_int(setting, value)
        elif isinstance(default, float):
            check_number(setting, value, minimum=0)


def policy_loss(name: str, *, logp, old_logp, advantages, mask, scope: Scope | None = None, **params) -> LossOutput:
    """Compute a registered policy loss.

    logp, old_logp, mask  (B, T); advantages (B,) per sequence or (B, T) per token.
    scope  the optimiser mini-batch these rows belong to (note 9); default: these rows alone.
    Returns LossOutput(loss=differentiable scalar, metrics={name: float}); loss and metrics are this
    micro-batch's share of the scope's, so summing them over the scope's micro-batches gives its own.
    """
    fn = get_loss(name)
    check_loss_params(name, params)
    logp, old_logp, adv, m = prepare(logp, old_logp, advantages, mask)
    log_ratio = logp - old_logp
    ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    scope = Scope.of(m, adv) if scope is None else scope
    loss, metrics = fn(LossInputs(logp, old_logp, adv, m, log_ratio, ratio, scope), **params)
    metrics = {"loss/policy": loss, **metrics}
    return LossOutput(loss=loss, metrics=to_floats(metrics))


# --- the clipped surrogate (PPO, GRPO, Dr.GRPO, DAPO) ----------------------------------------


def clipped_surrogate(x: LossInputs, clip_low: float, clip_high: float, agg: str, norm_len: int | None = None):
    surrogate = -x.adv * x.ratio
    clipped = -x.adv * x.ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = x.mean(torch.maximum(surrogate, clipped), agg, norm_len=norm_len)
    metrics = {"loss/pg": pg, "loss/clip_frac": clip_fraction(x.ratio.detach(), x.adv, x.mask, clip_low, clip_high,
                                                              scope=x.scope.mask)}
    return pg, metrics


@register_loss("grpo", "ppo")
def grpo(x: LossInputs, *, clip_eps: float = 0.2, agg: str = "token-mean"):
    """PPO's clipped surrogate; GRPO differs from PPO only in its advantages (Shao et al. 2024)."""
    return clipped_surrogate(x, clip_eps, clip_eps, agg)


@register_loss("dr_grpo")
def dr_grpo(x: LossInputs, *, clip_eps: float = 0.2, norm_len: int | None = None):
    """Dr.GRPO (Liu et al. 2025): no per-sequence length normalisation; Σ over tokens / (B · norm_len),
    norm_len defaulting to the generation budget (note 10)."""
    norm_len = x.scope.gen_budget if norm_len is None else norm_len
    if norm_len is None:
        raise ValueError("dr_grpo needs a constant normaliser: give norm_len, or a Scope with the rollout's "
                         "gen_budget (the training module does)")
    return clipped_surrogate(x, clip_eps, clip_eps, "seq-mean-token-sum-norm", norm_len)


@register_loss("dapo")
def dapo(x: LossInputs, *, clip_low: float = 0.2, clip_high: float = 0.28, agg: str = "token-mean"):
    """DAPO's clip-higher (Yu et al. 2025): a wider upper clip so low-probability tokens can rise."""
    return clipped_surrogate(x, clip_low, clip_high, agg)


# --- SAPO and its ablations (arXiv 2603.10069, Table 2) ---------------------------------------


def _with_kl_term(x: LossInputs, *, gamma, clip_eps, agg, ratio_gate, adv_gate=None):
    """GRPO + γ·K, K = aggregate((old_logp − logp) · ratio_gate, over the tokens inside `adv_gate`)."""
    pg, metrics = clipped_surrogate(x, clip_eps, clip_eps, agg)
    term = (x.old_logp - x.logp) * ratio_gate.to(x.logp.dtype)
    k = x.mean(term, agg, gate=adv_gate)
    gated = ratio_gate & x.select(adv_gate)
    metrics["loss/sapo_term"] = k
    metrics["loss/sapo_gated_frac"] = x.mean(gated.float())
    return pg + gamma * k, metrics


def _ratio_gate(x: LossInputs, tau: float, strict: bool):
    ratio = x.log_ratio.detach().exp()  # unclamped: the gate must see the true ratio
    return ratio < tau if strict else ratio <= tau


def _adv_gate(strict: bool):
    return (lambda a: a > 0) if strict else (lambda a: a >= 0)


@register_loss("sapo")
def sapo(x: LossInputs, *, gamma: float = 0.1, tau: float = 1.0, strict: bool = False,
         clip_eps: float = 0.2, agg: str = "token-mean"):
    """SAPO: GRPO + γ · masked_mean((old_logp − logp)·1[r ≤ τ], mask·1[A ≥ 0])."""
    return _with_kl_term(x, gamma=gamma, clip_eps=clip_eps, agg=agg, ratio_gate=_ratio_gate(x, tau, strict),
                         adv_gate=_adv_gate(strict))


@register_loss("sapo_kl_r")
def sapo_kl_r(x: LossInputs, *, gamma: float = 0.1, tau: float = 1.0, strict: bool = False,
              clip_eps: float = 0.2, agg: str = "token-mean"):
    """Ablation: SAPO's term with the ratio gate only, averaged over every unmasked token."""
    return _with_kl_term(x, gamma=gamma, clip_eps=clip_eps, agg=agg, ratio_gate=_ratio_gate(x, tau, strict))


@register_loss("sapo_kl")
def sapo_kl(x: LossInputs, *, gamma: float = 0.1, clip_eps: float = 0.2, agg: str = "token-mean"):
    """Ablation: the −log r term on every unmasked token, no gates."""
    return _with_kl_term(x, gamma=gamma, clip_eps=clip_eps, agg=agg, ratio_gate=x.mask)


# --- LLDS (arXiv 2512.04220), the closest prior art -------------------------------------------


def turn_ids(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) long: 1, 2, … for each contiguous run of unmasked tokens (a turn), 0 elsewhere."""
    starts = mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0), value=False)
    return starts.long().cumsum(-1) * mask.long()


def _llds_gate(x: LossInputs, delta: torch.Tensor, pos: torch.Tensor, gate: str) -> torch.Tensor:
    """Which tokens of the A ≥ 0 responses LLDS pulls on (bool, no gradient)."""
    if gate == "token":
        return pos
    if gate == "response":
        return pos & (masked_sum(delta, pos, dim=-1) > 0).unsqueeze(-1)
    ids = turn_ids(pos)
    sums = torch.zeros(ids.shape[0], ids.shape[1] + 1, dtype=delta.dtype, device=delta.device)
    sums = sums.scatter_add(1, ids, torch.where(pos, delta, torch.zeros_like(delta)))
    return pos & (sums.gather(1, ids) > 0)


@register_loss("llds")
def llds(x: LossInputs, *, lam: float = 0.2, gate: str = "action", denominator: str = "responses",
         clip_eps: float = 0.2, agg: str = "token-mean"):
    """GRPO + λ·L, L = mean over responses with A ≥ 0 of (1/|y_i|) Σ_turns 1[Σ_turn Δ > 0] · Σ_turn max(0, Δ).

    Δ = old_logp − logp; a turn is one contiguous run of generated tokens (the inserted passages
    between them are masked). gate "action" (the paper's LLDS-A, default), "response" (LLDS-R: one
    gate on Σ Δ over the whole response) or "token" (no gate). denominator "responses" is the
    paper's; "all_tokens" is its authors' code: Σ over the A ≥ 0 responses' tokens / every
    generated token of the batch. max(0, Δ) is written Δ·1[Δ ≥ 0] with the indicator detached:
    torch.maximum would halve the gradient of a token at Δ = 0 exactly (an on-policy r = 1), and
    the gates carry no gradient, as in the authors' code.
    """
    pg, metrics = clipped_surrogate(x, clip_eps, clip_eps, agg)
    delta = (x.old_logp - x.logp).detach()
    pos = x.select(_adv_gate(strict=False))
    pulled = _llds_gate(x, delta, pos, gate) & (delta >= 0)
    term = (x.old_logp - x.logp) * pulled.to(x.logp.dtype)
    if denominator == "responses":
        # per response over its generated tokens, then over the A ≥ 0 responses of the mini-batch
        per_seq = masked_sum(term, x.mask, dim=-1) / x.mask.sum(-1).clamp(min=1)
        n_pos = (x.scope.select(lambda a: a >= 0).sum(-1) > 0).sum().clamp(min=1)
        term_value = masked_sum(per_seq, pos.any(-1)) / n_pos
    else:
        term_value = x.mean(term)
    metrics["loss/llds_term"] = term_value
    metrics["loss/llds_gated_frac"] = x.mean(pulled.float())
    return pg + lam * term_value, metrics


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
    pg = x.mean(torch.maximum(surrogate, clipped), agg)
    return pg, {"loss/pg": pg, "loss/clip_frac": clip_fraction(s.detach(), x.adv, x.mask, clip_low, clip_high,
                                                               scope=x.scope.mask)}


@register_loss("soft_gate")
def soft_gate(x: LossInputs, *, tau_pos: float = 1.0, tau_neg: float = 1.05, agg: str = "token-mean"):
    """Qwen's Soft Adaptive Policy Optimization (arXiv 2511.20347) — NOT the SAPO of this project.

    −A · σ(τ(r − 1)) · 4/τ in place of clipping, τ = tau_pos where A > 0 else tau_neg; the gate's
    gradient equals the plain policy gradient at r = 1 and decays smoothly away from it.
    """
    t = torch.where(x.adv > 0, torch.full_like(x.ratio, tau_pos), torch.full_like(x.ratio, tau_neg))
    gate = torch.sigmoid(t * (x.ratio - 1)) * 4 / t
    pg = x.mean(-x.adv * gate, agg)
    return pg, {"loss/pg": pg}


# --- terms every algorithm shares ---------------------------------------------------------------


def ref_kl(logp, ref_logp, mask, *, beta: float = 0.001, agg: str = "token-mean", scope=None) -> LossOutput:
    """β · k3 KL to the frozen reference: k3 = exp(ref − logp) − (ref − logp) − 1, clamped to [−10, 10].

    scope (here and in the other shared terms): the mini-batch's mask, as for the policy losses (note 9).
    """
    check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    check_finite("logp", logp, mask)
    check_finite("ref_logp", ref_logp, mask)
    m = mask.bool()
    diff = torch.where(m, ref_logp.detach().to(logp.dtype) - logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    diff = diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # keeps exp finite, as veRL does
    k3 = (diff.exp() - diff - 1).clamp(-10, 10)
    kl = aggregate(k3, m, agg, scope=scope)
    return LossOutput(loss=beta * kl, metrics=to_floats({"loss/ref_kl": kl}))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits) over the last dimension."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_bonus(entropy, mask, *, coef: float = 0.001, agg: str = "token-mean", scope=None) -> LossOutput:
    """−coef · mean entropy over unmasked tokens (veRL's default, kept by both papers)."""
    check_finite("entropy", entropy, mask)
    h = aggregate(entropy, mask.bool(), agg, scope=scope)
    return LossOutput(loss=-coef * h, metrics=to_floats({"policy/entropy": h}))


def value_loss(values, old_values, returns, mask, *, clip_eps: float = 0.5, coef: float = 1.0,
               agg: str = "token-mean", scope=None) -> LossOutput:
    """PPO's clipped value loss: coef · ½ · mean(max((V − R)², (clip(V, V_old ± ε) − R)²))."""
    check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    for name, t in (("values", values), ("old_values", old_values), ("returns", returns)):
        check_finite(name, t, mask)
    m = mask.bool()
    old_values, returns = old_values.detach(), returns.detach()
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    per_token = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    vl = 0.5 * aggregate(per_token, m, agg, scope=scope)
    frac = aggregate(((clipped - returns) ** 2 > (values - returns) ** 2).to(values.dtype), m, scope=scope)
    return LossOutput(loss=coef * vl, metrics=to_floats({"loss/value": vl, "loss/value_clip_frac": frac}))
