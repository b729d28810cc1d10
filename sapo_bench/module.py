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
7. A mini-batch is split into micro-batches only for memory: every term divides by the
   mini-batch's counts (losses.py, note 9), so `micro_batch_size` never changes a gradient
   (`mini_batch_backward`, tests/unit/test_microbatch.py).
8. On the on-policy first mini-batch the ratio's denominator is the behaviour log-prob from the
   sampling forward, not the training forward's own detached value, so r = 1 ± float noise there
   and SAPO's gate r ≤ 1 picks about half its tokens at random. Kept: the authors' code (veRL
   recomputes old log-probs in a separate forward) has the same coin flip, and r ≡ 1 would make
   SAPO pull every A ≥ 0 token of that mini-batch, a method neither paper ran. Measured instead:
   `on/loss/sapo_gated_frac` against `off/...`, and drift is read off-policy only (`off/<name>`).
9. The policy is in train mode for the update and in eval mode for rollouts and scoring (the
   same numbers at dropout 0, as in every config here; not for a model with dropout).
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
from sapo_bench.diagnostics import SEQ_LEN_REF, isdd_metrics
from sapo_bench.evaluate import em_avg, score, score_totals
from sapo_bench.losses import Scope, entropy_bonus, policy_loss, ref_kl, value_loss
from sapo_bench.rewards import get_metric
from sapo_bench.rollout import (RolloutBatch, RolloutConfig, engine_exact_logp, make_engine, release_engine, rollout,
                                sync_engine)
from sapo_bench.settings import SettingError, check_int, check_number


COLLAPSE_DEFAULTS = {"window_frac": 0.1, "start_frac": 0.2, "reward_frac": 0.5, "ratio_p5": 0.2, "seq_frac": 0.1,
                     "seq_len": SEQ_LEN_REF}


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
    # CollapseDetector's settings; its window and first step are fractions of max_steps.
    collapse: dict = field(default_factory=lambda: dict(COLLAPSE_DEFAULTS))

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
            name = f"train.collapse.{key}"
            if key in ("window_frac", "start_frac", "reward_frac", "ratio_p5", "seq_frac"):
                check_number(name, value, positive=True, maximum=1)
            elif key == "seq_len":
                check_int(name, value)
            else:
                raise SettingError(f"unknown train.collapse key {key!r}; valid: {', '.join(COLLAPSE_DEFAULTS)}")

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
    """Records the first step where the run has collapsed by ratio drift: the reward far below its
    running maximum while the off-policy importance ratios have drifted (DESIGN §6, the paper's
    Figure 1), both smoothed over a window of steps.

    Drift is read on the off-policy mini-batches only (the on-policy first one has r ≈ 1 by
    construction and would dilute any mean) and in the lower tail, where it shows (a collapsing
    run's median and token-mean ratio stay ≈ 1): the pooled p5 of r below `ratio_p5`, or at least
    `seq_frac` of the off-policy sequences drifted by the length-aware companion of the paper's
    Definition 1 (`isdd/frac_seq_geo_below_eps`, measured at `seq_len` tokens: a response that
    hits the length limit does not count as drifted for its length alone). The reward has collapsed
    below `reward_frac` × its best smoothed value. The window and the first step that may fire are
    fractions of the run (`window_frac`, `start_frac`), so a 15-step run and a 300-step one are
    judged alike; the best reward is taken over full windows only, and nothing fires before
    `start`, so the heavy-tailed first steps after a warm start cannot raise an alarm. Drift alone
    is recorded too (`drift_step`), for runs that drift and do not collapse.
    """

    def __init__(self, max_steps: int, window_frac: float = 0.1, start_frac: float = 0.2, reward_frac: float = 0.5,
                 ratio_p5: float = 0.2, seq_frac: float = 0.1, seq_len: int = SEQ_LEN_REF):
        self.window = max(2, math.ceil(window_frac * max_steps))
        self.start = max(self.window, math.ceil(start_frac * max_steps))
        self.reward_frac, self.ratio_p5, self.seq_frac, self.seq_len = reward_frac, ratio_p5, seq_frac, seq_len
        self.history: list[tuple[float, float | None, float | None]] = []
        self.best = -math.inf
        self.step: int | None = None
        self.drift_step: int | None = None

    def update(self, step: int, reward: float, ratio_p5: float | None, seq_frac: float | None) -> int | None:
        """One training step's reward and off-policy tail statistics (None: no off-policy mini-batch)."""
        self.history = (self.history + [(reward, ratio_p5, seq_frac)])[-self.window:]
        if len(self.history) < self.window:
            return self.step
        r = sum(h[0] for h in self.history) / self.window
        self.best = max(self.best, r)
        p5 = [h[1] for h in self.history if h[1] is not None and not math.isnan(h[1])]
        seq = [h[2] for h in self.history if h[2] is not None and not math.isnan(h[2])]
        drifted = len(p5) == self.window and (sum(p5) / self.window < self.ratio_p5
                                              or sum(seq) / len(seq) >= self.seq_frac)
        if step < self.start or not drifted:
            return self.step
        if self.drift_step is None:
            self.drift_step = step
        if self.step is None and self.best > 0 and r < self.reward_frac * self.best:
            self.step = step
        return self.step

    def state_dict(self) -> dict:
        return {"history": self.history, "best": self.best, "step": self.step, "drift_step": self.drift_step}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(h) for h in state["history"]]
        self.best, self.step, self.drift_step = state["best"], state["step"], state["drift_step"]


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
    # in the head's own dtype (fp32 beside a bf16 policy)
    val = place(value_head(hs.to(value_head.weight.dtype))[:, 0]) if value_head is not None else None
    return lp, ent, val


