"""Hand-computed cases for every registered loss, plus the properties a user relies on."""

import math

import pytest
import torch

from sapo_bench.losses import (
    LOSSES, Scope, entropy_bonus, entropy_from_logits, loss_params, policy_loss, ref_kl, turn_ids, value_loss,
)
from sapo_bench.settings import SettingError

D = torch.float64


def lr(*ratios):
    """Log-ratios for the given ratios, as logp with old_logp = 0."""
    return torch.tensor([math.log(r) for r in ratios], dtype=D)


def run(name, logp, adv, mask=None, old=None, **params):
    logp = logp.clone().requires_grad_(True)
    old = torch.zeros_like(logp) if old is None else old
    mask = torch.ones_like(logp) if mask is None else mask
    if name == "dr_grpo":  # its normaliser is a constant the caller gives (the module: the generation budget)
        params.setdefault("norm_len", 10)
    out = policy_loss(name, logp=logp, old_logp=old, advantages=adv, mask=mask, **params)
    (grad,) = torch.autograd.grad(out.loss, logp, allow_unused=True)
    return out, (torch.zeros_like(logp) if grad is None else grad)


# --- the clipped surrogate ---------------------------------------------------------------------

RATIOS = torch.stack([lr(1.0, 1.5, 0.5), lr(1.0, 1.5, 0.5)])
ADV = torch.tensor([1.0, -1.0], dtype=D)


def test_grpo_clips_on_both_sides_by_hand():
    out, grad = run("grpo", RATIOS, ADV)
    # A=+1: max(-r, -clip r) = -1, -1.2 (clipped high), -0.5;  A=-1: 1, 1.5, 0.8 (clipped low)
    assert out.loss.item() == pytest.approx((-1 - 1.2 - 0.5 + 1 + 1.5 + 0.8) / 6)
    assert out.metrics["loss/clip_frac"] == pytest.approx(2 / 6)
    # d loss / d logp = -A r / N where unclipped, 0 where clipped
    expected = torch.tensor([[-1.0, 0.0, -0.5], [1.0, 1.5, 0.0]], dtype=D) / 6
    torch.testing.assert_close(grad, expected)


def test_positive_advantage_token_far_above_clip_gets_no_policy_gradient():
    _, grad = run("grpo", lr(50.0, 1.0).unsqueeze(0), torch.tensor([2.0], dtype=D))
    assert grad[0, 0].item() == 0.0
    assert grad[0, 1].item() != 0.0


def test_ppo_is_the_same_clipped_surrogate_as_grpo():
    a, ga = run("grpo", RATIOS, ADV)
    b, gb = run("ppo", RATIOS, ADV)
    assert a.loss.item() == b.loss.item()
    torch.testing.assert_close(ga, gb)


def test_seq_mean_token_mean_weights_sequences_equally():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=D)
    out, _ = run("grpo", RATIOS, ADV, mask=mask, agg="seq-mean-token-mean")
    seq0 = (-1 - 1.2 - 0.5) / 3
    seq1 = 1.0
    assert out.loss.item() == pytest.approx((seq0 + seq1) / 2)
    tok, _ = run("grpo", RATIOS, ADV, mask=mask)
    assert tok.loss.item() == pytest.approx((-1 - 1.2 - 0.5 + 1) / 4)


def test_dapo_clips_higher_only_above():
    logp = torch.stack([lr(1.25, 0.75)])
    out, grad = run("dapo", logp, torch.tensor([1.0], dtype=D))
    # r=1.25 < 1+0.28 is not clipped; r=0.75 with A>0 is never clipped (min(-r,-clip r) takes -0.75)
    assert out.loss.item() == pytest.approx((-1.25 - 0.75) / 2)
    assert out.metrics["loss/clip_frac"] == 0.0
    grpo, _ = run("grpo", logp, torch.tensor([1.0], dtype=D))
    assert grpo.loss.item() == pytest.approx((-1.2 - 0.75) / 2)
    neg, _ = run("dapo", torch.stack([lr(0.7)]), torch.tensor([-1.0], dtype=D))
    assert neg.loss.item() == pytest.approx(0.8)  # clip_low stays 0.2


