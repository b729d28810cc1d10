"""ISDD diagnostics (DESIGN §6): pure functions of (logp, old_logp, advantages, mask).

The training module only logs what these return. Names are stable; docs/metrics.md is the one
place that documents them. With an empty mask the statistics are NaN (there is nothing to
describe) and the counts are 0.
"""

from __future__ import annotations

import math

import torch

from sapo_bench.tensors import aggregate, masked_mean, masked_sum, prepare, to_floats


def clip_fraction(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  clip_low: float, clip_high: float, scope: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of unmasked tokens whose clipped surrogate is binding (no policy gradient).

    A token is clipped when A > 0 and r > 1 + clip_high, or A < 0 and r < 1 − clip_low: exactly
    the tokens where max(−A·r, −A·clip(r)) takes the constant branch. `scope`: the mask whose tokens
    it is a fraction of (the mini-batch's, when these rows are one micro-batch of it).
    """
    clipped = ((advantages > 0) & (ratio > 1 + clip_high)) | ((advantages < 0) & (ratio < 1 - clip_low))
    return aggregate(clipped.to(ratio.dtype), mask.bool(), scope=None if scope is None else scope.bool())


def _quantiles(values: torch.Tensor, qs: list[float]) -> list[torch.Tensor]:
    """Linear-interpolated quantiles (torch.quantile's rule) without its 16M-element limit."""
    v, _ = values.sort()
    n = v.numel()
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(v[lo] + (v[hi] - v[lo]) * (pos - lo))
    return out


SEQ_LEN_REF = 16  # generated tokens of a typical micro response (rollout/response_len ≈ 11-19)


@torch.no_grad()
def isdd_metrics(logp, old_logp, advantages, mask, *, tau: float = 1.0, seq_eps: float = 1e-3,
                 seq_len_ref: int = SEQ_LEN_REF) -> dict[str, float]:
    """Importance-ratio statistics that reveal ISDD before the reward collapses.

    tau          the ratio threshold of SAPO's gate (frac_below_tau counts r < tau)
    seq_eps      a sequence "has drifted" when ∏_t r_t < seq_eps (the paper's Definition 1)
    seq_len_ref  the length at which the length-aware companion of Definition 1 agrees with it

    ∏_t r_t sums the log-ratio of every token, so a response that runs to the length limit trips
    Definition 1 on the noise of its many near-1 ratios alone: a policy whose responses all hit the
    limit (an entropy runaway) reads 1.0 there with no drift per token. The companion
    (`isdd/frac_seq_geo_below_eps`) asks the geometric mean (∏_t r_t)^(1/|y|) to fall below
    seq_eps^(1/seq_len_ref): Definition 1 for a response of seq_len_ref tokens, and for any
    length the same drift per token, so length alone cannot trip it.
    """
    logp, old_logp, adv, m = prepare(logp, old_logp, advantages, mask)
    log_ratio = logp.float() - old_logp.float()
    ratio = log_ratio.exp()
    n_tok = int(m.sum())
    nan = float("nan")
    out: dict[str, float] = {"is_ratio/n_tokens": float(n_tok)}
    if n_tok == 0:
        out.update({k: nan for k in ("is_ratio/mean", "is_ratio/min", "is_ratio/max", "is_ratio/p1", "is_ratio/p5",
                                     "is_ratio/median", "is_ratio/frac_below_tau", "is_ratio/pos_frac_below_tau",
                                     "isdd/seq_log_ratio_mean", "isdd/seq_log_ratio_min",
                                     "isdd/frac_seq_prod_below_eps", "isdd/frac_seq_geo_below_eps",
                                     "policy/approx_kl")})
        return out
    vals = ratio[m]
    p1, p5, p50 = _quantiles(vals, [0.01, 0.05, 0.5])
    below = (ratio < tau).float()
    pos = m & (adv >= 0)
    seq_has = m.any(-1)
    seq_log_ratio = masked_sum(log_ratio, m, dim=-1)[seq_has]
    seq_mean_log_ratio = seq_log_ratio / m.sum(-1)[seq_has]
    out.update(to_floats({
        "is_ratio/mean": vals.mean(),
        "is_ratio/min": vals.min(),
        "is_ratio/max": vals.max(),
        "is_ratio/p1": p1,
        "is_ratio/p5": p5,
        "is_ratio/median": p50,
        "is_ratio/frac_below_tau": masked_mean(below, m),
        # NaN, not 0, when no token has A ≥ 0: "no drift" and "nothing to measure" must differ.
        "is_ratio/pos_frac_below_tau": torch.where(pos.any(), masked_mean(below, pos), torch.tensor(nan)),
        "isdd/seq_log_ratio_mean": seq_log_ratio.mean(),
        "isdd/seq_log_ratio_min": seq_log_ratio.min(),
        "isdd/frac_seq_prod_below_eps": (seq_log_ratio < math.log(seq_eps)).float().mean(),
        "isdd/frac_seq_geo_below_eps": (seq_mean_log_ratio < math.log(seq_eps) / seq_len_ref).float().mean(),
        # k3 estimator of KL(old ‖ new) from samples of the old policy: non-negative, low variance.
        "policy/approx_kl": masked_mean(ratio - 1 - log_ratio, m),
    }))
    return out