def mini_batch_backward(policy, batch: dict, idx: list[int], *, micro: int, algo: Algo, cfg: TrainConfig,
                        temperature: float, gen_budget: int | None, value_head=None, backward=torch.Tensor.backward):
    """Forward and backward over one optimiser mini-batch (rows `idx` of `batch`), `micro` rows at a
    time, the gradients accumulating: policy loss, reference KL, entropy bonus (and value loss).

    Every term divides by the mini-batch's counts (losses.py, note 9), so the accumulated gradient
    and the summed metrics are the mini-batch's whatever `micro` is. Returns (the rows' log-probs,
    detached, (len(idx), L); the mini-batch's loss metrics), or None at the first non-finite
    forward or loss: the caller skips the step.
    """
    ids, att, mask, adv = batch["ids"], batch["att"], batch["mask"], batch["adv"]
    rows = torch.tensor(idx, device=ids.device)
    scope = Scope.of(mask[rows], adv[rows], gen_budget)
    logp_rows = torch.zeros(len(idx), ids.shape[1], dtype=batch["old_logp"].dtype, device=ids.device)
    metrics: dict[str, float] = {}
    for m in range(0, len(idx), micro):
        sel = rows[m:m + micro]
        width = int(att[sel].sum(-1).max())  # right-padded: trim to the longest row
        a, i, k = att[sel, :width], ids[sel, :width], mask[sel, :width]
        logp, ent, values = token_logp(policy, i, a, temperature, mask=k, entropy=True, value_head=value_head)
        if not (torch.isfinite(logp).all() and torch.isfinite(ent).all()):
            return None  # a diverged policy: skip this step rather than crash on it
        a_sel = adv[sel] if adv.dim() == 1 else adv[sel, :width]
        out = policy_loss(algo.loss, logp=logp, old_logp=batch["old_logp"][sel, :width], advantages=a_sel, mask=k,
                          scope=scope, **algo.loss_params)
        kl = ref_kl(logp, batch["ref_logp"][sel, :width], k, beta=cfg.ref_kl_beta, scope=scope.mask)
        coef = cfg.entropy_coef if algo.entropy_coef is None else algo.entropy_coef
        eb = entropy_bonus(ent, k, coef=coef, scope=scope.mask)
        loss = out.loss + kl.loss + eb.loss
        parts = [out.metrics, kl.metrics, eb.metrics]
        if value_head is not None:
            vl = value_loss(values, batch["old_values"][sel, :width], batch["returns"][sel, :width], k,
                            scope=scope.mask, **algo.value_params)
            loss = loss + vl.loss
            parts.append(vl.metrics)
        if not torch.isfinite(loss):
            return None
        backward(loss)
        logp_rows[m:m + len(sel), :width] = logp.detach()
        for part in parts:
            for key, v in part.items():
                metrics[key] = metrics.get(key, 0.0) + v
    return logp_rows, metrics


MIN_KEYS = ("is_ratio/min", "isdd/seq_log_ratio_min")  # over mini-batches: the lowest, not the mean
GATED_KEYS = ("loss/sapo_gated_frac", "loss/llds_gated_frac")  # also split on- and off-policy