def test_dr_grpo_uses_a_constant_normaliser():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=D)
    total = -1 - 1.2 - 0.5 + 1
    out, _ = run("dr_grpo", RATIOS, ADV, mask=mask, norm_len=10)
    assert out.loss.item() == pytest.approx(total / (2 * 10))
    # without norm_len: the generation budget the scope carries, never the tensors' padded width (3)
    out = policy_loss("dr_grpo", logp=RATIOS, old_logp=torch.zeros_like(RATIOS), advantages=ADV, mask=mask,
                      scope=Scope.of(mask, ADV, gen_budget=7))
    assert out.loss.item() == pytest.approx(total / (2 * 7))
    with pytest.raises(ValueError, match="dr_grpo needs a constant normaliser"):
        policy_loss("dr_grpo", logp=RATIOS, old_logp=torch.zeros_like(RATIOS), advantages=ADV, mask=mask)


# --- SAPO and its ablations -------------------------------------------------------------------

# seq0 A=+1 with r = 1 (the gate edge r = tau) and 0.5; seq1 A = 0 with r = 2 and 0.8;
# seq2 A = -1 with r = 0.5 and 1.
SAPO_LOGP = torch.stack([lr(1.0, 0.5), lr(2.0, 0.8), lr(0.5, 1.0)])
SAPO_ADV = torch.tensor([1.0, 0.0, -1.0], dtype=D)


def test_sapo_term_by_hand_released_gate():
    out, _ = run("sapo", SAPO_LOGP, SAPO_ADV)
    # gate A >= 0 keeps seq0 and seq1: N = 4 tokens; r <= 1 keeps (0,0), (0,1), (1,1)
    k = (0.0 + math.log(2) + -math.log(0.8)) / 4
    assert out.metrics["loss/sapo_term"] == pytest.approx(k)
    grpo, _ = run("grpo", SAPO_LOGP, SAPO_ADV)
    assert out.loss.item() == pytest.approx(grpo.loss.item() + 0.1 * k)
    assert out.metrics["loss/pg"] == pytest.approx(grpo.loss.item())


def test_sapo_term_by_hand_strict_gate():
    out, _ = run("sapo", SAPO_LOGP, SAPO_ADV, strict=True)
    # gate A > 0 keeps seq0 only: N = 2; r < 1 keeps (0,1) only
    assert out.metrics["loss/sapo_term"] == pytest.approx(math.log(2) / 2)


@pytest.mark.parametrize("strict,gated,n", [
    (False, [(0, 0), (0, 1), (1, 1)], 4),
    (True, [(0, 1)], 2),
])
def test_sapo_adds_minus_gamma_over_n_on_each_gated_token_whatever_r(strict, gated, n):
    gamma = 0.3
    _, g_sapo = run("sapo", SAPO_LOGP, SAPO_ADV, gamma=gamma, strict=strict)
    _, g_grpo = run("grpo", SAPO_LOGP, SAPO_ADV)
    expected = torch.zeros_like(g_sapo)
    for i, t in gated:
        expected[i, t] = -gamma / n
    torch.testing.assert_close(g_sapo - g_grpo, expected)


def test_sapo_gradient_does_not_shrink_with_the_ratio():
    # The whole point: a token at r -> 0 still gets a pull of -gamma/N, unlike the surrogate's r-scaled one.
    logp = torch.stack([lr(1e-6, 1e-2, 1.0)])
    _, g_sapo = run("sapo", logp, torch.tensor([1.0], dtype=D))
    _, g_grpo = run("grpo", logp, torch.tensor([1.0], dtype=D))
    torch.testing.assert_close(g_sapo - g_grpo, torch.full_like(g_sapo, -0.1 / 3))


def test_sapo_with_no_nonnegative_advantage_adds_exactly_zero():
    adv = torch.tensor([-1.0, -0.5, -2.0], dtype=D)
    out, g = run("sapo", SAPO_LOGP, adv)
    grpo, g_grpo = run("grpo", SAPO_LOGP, adv)
    assert out.metrics["loss/sapo_term"] == 0.0
    assert out.loss.item() == grpo.loss.item()
    torch.testing.assert_close(g, g_grpo)


def test_sapo_kl_has_no_gates():
    out, grad = run("sapo_kl", SAPO_LOGP, SAPO_ADV)
    k = -SAPO_LOGP.sum().item() / 6
    assert out.metrics["loss/sapo_term"] == pytest.approx(k)
    _, g_grpo = run("grpo", SAPO_LOGP, SAPO_ADV)
    torch.testing.assert_close(grad - g_grpo, torch.full_like(grad, -0.1 / 6))


