"""SearchAgentRLModule: rollout → reward → advantages → off-policy mini-batch updates (DESIGN §2).

How this differs from a textbook PPO/GRPO trainer:
1. Manual optimisation. One training step = one rollout batch (P prompts × G responses), then
   `ppo_epochs` × (P·G / mini_batch_size) optimiser steps over it. Mini-batches after the first
   are off-policy: that is where importance ratios drift and where ISDD lives.
2. The module never branches on an algorithm's name: the loss and the advantage estimator are
   looked up by name; only a value head (PPO) adds a term.
3. The prompts of step s, the sampling generator and the mini-batch order are pure functions of
   (seed, s): a run resumed from a checkpoint replays exactly what it would have done.
4. old_logp are the behaviour log-probs recorded while sampling when the engine computes them
   with the training forward's numerics (the hf engine); with an engine whose numerics differ
   (vLLM) `recompute_old_logp` defaults to true: a full forward recomputes them, as veRL and TRL
   do, and the gap to the engine's (`rollout/logp_gap_mean`, `_max`) is logged every step. The
   optional truncated importance sampling (`tis`) then reweights each token's policy gradient by
   min(exp(old − behaviour), tis_cap) (see `tis_weights`). After each rollout step's optimiser
   steps an engine with its own copy of the weights gets the new ones and checks them
   (`rollout.sync_engine`): stale weights stop the run instead of silently going off-policy.
5. A non-finite loss skips its optimiser step and is counted; `nonfinite_patience` of them in a
   row mark the run collapsed and stop it. Collapse by drift is detected separately
   (`CollapseDetector`) and recorded; the run goes on so the figure shows it.
6. The reference policy is the frozen initial policy. It is not saved in checkpoints: the warm
   start it comes from is cached and deterministic.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field

import lightning as L
import torch
from torch import nn

from sapo_bench.advantages import get_advantage
from sapo_bench.algos import Algo
from sapo_bench.diagnostics import isdd_metrics
from sapo_bench.evaluate import score
from sapo_bench.losses import entropy_bonus, policy_loss, ref_kl, value_loss
from sapo_bench.rewards import get_metric
from sapo_bench.rollout import (RolloutBatch, RolloutConfig, engine_exact_logp, make_engine, release_engine, rollout,
                                sync_engine)
from sapo_bench.settings import SettingError, check_int, check_number


@dataclass
class TrainConfig:
    prompts_per_step: int = 8
    group_size: int = 5
    mini_batch_size: int = 20     # responses per optimiser step
    micro_batch_size: int = 20    # responses per forward; gradients accumulate within a mini-batch
    ppo_epochs: int = 1
    max_steps: int = 20           # training (rollout) steps
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0     # of all optimiser steps, linear
    grad_clip: float = 1.0
    ref_kl_beta: float = 0.001
    entropy_coef: float = 0.001
    reward: str = "em"
    # None: true exactly when the engine's log-probs are not the training forward's (vLLM), so
    # that the importance ratio's denominator comes from the training numerics.
    recompute_old_logp: bool | None = None
    tis: bool = False             # truncated importance sampling against the engine's numerics
    tis_cap: float = 2.0          # C of min(exp(old − behaviour), C)
    nonfinite_patience: int = 5
    collapse: dict = field(default_factory=lambda: {"window": 5, "frac": 0.5, "min_steps": 10})

    def __post_init__(self):
        for name in ("prompts_per_step", "group_size", "mini_batch_size", "micro_batch_size", "ppo_epochs",
                     "max_steps", "nonfinite_patience"):
            check_int(f"train.{name}", getattr(self, name))
        batch = self.prompts_per_step * self.group_size
        if self.mini_batch_size > batch:
            raise SettingError(f"train.mini_batch_size ({self.mini_batch_size}) is larger than the rollout batch, "
                               f"train.prompts_per_step × train.group_size = {self.prompts_per_step} × "
                               f"{self.group_size} = {batch}: lower it, or roll out more")
        if self.mini_batch_size % self.micro_batch_size:
            raise SettingError(f"train.micro_batch_size ({self.micro_batch_size}) must divide "
                               f"train.mini_batch_size ({self.mini_batch_size}), so that every forward of a "
                               "mini-batch has the same size")
        check_number("train.lr", self.lr, minimum=0)
        check_number("train.weight_decay", self.weight_decay, minimum=0)
        check_number("train.warmup_ratio", self.warmup_ratio, minimum=0, maximum=1)
        check_number("train.grad_clip", self.grad_clip, minimum=0)  # 0: no clipping, as in Lightning
        check_number("train.ref_kl_beta", self.ref_kl_beta, minimum=0)
        check_number("train.entropy_coef", self.entropy_coef)
        check_number("train.tis_cap", self.tis_cap, positive=True)
        get_metric(self.reward)  # an unknown name fails here, listing the valid ones
        for key, value in self.collapse.items():  # CollapseDetector's arguments
            if key == "window":
                check_int("train.collapse.window", value)
            elif key == "frac":
                check_number("train.collapse.frac", value, positive=True, maximum=1)
            elif key == "min_steps":
                check_int("train.collapse.min_steps", value, minimum=0)
            else:
                raise SettingError(f"unknown train.collapse key {key!r}; valid: window, frac, min_steps")

    def recompute_for(self, backend: str) -> bool:
        """Whether old log-probs are recomputed by the training forward with this rollout backend."""
        return (not engine_exact_logp(backend)) if self.recompute_old_logp is None else bool(self.recompute_old_logp)


# Estimators whose baseline is the group's own mean: a group of one response is its own baseline,
# so its advantage is 0 and such a run learns nothing.
GROUP_MEAN_BASELINE = ("grpo", "dr_grpo")


def check_run(train_cfg: TrainConfig, algo: Algo, rollout_cfg: RolloutConfig) -> None:
    """What TrainConfig cannot check alone: settings that cannot work with this algorithm or engine."""
    if train_cfg.group_size < 2 and algo.advantage in GROUP_MEAN_BASELINE:
        raise SettingError(f"train.group_size=1 cannot train algo {algo.name!r}: its {algo.advantage} advantage "
                           "compares each response with its group's mean, which a group of one is, so every "
                           "advantage is 0; use train.group_size of 2 or more")
    if train_cfg.tis and not train_cfg.recompute_for(rollout_cfg.backend):
        raise SettingError("train.tis=true weighs tokens by exp(old − behaviour), which needs the old log-probs "
                           "recomputed by the training forward: set train.recompute_old_logp=true (or null)")


class CollapseDetector:
    """Records the first step where reward and IS-ratio means both sit far below their running maxima.

    Both smoothed over `window` steps; "far below" = under `frac` × the best smoothed value seen,
    checked only after `min_steps` steps. This is the paper's Figure 1 signature of ISDD.
    """

    def __init__(self, window: int = 5, frac: float = 0.5, min_steps: int = 10):
        self.window, self.frac, self.min_steps = window, frac, min_steps
        self.history: list[tuple[float, float]] = []
        self.best = (-math.inf, -math.inf)
        self.step: int | None = None

    def update(self, step: int, reward: float, ratio: float) -> int | None:
        self.history = (self.history + [(reward, ratio)])[-self.window:]
        r = sum(h[0] for h in self.history) / len(self.history)
        q = sum(h[1] for h in self.history) / len(self.history)
        self.best = (max(self.best[0], r), max(self.best[1], q))
        if (self.step is None and step >= self.min_steps and self.best[0] > 0
                and r < self.frac * self.best[0] and q < self.frac * self.best[1]):
            self.step = step
        return self.step

    def state_dict(self) -> dict:
        return {"history": self.history, "best": self.best, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.best, self.step = [tuple(h) for h in state["history"]], tuple(state["best"]), state["step"]


def tis_weights(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, cap: float):
    """Truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings
    You Off-Policy RL Training"; veRL's `tis_imp_ratio_cap`, TRL's `vllm_importance_sampling_*`):
    w = min(exp(old − behaviour), cap) per generated token, 1 elsewhere, no gradient. `old` is the
    training forward's log-prob of the token before the update, `behaviour` the engine's that
    sampled it: w corrects for the engine sampling from a slightly different distribution than
    the one the importance ratio assumes, and the cap bounds its variance.
    """
    log_w = (old_logp - behaviour_logp).clamp(max=math.log(cap))
    return torch.where(mask.bool(), log_w.exp(), torch.ones_like(log_w)).detach()


def token_logp(model, ids, attention_mask, temperature: float = 1.0, *, mask=None, entropy: bool = False,
               value_head=None):
    """Log-prob of each token given its prefix, aligned with ids: (B, L), 0 where not computed.

    The vocabulary projection runs only where `mask` is set (the generated tokens; all tokens if
    None): at micro scale the head costs as much as the body, and most positions are prompt and
    passages. Also returns the entropy of the next-token distribution and the value estimate
    V(state before token t) at the same positions when asked, else None.
    """
    h = model.get_decoder()(input_ids=ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    sel = (attention_mask if mask is None else mask)[:, 1:].bool()
    hs = h[sel]
    logits = model.get_output_embeddings()(hs).float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    where = sel.nonzero(as_tuple=True)

    def place(values):
        out = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=values.dtype, device=values.device)
        out = out.index_put(where, values)
        return torch.cat([torch.zeros_like(out[:, :1]), out], 1)

    lp = place(logp_all.gather(-1, ids[:, 1:][sel][:, None])[:, 0])
    ent = place(-(logp_all.exp() * logp_all).sum(-1)) if entropy else None
    val = place(value_head(hs.float())[:, 0]) if value_head is not None else None
    return lp, ent, val


class SearchAgentRLModule(L.LightningModule):
    def __init__(self, policy, tokenizer, ref_policy, retriever, algo: Algo, train_set, val_sets: dict,
                 test_sets: dict, rollout_cfg: RolloutConfig, train_cfg: TrainConfig, seed: int = 0,
                 eval_batch_size: int = 32):
        super().__init__()
        self.automatic_optimization = False
        self.policy, self.tok, self.retriever, self.algo = policy, tokenizer, retriever, algo
        object.__setattr__(self, "ref_policy", ref_policy)  # not a submodule: never saved, never trained
        self.ref_policy.requires_grad_(False).eval()
        self.value_head = nn.Linear(policy.config.hidden_size, 1) if algo.value_head else None
        self.train_set, self.val_sets, self.test_sets = train_set, val_sets, test_sets
        self.rcfg, self.cfg, self.seed, self.eval_batch_size = rollout_cfg, train_cfg, seed, eval_batch_size
        self.metric = get_metric(train_cfg.reward)
        self.advantage = get_advantage(algo.advantage)
        self.n_responses = train_cfg.prompts_per_step * train_cfg.group_size
        self.opt_steps_per_rollout = train_cfg.ppo_epochs * math.ceil(self.n_responses / train_cfg.mini_batch_size)
        self.rollout_step = 0
        self.nonfinite_total = self.nonfinite_run = 0
        self.collapsed_reason: str | None = None
        self.collapse = CollapseDetector(**train_cfg.collapse)
        self.test_results: dict = {}
        self.tau = float(algo.loss_params.get("tau", 1.0))
        check_run(train_cfg, algo, rollout_cfg)
        self.recompute = train_cfg.recompute_for(rollout_cfg.backend)
        self._perms: dict[int, list[int]] = {}
        self._eval: dict[str, list] = {}

    # --- data -----------------------------------------------------------------------------------

    def _prompt_rows(self, step: int) -> list[dict]:
        """The P training questions of rollout step `step` on this rank: a seeded permutation per epoch."""
        n, p = len(self.train_set), self.cfg.prompts_per_step
        world, rank = self.trainer.world_size, self.trainer.global_rank
        rows = []
        for j in range(p):
            k = (step * world + rank) * p + j
            epoch, pos = divmod(k, n)
            if epoch not in self._perms:
                perm = list(range(n))
                random.Random(f"{self.seed}/epoch{epoch}").shuffle(perm)
                self._perms = {epoch: perm}
            rows.append(self.train_set[self._perms[epoch][pos]])
        return rows

    def train_dataloader(self):
        # The content is ignored: prompts come from _prompt_rows(rollout_step), which survives resumes.
        return torch.utils.data.DataLoader(range(self.cfg.max_steps), batch_size=1)

    def _eval_loader(self, sets: dict):
        return [torch.utils.data.DataLoader([dict(r) for r in ds], batch_size=self.eval_batch_size, collate_fn=list)
                for ds in sets.values()]

    def val_dataloader(self):
        return self._eval_loader(self.val_sets)

    def test_dataloader(self):
        return self._eval_loader(self.test_sets)

    # --- training -------------------------------------------------------------------------------

    def configure_optimizers(self):
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.cfg.lr,
                                weight_decay=self.cfg.weight_decay)
        warmup = max(1, round(self.cfg.warmup_ratio * self.cfg.max_steps * self.opt_steps_per_rollout))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return [opt], [sched]

    resume_hook = None  # set by train(): forget logged metrics past the restored step

    def on_fit_start(self):
        self.ref_policy.to(self.device)

    def on_train_start(self):
        if self.resume_hook is not None:
            self.resume_hook(self.rollout_step)

    def _sampling_generator(self, step: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1_000_003 + step) * 4099 + self.trainer.global_rank)
        return g

    def _rollout(self, questions: list[str], *, greedy: bool, generator=None):
        was_training = self.policy.training
        self.policy.eval()
        engine = make_engine(self.rcfg.backend, self.policy, self.tok, options=self.rcfg.options(),
                             temperature=self.rcfg.temperature, top_p=self.rcfg.top_p, greedy=greedy,
                             generator=generator)
        batch = rollout(engine, self.tok, self.retriever, questions, self.rcfg)
        self.policy.train(was_training)
        return batch

    def _forward_all(self, model, ids, att, mask, with_values: bool):
        """No-grad log-probs (and values) at generated tokens over the whole rollout batch."""
        mb = self.cfg.micro_batch_size
        logps, values = [], []
        with torch.no_grad():
            for s in range(0, ids.shape[0], mb):
                lp, _, v = token_logp(model, ids[s:s + mb], att[s:s + mb], self.rcfg.temperature, mask=mask[s:s + mb],
                                      value_head=self.value_head if with_values else None)
                logps.append(lp)
                values.append(v)
        return torch.cat(logps), (torch.cat(values) if with_values else None)

    def make_batch(self, step: int) -> tuple[dict, RolloutBatch, torch.Tensor]:
        """Rollout step `step`'s episodes, scored: (the inputs of `update`, the rollout, the rewards)."""
        rows = self._prompt_rows(step)
        questions = [r["question"] for r in rows for _ in range(self.cfg.group_size)]
        golds = [r["golden_answers"] for r in rows for _ in range(self.cfg.group_size)]
        t0 = time.perf_counter()
        batch = self._rollout(questions, greedy=False, generator=self._sampling_generator(step))
        release_engine(self.rcfg.backend)  # training comes next: an engine may free its GPU memory
        batch.stats["time/rollout_s"] = time.perf_counter() - t0
        dev = self.device
        ids, att = batch.input_ids.to(dev), batch.attention_mask.to(dev)
        mask = batch.loss_mask.to(dev)
        rewards = torch.tensor([0.0 if a is None else self.metric(a, g) for a, g in zip(batch.answers, golds)], device=dev)
        group = torch.arange(len(rows), device=dev).repeat_interleave(self.cfg.group_size)
        old_logp = behaviour = batch.old_logp.to(dev)
        old_values = returns = None
        if self.recompute or self.value_head is not None:
            lp, old_values = self._forward_all(self.policy, ids, att, mask, self.value_head is not None)
            if self.recompute:
                old_logp = lp
                gap = (lp - behaviour).abs()[mask.bool()]
                batch.stats["rollout/logp_gap_mean"] = float(gap.mean()) if gap.numel() else 0.0
                batch.stats["rollout/logp_gap_max"] = float(gap.max()) if gap.numel() else 0.0
        ref_logp, _ = self._forward_all(self.ref_policy, ids, att, mask, False)
        if self.value_head is None:
            adv = self.advantage(rewards, group, **self.algo.advantage_params)
        else:
            last = (mask * torch.arange(mask.shape[1], device=dev)).argmax(-1)  # last generated token
            token_rewards = torch.zeros_like(mask)
            token_rewards[torch.arange(len(last), device=dev), last] = rewards * (mask.sum(-1) > 0)
            adv, returns = self.advantage(token_rewards, old_values, mask, **self.algo.advantage_params)
        if self.cfg.tis:
            # Every registered loss is linear in A with gates on its sign, so a positive weight on
            # a token's advantage is a weight on its policy-gradient term, as veRL applies TIS; the
            # reference KL, entropy and SAPO's K terms are not reweighted (K reads only A's sign).
            w = tis_weights(old_logp, behaviour, mask, self.cfg.tis_cap)
            adv = (adv[:, None] if adv.dim() == 1 else adv) * w
            m = mask.bool()
            batch.stats["rollout/tis_weight_mean"] = float(w[m].mean()) if m.any() else 1.0
            batch.stats["rollout/tis_capped_frac"] = (float((w[m] >= self.cfg.tis_cap * (1 - 1e-6)).float().mean())
                                                      if m.any() else 0.0)
        inputs = {"ids": ids, "att": att, "mask": mask, "old_logp": old_logp, "ref_logp": ref_logp, "adv": adv,
                  "old_values": old_values, "returns": returns, "step": step}
        return inputs, batch, rewards

    def training_step(self, _batch, _batch_idx):
        step = self.rollout_step
        if step >= self.cfg.max_steps:
            self.trainer.should_stop = True
            return
        t0 = time.perf_counter()
        inputs, batch, rewards = self.make_batch(step)
        t1 = time.perf_counter()
        metrics = self.update(**inputs)
        t2 = time.perf_counter()
        # The engine serves the new weights before anything rolls out again (validation included);
        # a failed parity check raises EngineOutOfSync here and the run stops.
        metrics.update(sync_engine(self.rcfg.backend, self.policy))
        metrics.update(batch.metrics())
        metrics.update({
            "train/step": float(step + 1), "train/reward_mean": float(rewards.mean()), "train/reward_std": float(rewards.std()),
            "train/lr": float(self.lr_schedulers().get_last_lr()[0]), "train/nonfinite_skipped": float(self.nonfinite_total),
            "time/score_s": t1 - t0 - batch.stats["time/rollout_s"], "time/update_s": t2 - t1})
        collapsed_at = self.collapse.update(step + 1, metrics["train/reward_mean"], metrics.get("is_ratio/mean", 1.0))
        metrics["train/collapsed"] = float(collapsed_at is not None or self.collapsed_reason is not None)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1, rank_zero_only=True)
        self.rollout_step = step + 1
        if self.rollout_step >= self.cfg.max_steps or self.collapsed_reason == "nonfinite":
            self.trainer.should_stop = True

    def update(self, ids, att, mask, old_logp, ref_logp, adv, old_values, returns, step) -> dict:
        """The optimiser steps on one scored rollout batch (`make_batch`'s first output)."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        n, mbs, micro = ids.shape[0], self.cfg.mini_batch_size, self.cfg.micro_batch_size
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        sums: dict[str, float] = {}
        mins: dict[str, float] = {}
        count = 0
        for _ in range(self.cfg.ppo_epochs):
            order = torch.randperm(n, generator=gen).tolist()
            for s in range(0, n, mbs):
                idx = order[s:s + mbs]
                tokens = float(mask[idx].sum().clamp(min=1))
                opt.zero_grad()
                finite, step_metrics = True, {}
                for m in range(0, len(idx), micro):
                    sel = torch.tensor(idx[m:m + micro], device=ids.device)
                    width = int(att[sel].sum(-1).max())  # right-padded: trim to the longest row
                    a, i, k = att[sel, :width], ids[sel, :width], mask[sel, :width]
                    logp, ent, values = token_logp(self.policy, i, a, self.rcfg.temperature, mask=k, entropy=True,
                                                   value_head=self.value_head)
                    if not (torch.isfinite(logp).all() and torch.isfinite(ent).all()):
                        finite = False  # a diverged policy: skip this step rather than crash on it
                        break
                    a_sel = adv[sel] if adv.dim() == 1 else adv[sel, :width]
                    out = policy_loss(self.algo.loss, logp=logp, old_logp=old_logp[sel, :width], advantages=a_sel,
                                      mask=k, **self.algo.loss_params)
                    kl = ref_kl(logp, ref_logp[sel, :width], k, beta=self.cfg.ref_kl_beta)
                    eb = entropy_bonus(ent, k, coef=self.cfg.entropy_coef)
                    loss = out.loss + kl.loss + eb.loss
                    parts = [out.metrics, kl.metrics, eb.metrics,
                             isdd_metrics(logp.detach(), old_logp[sel, :width], a_sel, k, tau=self.tau)]
                    if self.value_head is not None:
                        vl = value_loss(values, old_values[sel, :width], returns[sel, :width], k,
                                        **self.algo.value_params)
                        loss = loss + vl.loss
                        parts.append(vl.metrics)
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    # Token-weighted accumulation keeps the mini-batch token mean exact across micro-batches.
                    self.manual_backward(loss * float(k.sum()) / tokens)
                    for part in parts:
                        for key, v in part.items():
                            step_metrics[key] = step_metrics.get(key, 0.0) + v * float(k.sum()) / tokens
                            if key in ("is_ratio/min", "isdd/seq_log_ratio_min") and not math.isnan(v):
                                mins[key] = min(mins.get(key, math.inf), v)
                if not finite:
                    opt.zero_grad()
                    self.nonfinite_total += 1
                    self.nonfinite_run += 1
                    if self.nonfinite_run >= self.cfg.nonfinite_patience:
                        self.collapsed_reason = "nonfinite"
                    continue
                self.nonfinite_run = 0
                self.clip_gradients(opt, gradient_clip_val=self.cfg.grad_clip, gradient_clip_algorithm="norm")
                opt.step()
                sched.step()
                count += 1
                for key, v in step_metrics.items():
                    sums[key] = sums.get(key, 0.0) + v
        metrics = {k: v / max(count, 1) for k, v in sums.items()}
        metrics.update(mins)
        metrics["train/optimizer_steps"] = float(count)
        return metrics

    # --- evaluation -----------------------------------------------------------------------------

    def _score(self, examples: list[dict]) -> list[tuple[float, float]]:
        batch = self._rollout([e["question"] for e in examples], greedy=True)
        return score(batch.answers, [e["golden_answers"] for e in examples])

    def _eval_step(self, stage: str, batch, dataloader_idx: int):
        names = list((self.val_sets if stage == "val" else self.test_sets).keys())
        self._eval.setdefault(names[dataloader_idx], []).extend(self._score(batch))

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step("test", batch, dataloader_idx)

    def _eval_end(self, stage: str) -> dict:
        results = {}
        for name, scores in self._eval.items():
            t = torch.tensor([[s[0], s[1], 1.0] for s in scores], device=self.device).sum(0)
            t = self.trainer.strategy.reduce(t, reduce_op="sum")
            results[name] = {"em": float(t[0] / t[2]), "f1": float(t[1] / t[2]), "n": int(t[2])}
        self._eval = {}
        metrics = {f"{stage}/{m}/{d}": r[m] for d, r in results.items() for m in ("em", "f1")}
        if results:
            metrics[f"{stage}/em"] = sum(r["em"] for r in results.values()) / len(results)
            metrics["train/step"] = float(self.rollout_step)
        self.log_dict(metrics, batch_size=1, rank_zero_only=True)
        return results

    def on_validation_epoch_end(self):
        self._eval_end("val")
        release_engine(self.rcfg.backend)

    def on_test_epoch_end(self):
        self.test_results = self._eval_end("test")
        release_engine(self.rcfg.backend)

    # --- checkpoints ----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint):
        checkpoint["sapo_bench"] = {"rollout_step": self.rollout_step, "nonfinite_total": self.nonfinite_total,
                                    "nonfinite_run": self.nonfinite_run, "collapsed_reason": self.collapsed_reason,
                                    "collapse": self.collapse.state_dict()}

    def on_load_checkpoint(self, checkpoint):
        s = checkpoint["sapo_bench"]
        self.rollout_step, self.nonfinite_total, self.nonfinite_run = s["rollout_step"], s["nonfinite_total"], s["nonfinite_run"]
        self.collapsed_reason = s["collapsed_reason"]
        self.collapse.load_state_dict(s["collapse"])

    def run_summary(self) -> dict:
        return {"steps": self.rollout_step, "collapse_step": self.collapse.step,
                "collapsed_reason": self.collapsed_reason or ("drift" if self.collapse.step else None),
                "nonfinite_skipped": self.nonfinite_total, "train_config": asdict(self.cfg),
                "rollout_backend": self.rcfg.backend, "recompute_old_logp": self.recompute}