def step_metrics(done: list, mask, old_logp, adv, *, tau: float, seq_len_ref: int) -> dict[str, float]:
    """A training step's metrics from its optimiser steps `done` = [(on-policy, rows, logp, loss metrics)].

    Plain names: the mean over mini-batches (the lowest for MIN_KEYS), the on-policy one included,
    as the loss sees them. `off/<name>`, `on/<name>`: the ISDD diagnostics of the off-policy
    mini-batches (resp. the on-policy first one) pooled over their tokens and sequences, so that a
    quantile is one of their tokens', and the GATED_KEYS averaged over them (docs/metrics.md).
    """
    per_mb = []
    for _, rows, logp, loss_metrics in done:
        per_mb.append({**loss_metrics, **isdd_metrics(logp, old_logp[rows], adv[rows], mask[rows], tau=tau,
                                                      seq_len_ref=seq_len_ref)})
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for m in per_mb for k in m):
        vals = [m[key] for m in per_mb if key in m and not math.isnan(m[key])]
        out[key] = (min(vals) if key in MIN_KEYS else sum(vals) / len(vals)) if vals else math.nan
    for prefix, on_policy in (("on/", True), ("off/", False)):
        mine = [(rows, logp, m) for (on, rows, logp, _), m in zip(done, per_mb) if on == on_policy]
        if not mine:
            continue
        rows = [r for r, _, _ in mine]
        logp = torch.cat([lp for _, lp, _ in mine])
        pooled = isdd_metrics(logp, torch.cat([old_logp[r] for r in rows]), torch.cat([adv[r] for r in rows]),
                              torch.cat([mask[r] for r in rows]), tau=tau, seq_len_ref=seq_len_ref)
        out.update({prefix + k: v for k, v in pooled.items()})
        for key in GATED_KEYS:
            if key in mine[0][2]:
                out[prefix + key] = sum(m[key] for _, _, m in mine) / len(mine)
    return out


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
        self.collapse = CollapseDetector(train_cfg.max_steps, **train_cfg.collapse)
        self.test_results: dict = {}
        self.tau = float(algo.loss_params.get("tau", 1.0))
        check_run(train_cfg, algo, rollout_cfg)
        self.recompute = train_cfg.recompute_for(rollout_cfg.backend)
        self.gen_budget = rollout_cfg.generation_budget()
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
        groups = rewards.view(-1, self.cfg.group_size)
        metrics.update({
            "train/step": float(step + 1), "train/reward_mean": float(rewards.mean()), "train/reward_std": float(rewards.std()),
            "train/zero_adv_frac": float((groups.amax(-1) == groups.amin(-1)).float().mean()),
            "train/lr": float(self.lr_schedulers().get_last_lr()[0]), "train/nonfinite_skipped": float(self.nonfinite_total),
            "time/score_s": t1 - t0 - batch.stats["time/rollout_s"], "time/update_s": t2 - t1})
        collapsed_at = self.collapse.update(step + 1, metrics["train/reward_mean"], metrics.get("off/is_ratio/p5"),
                                            metrics.get("off/isdd/frac_seq_geo_below_eps"))
        metrics["train/collapsed"] = float(collapsed_at is not None or self.collapsed_reason is not None)
        # Lightning keeps every key logged in an epoch (a run is one) and logs its last value again at
        # every later step: forget them, so that a step's line holds only what this step computed
        # (a skipped optimiser step has no loss, a rollout without recompute no logp gap).
        self.trainer._results.reset(metrics=False, fx="training_step")
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1, rank_zero_only=True)
        self.rollout_step = step + 1
        if self.rollout_step >= self.cfg.max_steps or self.collapsed_reason == "nonfinite":
            self.trainer.should_stop = True

    def update(self, ids, att, mask, old_logp, ref_logp, adv, old_values, returns, step) -> dict:
        """The optimiser steps on one scored rollout batch (`make_batch`'s first output)."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        n, mbs = ids.shape[0], self.cfg.mini_batch_size
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        batch = {"ids": ids, "att": att, "mask": mask, "old_logp": old_logp, "ref_logp": ref_logp, "adv": adv,
                 "old_values": old_values, "returns": returns}
        done: list[tuple[bool, list[int], torch.Tensor, dict]] = []  # (on-policy, rows, logp, loss metrics)
        self.policy.train()  # train mode for the update only: rollouts and scoring run in eval mode
        try:
            for epoch in range(self.cfg.ppo_epochs):
                order = torch.randperm(n, generator=gen).tolist()
                for s in range(0, n, mbs):
                    idx = order[s:s + mbs]
                    opt.zero_grad()
                    out = mini_batch_backward(self.policy, batch, idx, micro=self.cfg.micro_batch_size, algo=self.algo,
                                              cfg=self.cfg, temperature=self.rcfg.temperature,
                                              gen_budget=self.gen_budget, value_head=self.value_head,
                                              backward=self.manual_backward)
                    if out is None:
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
                    done.append((epoch == 0 and s == 0, idx, *out))
        finally:
            self.policy.eval()
        metrics = step_metrics(done, mask, old_logp, adv, tau=self.tau, seq_len_ref=self.collapse.seq_len)
        metrics["train/optimizer_steps"] = float(len(done))
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
            # float64: the run's own test then equals sapo-eval's of its checkpoint exactly (float32
            # had rounded F1 in the 9th digit).
            t = torch.tensor(score_totals(scores), dtype=torch.float64, device=self.device)
            t = self.trainer.strategy.reduce(t, reduce_op="sum")
            results[name] = {"em": float(t[0] / t[2]), "f1": float(t[1] / t[2]), "n": int(t[2])}
        self._eval = {}
        metrics = {f"{stage}/{m}/{d}": r[m] for d, r in results.items() for m in ("em", "f1")}
        if results:
            metrics[f"{stage}/em"] = em_avg(results)
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
        return {"steps": self.rollout_step, "collapse_step": self.collapse.step, "drift_step": self.collapse.drift_step,
                "collapsed_reason": self.collapsed_reason or ("drift" if self.collapse.step else None),
                "nonfinite_skipped": self.nonfinite_total, "train_config": asdict(self.cfg),
                "rollout_backend": self.rcfg.backend, "recompute_old_logp": self.recompute}