def test_sapo_kl_r_gates_on_ratio_only_over_all_tokens():
    out, grad = run("sapo_kl_r", SAPO_LOGP, SAPO_ADV)
    # r <= 1: (0,0), (0,1), (1,1), (2,0), (2,1); denominator all 6 tokens
    k = (0 + math.log(2) - math.log(0.8) + math.log(2) + 0) / 6
    assert out.metrics["loss/sapo_term"] == pytest.approx(k)
    _, g_grpo = run("grpo", SAPO_LOGP, SAPO_ADV)
    expected = torch.full_like(grad, -0.1 / 6)
    expected[1, 0] = 0.0
    torch.testing.assert_close(grad - g_grpo, expected)


def test_sapo_tau_moves_the_ratio_gate():
    out, _ = run("sapo", SAPO_LOGP, SAPO_ADV, tau=0.6)
    # r <= 0.6 among A >= 0 tokens: only (0,1) with r = 0.5; still N = 4
    assert out.metrics["loss/sapo_term"] == pytest.approx(math.log(2) / 4)


# --- LLDS (arXiv 2512.04220) -------------------------------------------------------------------

# old_logp = 0, so Δ = old − logp = −logp. Row 0 (A = +1): turn 1 = tokens 0-1 (Δ 0.5, −0.2), a
# masked passage at 2-3, turn 2 = tokens 4-5 (Δ −0.5, 0.1), padding at 6. Row 1 (A = 0): one turn
# (Δ 0.2, 0.3, −0.1). Row 2 (A = −1): outside Y_pre whatever its Δ.
LLDS_DELTA = torch.tensor([[0.5, -0.2, 9.0, 9.0, -0.5, 0.1, 9.0],
                           [0.2, 0.3, -0.1, 0.0, 0.0, 0.0, 0.0],
                           [0.4, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=D)
LLDS_MASK = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]], dtype=D)
LLDS_ADV = torch.tensor([1.0, 0.0, -1.0], dtype=D)


def test_turns_are_contiguous_runs_of_generated_tokens():
    mask = torch.tensor([[1, 1, 0, 1, 0, 1, 1], [0, 0, 1, 1, 1, 0, 0]]).bool()
    assert turn_ids(mask).tolist() == [[1, 1, 0, 2, 0, 3, 3], [0, 0, 1, 1, 1, 0, 0]]


@pytest.mark.parametrize("gate,term,pulled", [
    # action: row 0 turn 1 sums to 0.3 > 0 (its Δ = 0.5 token pulls, the −0.2 one has max(0, Δ) = 0),
    # turn 2 sums to −0.4 (off); row 1 sums to 0.4 (0.2 + 0.3 pull). (0.5/4 + 0.5/3) / 2 responses
    ("action", (0.5 / 4 + 0.5 / 3) / 2, [(0, 0), (1, 0), (1, 1)]),
    # response: row 0 sums to 0.3 − 0.4 = −0.1 (off as a whole); row 1 on. (0 + 0.5/3) / 2
    ("response", (0.5 / 3) / 2, [(1, 0), (1, 1)]),
    # token: every Δ > 0 of Y_pre. ((0.5 + 0.1)/4 + 0.5/3) / 2
    ("token", (0.6 / 4 + 0.5 / 3) / 2, [(0, 0), (0, 5), (1, 0), (1, 1)]),
])
def test_llds_by_hand(gate, term, pulled):
    out, grad = run("llds", -LLDS_DELTA, LLDS_ADV, mask=LLDS_MASK, gate=gate)
    grpo, g_grpo = run("grpo", -LLDS_DELTA, LLDS_ADV, mask=LLDS_MASK)
    assert out.metrics["loss/llds_term"] == pytest.approx(term)
    assert out.loss.item() == pytest.approx(grpo.loss.item() + 0.2 * term)
    assert out.metrics["loss/llds_gated_frac"] == pytest.approx(len(pulled) / 9)  # of the 9 generated tokens
    # d(λ L)/d logp = −λ / (|Y_pre| · |y_i|) on each pulled token: rows 0 and 1 have 4 and 3 tokens
    expected = torch.zeros_like(grad)
    for i, t in pulled:
        expected[i, t] = -0.2 / (2 * (4, 3)[i])
    torch.testing.assert_close(grad - g_grpo, expected)


