"""Micro-batching never changes a loss (DESIGN §3): for every registered loss, with the reference KL
and entropy terms the module adds, one optimiser mini-batch's gradient equals the accumulated
gradients of its micro-batches, whatever their size, through the module's own code path."""

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from sapo_bench.algos import Algo
from sapo_bench.losses import LOSSES
from sapo_bench.module import TrainConfig, mini_batch_backward

D = torch.float64
N, W, BUDGET = 10, 16, 12


def _policy():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).to(D)


def _batch(policy, per_token_adv=False):
    """Ten right-padded rows: a prompt, a generated turn, a masked passage, another turn, padding;
    lengths differ, so micro-batches trim to different widths."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (N, W), generator=g)
    att = torch.zeros(N, W, dtype=torch.long)
    mask = torch.zeros(N, W, dtype=D)
    for i in range(N):
        prompt, turn1, passage, turn2 = 2 + i % 3, 1 + i % 4, 2 + i % 2, i % 3  # row 9: no second turn
        end = prompt + turn1 + passage + turn2
        att[i, :end] = 1
        mask[i, prompt:prompt + turn1] = 1
        mask[i, prompt + turn1 + passage:end] = 1
    from sapo_bench.module import token_logp

    with torch.no_grad():
        lp, _, _ = token_logp(policy, ids, att, mask=mask)
    noise = torch.randn(N, W, generator=g, dtype=D)
    old = torch.where(mask.bool(), lp + 0.3 * noise, torch.zeros_like(lp))  # ratios on both sides of the clips
    ref = torch.where(mask.bool(), lp - 0.2 * noise.roll(1, 0), torch.zeros_like(lp))
    adv = torch.tensor([1.2, -0.5, 0.0, 0.8, -1.1, 0.0, 0.3, -0.2, 1.5, 0.0], dtype=D)
    batch = {"ids": ids, "att": att, "mask": mask, "old_logp": old, "ref_logp": ref, "adv": adv,
             "old_values": None, "returns": None}
    if per_token_adv:  # PPO's GAE: per-token advantages, value targets
        batch["adv"] = torch.where(mask.bool(), torch.randn(N, W, generator=g, dtype=D), torch.zeros(N, W, dtype=D))
        batch["old_values"] = torch.randn(N, W, generator=g, dtype=D) * mask
        batch["returns"] = torch.randn(N, W, generator=g, dtype=D) * mask
    return batch


CASES = [(name, {}) for name in sorted(LOSSES)] + [
    ("llds", {"gate": "response"}), ("llds", {"gate": "token"}), ("llds", {"denominator": "all_tokens"}),
    ("sapo", {"strict": True}), ("grpo", {"agg": "seq-mean-token-mean"}), ("dr_grpo", {"norm_len": 7})]


@pytest.mark.parametrize("loss,params", CASES, ids=[f"{n}{p or ''}" for n, p in CASES])
def test_a_mini_batch_gradient_is_the_sum_of_its_micro_batches(loss, params):
    policy = _policy()
    value_head = nn.Linear(16, 1).to(D) if loss == "ppo" else None
    batch = _batch(policy, per_token_adv=loss == "ppo")
    algo = Algo(name=loss, loss=loss, advantage="gae" if loss == "ppo" else "grpo", loss_params=params,
                value_head=loss == "ppo")
    # coefficients large enough that the shared terms weigh in the comparison
    cfg = TrainConfig(prompts_per_step=2, group_size=5, mini_batch_size=N, micro_batch_size=N, ref_kl_beta=0.1,
                      entropy_coef=0.05)
    params_ = list(policy.parameters()) + (list(value_head.parameters()) if value_head is not None else [])
    idx = [3, 0, 7, 1, 9, 4, 8, 2, 6, 5]  # a shuffled mini-batch, as the module draws it

    def grads(micro):
        for p in params_:
            p.grad = None
        out = mini_batch_backward(policy, batch, idx, micro=micro, algo=algo, cfg=cfg, temperature=1.0,
                                  gen_budget=BUDGET, value_head=value_head)
        assert out is not None
        return [p.grad.clone() for p in params_], out[0], out[1]

    ref_grads, ref_logp, ref_metrics = grads(N)
    assert any(bool((g != 0).any()) for g in ref_grads)
    for micro in (1, 3, 5):
        got_grads, got_logp, got_metrics = grads(micro)
        for a, b in zip(got_grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got_logp, ref_logp, rtol=1e-9, atol=1e-12)
        assert got_metrics.keys() == ref_metrics.keys()
        for key in ref_metrics:
            # metrics are float32 (to_floats): equal to its precision
            assert got_metrics[key] == pytest.approx(ref_metrics[key], rel=1e-6, abs=1e-7), key


def test_dr_grpo_divides_by_the_generation_budget_not_the_padded_width():
    policy = _policy()
    batch = _batch(policy)
    cfg = TrainConfig(prompts_per_step=2, group_size=5, mini_batch_size=N, micro_batch_size=N)

    def pg(loss, budget):
        out = mini_batch_backward(policy, batch, list(range(N)), micro=N, algo=Algo(name=loss, loss=loss, advantage="grpo"),
                                  cfg=cfg, temperature=1.0, gen_budget=budget)
        return out[1]["loss/pg"]

    # Σ over tokens / (B · budget): doubling the budget halves it; the width W never enters
    assert pg("dr_grpo", 2 * BUDGET) == pytest.approx(pg("dr_grpo", BUDGET) / 2)
    tokens = float(batch["mask"].sum())
    assert pg("dr_grpo", BUDGET) == pytest.approx(pg("grpo", BUDGET) * tokens / (N * BUDGET))


def test_an_algo_entropy_coef_replaces_the_training_one():
    policy = _policy()
    batch = _batch(policy)

    def grad(algo, coef):
        policy.zero_grad()
        cfg = TrainConfig(prompts_per_step=2, group_size=5, mini_batch_size=N, micro_batch_size=N, entropy_coef=coef)
        mini_batch_backward(policy, batch, list(range(N)), micro=N, algo=algo, cfg=cfg, temperature=1.0, gen_budget=BUDGET)
        return [p.grad.clone() for p in policy.parameters()]

    grpo, noent = Algo(name="grpo", loss="grpo", advantage="grpo"), Algo(name="g0", loss="grpo", advantage="grpo",
                                                                       entropy_coef=0.0)
    for a, b in zip(grad(noent, 0.5), grad(grpo, 0.0)):
        torch.testing.assert_close(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(grad(noent, 0.5), grad(grpo, 0.5)))