def test_llds_authors_code_denominator_counts_every_generated_token():
    out, _ = run("llds", -LLDS_DELTA, LLDS_ADV, mask=LLDS_MASK, denominator="all_tokens")
    assert out.metrics["loss/llds_term"] == pytest.approx((0.5 + 0.5) / 9)  # A < 0 row 2 counted below


def test_llds_with_no_nonnegative_advantage_adds_exactly_zero():
    adv = torch.tensor([-1.0, -0.5, -2.0], dtype=D)
    for gate in ("action", "response", "token"):
        out, g = run("llds", -LLDS_DELTA, adv, mask=LLDS_MASK, gate=gate)
        grpo, g_grpo = run("grpo", -LLDS_DELTA, adv, mask=LLDS_MASK)
        assert out.metrics["loss/llds_term"] == 0.0 and out.loss.item() == grpo.loss.item()
        torch.testing.assert_close(g, g_grpo)


def test_llds_gradient_flows_through_logp_only():
    logp = (-LLDS_DELTA).clone().requires_grad_(True)
    old = torch.zeros_like(logp, requires_grad=True)
    adv = LLDS_ADV.clone().requires_grad_(True)
    out = policy_loss("llds", logp=logp, old_logp=old, advantages=adv, mask=LLDS_MASK)
    g_logp, g_old, g_adv = torch.autograd.grad(out.loss, [logp, old, adv], allow_unused=True)
    assert g_old is None and g_adv is None and bool((g_logp != 0).any())


def test_sapo_is_llds_token_level_with_its_weight_when_responses_are_equally_long():
    # SAPO's (old − logp)·1[r ≤ 1] is max(0, Δ); with equal lengths its A ≥ 0 token mean is LLDS's
    # mean over responses of per-response means, so γ = λ makes the two losses one.
    logp, old, _, _ = _batch(4)
    adv = torch.tensor([1.0, 0.0, -1.0], dtype=D)
    a, ga = run("sapo", logp, adv, old=old, gamma=0.2)
    b, gb = run("llds", logp, adv, old=old, gate="token", lam=0.2)
    assert a.loss.item() == pytest.approx(b.loss.item())
    torch.testing.assert_close(ga, gb)


# --- GSPO and the soft gate -------------------------------------------------------------------


def test_gspo_clips_the_sequence_ratio():
    logp = torch.stack([torch.tensor([0.1, -0.1], dtype=D), torch.tensor([0.2, 0.2], dtype=D)])
    out, grad = run("gspo", logp, torch.tensor([1.0, 1.0], dtype=D))
    # seq0: s = exp(0) = 1, loss -1; seq1: s = e^0.2, clipped to 1 + 4e-4
    assert out.loss.item() == pytest.approx((-1 + -(1 + 4e-4)) / 2)
    # seq0 gradient per token: -A s / |y| / B; seq1 clipped: 0
    torch.testing.assert_close(grad, torch.tensor([[-0.25, -0.25], [0.0, 0.0]], dtype=D))
    assert out.metrics["loss/clip_frac"] == pytest.approx(0.5)


def test_soft_gate_value_and_on_policy_gradient():
    logp = torch.zeros(2, 2, dtype=D)
    adv = torch.tensor([1.0, -2.0], dtype=D)
    out, grad = run("soft_gate", logp, adv)
    # at r = 1: value -A * sigmoid(0) * 4 / tau = -2A / tau; gradient -A / N (plain policy gradient)
    assert out.loss.item() == pytest.approx((2 * -2 / 1.0 + 2 * 4 / 1.05) / 4)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -1.0], [2.0, 2.0]], dtype=D) / 4)


@pytest.mark.parametrize("r", [0.5, 1.1, 3.0, 20.0])
def test_soft_gate_weights_the_importance_sampled_gradient_by_a_smooth_gate(r):
    _, grad = run("soft_gate", lr(r).unsqueeze(0), torch.tensor([1.0], dtype=D))
    # relative to the IS gradient -A r, the weight is 4 sigma(x)(1 - sigma(x)), x = tau (r - 1): 1 at r = 1
    s = 1 / (1 + math.exp(-(r - 1)))
    assert grad.item() / -r == pytest.approx(4 * s * (1 - s))
    assert 0 < 4 * s * (1 - s) < 1


# --- properties every loss must have ----------------------------------------------------------

ALL = sorted(LOSSES)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(3, 4, generator=g, dtype=D) * 3
    old = logp + torch.randn(3, 4, generator=g, dtype=D) * 0.3
    adv = torch.randn(3, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 1, 0]], dtype=D)
    return logp, old, adv, mask


@pytest.mark.parametrize("name", ALL)
def test_masked_tokens_contribute_nothing_to_value_or_gradient(name):
    logp, old, adv, mask = _batch()
    clean, g_clean = run(name, logp, adv, mask=mask, old=old)
    dirty_logp = torch.where(mask.bool(), logp, torch.tensor(float("nan"), dtype=D))
    dirty_old = torch.where(mask.bool(), old, torch.tensor(float("-inf"), dtype=D))
    dirty, g_dirty = run(name, dirty_logp, adv, mask=mask, old=dirty_old)
    assert dirty.loss.item() == pytest.approx(clean.loss.item())
    torch.testing.assert_close(g_dirty, g_clean)
    assert bool((g_dirty[~mask.bool()] == 0).all())
    # and changing a masked value changes nothing
    moved, _ = run(name, logp + (1 - mask) * 5.0, adv, mask=mask, old=old)
    assert moved.loss.item() == pytest.approx(clean.loss.item())


@pytest.mark.parametrize("name", ALL)
def test_per_token_advantages_equal_broadcast_per_sequence_ones(name):
    logp, old, adv, mask = _batch(1)
    a, ga = run(name, logp, adv, mask=mask, old=old)
    b, gb = run(name, logp, adv[:, None].expand_as(logp).clone(), mask=mask, old=old)
    assert a.loss.item() == pytest.approx(b.loss.item())
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("name", ALL)
def test_all_zero_mask_gives_zero_loss_and_zero_gradient(name):
    logp, old, adv, _ = _batch(2)
    out, grad = run(name, logp, adv, mask=torch.zeros_like(logp), old=old)
    assert out.loss.item() == 0.0
    assert out.loss.requires_grad
    assert bool((grad == 0).all())
    assert all(math.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("tensor", ["logp", "old_logp", "advantages"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_an_error_naming_the_tensor(name, tensor, bad):
    logp, old, adv, mask = _batch(3)
    inputs = {"logp": logp.clone(), "old_logp": old.clone(), "advantages": adv.clone()}
    inputs[tensor].view(-1)[1] = bad  # index 1 is unmasked in row 0
    with pytest.raises(ValueError, match=rf"^{tensor} holds"):
        policy_loss(name, mask=mask, **inputs)


def test_shape_mismatch_names_both_shapes():
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match=r"logp has shape \(3, 4\) but old_logp has shape \(3, 5\)"):
        policy_loss("grpo", logp=logp, old_logp=torch.zeros(3, 5, dtype=D), advantages=adv, mask=mask)
    with pytest.raises(ValueError, match=r"advantages has shape \(2,\) but mask has shape \(3, 4\)"):
        policy_loss("grpo", logp=logp, old_logp=old, advantages=adv[:2], mask=mask)
    with pytest.raises(ValueError, match=r"mask has shape \(3, 4\) but advantages has shape \(3, 2\)"):
        policy_loss("grpo", logp=logp, old_logp=old, advantages=torch.zeros(3, 2, dtype=D), mask=mask)


def test_unknown_loss_and_parameter_list_the_valid_ones():
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match=r"unknown loss 'sapoo'; valid: .*grpo.*sapo.*soft_gate"):
        policy_loss("sapoo", logp=logp, old_logp=old, advantages=adv, mask=mask)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) 'gama' for loss 'sapo'; valid: gamma, tau, strict"):
        policy_loss("sapo", logp=logp, old_logp=old, advantages=adv, mask=mask, gama=0.1)
    with pytest.raises(SettingError, match=r"algo.loss_params.agg must be one of token-mean, seq-mean-token-mean"):
        policy_loss("grpo", logp=logp, old_logp=old, advantages=adv, mask=mask, agg="mean")


@pytest.mark.parametrize("loss,params,says", [
    ("llds", {"gate": "turn"}, "algo.loss_params.gate must be one of action, response, token, got 'turn'"),
    ("llds", {"denominator": "tokens"}, "algo.loss_params.denominator must be one of responses, all_tokens"),
    ("llds", {"lam": -0.2}, "algo.loss_params.lam must be at least 0, got -0.2"),
    ("sapo", {"strict": "yes"}, "algo.loss_params.strict must be true or false, got 'yes'"),
    ("sapo", {"gamma": float("nan")}, "algo.loss_params.gamma must be a finite number"),
    ("dr_grpo", {"norm_len": 0}, "algo.loss_params.norm_len must be at least 1, got 0"),
    ("dr_grpo", {"norm_len": 2.5}, "algo.loss_params.norm_len must be a whole number, got 2.5"),
])
def test_a_loss_parameter_of_the_wrong_kind_names_itself(loss, params, says):
    logp, old, adv, mask = _batch()
    with pytest.raises(SettingError, match=says):
        policy_loss(loss, logp=logp, old_logp=old, advantages=adv, mask=mask, **params)


def test_defaults_match_the_released_code():
    assert loss_params("grpo") == {"clip_eps": 0.2, "agg": "token-mean"}
    assert loss_params("sapo") == {"gamma": 0.1, "tau": 1.0, "strict": False, "clip_eps": 0.2, "agg": "token-mean"}
    assert loss_params("dapo")["clip_high"] == 0.28
    assert loss_params("soft_gate") == {"tau_pos": 1.0, "tau_neg": 1.05, "agg": "token-mean"}
    assert loss_params("llds") == {"lam": 0.2, "gate": "action", "denominator": "responses", "clip_eps": 0.2,
                                   "agg": "token-mean"}


def test_loss_runs_in_bfloat16_without_nan():
    logp, old, adv, mask = _batch()
    out, grad = run("sapo", logp.bfloat16(), adv.bfloat16(), mask=mask.bfloat16(), old=old.bfloat16())
    assert math.isfinite(out.loss.item()) and bool(torch.isfinite(grad).all())


# --- the shared terms -------------------------------------------------------------------------


def test_ref_kl_k3_by_hand():
    logp = torch.zeros(1, 2, dtype=D, requires_grad=True)
    ref = torch.tensor([[math.log(2), 0.0]], dtype=D)
    out = ref_kl(logp, ref, torch.tensor([[1.0, 1.0]], dtype=D), beta=0.5)
    k3 = 2 - math.log(2) - 1
    assert out.metrics["loss/ref_kl"] == pytest.approx(k3 / 2)
    assert out.loss.item() == pytest.approx(0.5 * k3 / 2)
    out.loss.backward()
    # d k3 / d logp = -exp(ref - logp) + 1
    torch.testing.assert_close(logp.grad, torch.tensor([[0.5 * (1 - 2) / 2, 0.0]], dtype=D))


def test_ref_kl_is_clamped_and_ignores_masked_tokens():
    logp = torch.tensor([[-30.0, 0.0]], dtype=D)
    out = ref_kl(logp, torch.tensor([[0.0, float("nan")]], dtype=D), torch.tensor([[1.0, 0.0]], dtype=D))
    assert out.metrics["loss/ref_kl"] == 10.0
    with pytest.raises(ValueError, match="^ref_logp holds"):
        ref_kl(logp, torch.tensor([[float("nan"), 0.0]], dtype=D), torch.ones(1, 2, dtype=D))


def test_entropy_of_uniform_logits_is_log_vocab_and_bonus_is_negative():
    ent = entropy_from_logits(torch.zeros(2, 3, 7))
    torch.testing.assert_close(ent, torch.full((2, 3), math.log(7)))
    out = entropy_bonus(ent, torch.tensor([[1, 1, 0], [0, 0, 0]]), coef=0.01)
    assert out.metrics["policy/entropy"] == pytest.approx(math.log(7))
    assert out.loss.item() == pytest.approx(-0.01 * math.log(7))


def test_value_loss_clips_by_hand():
    values = torch.tensor([[2.0, 0.1]], dtype=D, requires_grad=True)
    old = torch.zeros(1, 2, dtype=D)
    ret = torch.tensor([[0.0, 1.0]], dtype=D)
    out = value_loss(values, old, ret, torch.ones(1, 2, dtype=D), clip_eps=0.5)
    # tok0: max((2-0)^2, (0.5-0)^2) = 4; tok1: max(0.81, 0.81) = 0.81
    assert out.metrics["loss/value"] == pytest.approx(0.5 * (4 + 0.81) / 2)
    assert out.metrics["loss/value_clip_frac"] == 0.0
    out.loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.5 * 2 * 2 / 2, 0.5 * 2 * (0.1 - 1) / 2]], dtype=D))
