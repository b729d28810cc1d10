"""sapo-train: one run = one (model, algo, seed), configured by Hydra (conf/config.yaml).

    sapo-train experiment=micro_smoke
    sapo-train model=llama-micro-4m algo=sapo seed=1 train.max_steps=60

A run lives in its own folder (`run_dir`, named by model, algo and seed, so that starting the same
run again finds it): metrics.jsonl (one line per training step and per validation), checkpoints/,
config.yaml, and result.json once it has finished; beside them, the files of the loggers that
`logger=` adds (sapo_bench/loggers.py). Started again, a finished run is skipped and an
interrupted one resumes from checkpoints/last.ckpt (or, if that one is damaged, from the previous
one: sapo_bench/checkpoints.py).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import signal
import time
import traceback
from pathlib import Path
from weakref import proxy

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from sapo_bench.algos import Algo
from sapo_bench.checkpoints import publish, resume_checkpoint
from sapo_bench.data import load_eval, load_train_and_validation
from sapo_bench.io import atomic_write_json, atomic_write_text
from sapo_bench.loggers import open_loggers, truncate
from sapo_bench.module import SearchAgentRLModule, TrainConfig
from sapo_bench.retrieval import build_retriever
from sapo_bench.rollout import RolloutConfig
from sapo_bench.runtime import (CONF_DIR, RetryingRetriever, architecture, check_resumable, config_hash,
                                finished_result, git_commit, load_policy_for, machine, prepare_data, run_configs,
                                set_threads)

log = logging.getLogger("sapo_bench")


class SafeCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that writes each file to `<name>.tmp` and renames it into place, keeping the
    file it replaces as last.prev.ckpt (`checkpoints.publish`): a kill during a save leaves the
    previous checkpoints whole. Always `last.ckpt`, never `last-v1.ckpt`: resume looks there.

    A step's checkpoint is saved once its metrics.jsonl line is written: Lightning logs a step
    after on_train_batch_end, so a checkpoint saved there and a kill before the line would resume
    past a step that metrics.jsonl never got. It is saved at the next step's start, at the epoch's
    end, or when SIGTERM stops the run between steps."""

    def __init__(self, **kwargs):
        super().__init__(enable_version_counter=False, **kwargs)
        self._pending = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._pending = (outputs, batch, batch_idx)

    def _save_pending(self, trainer, pl_module) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            super().on_train_batch_end(trainer, pl_module, *pending)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._save_pending(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._save_pending(trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException):  # raised between steps, the last one logged
            self._save_pending(trainer, pl_module)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # ModelCheckpoint._save_checkpoint (Lightning 2.6), with the write redirected and published.
        tmp = f"{filepath}.tmp"
        trainer.save_checkpoint(tmp, self.save_weights_only)  # every rank takes part; ends in a barrier
        if trainer.is_global_zero:
            publish(tmp, filepath)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


def train(cfg: DictConfig) -> dict:
    """Run (or resume, or skip) one training run; returns its result.json content.

    A failure leaves error.json (the traceback) beside the run's checkpoints, for the sweep and the
    report to show; the next successful attempt removes it.
    """
    run_dir = Path(cfg.run_dir)
    configs = run_configs(cfg)  # a setting that cannot work stops here, before the run writes anything
    done = finished_result(run_dir, config_hash(cfg), architecture(cfg))
    if done is not None:
        log.info("%s is finished; skipping (delete result.json to run it again)", run_dir)
        return done
    try:
        with open_loggers(cfg) as loggers:  # started first: a missing package or a bad setting fails at once
            result = _train(cfg, run_dir, loggers, *configs)
    except SIGTERMException:
        # Lightning stops after the current step and raises SystemExit(None), which exits 0; a
        # run that did not finish must not look like one that did.
        log.warning("%s: stopped by SIGTERM; its last checkpoint is kept: start it again to resume", run_dir)
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as e:
        atomic_write_json(run_dir / "error.json", {"error": f"{type(e).__name__}: {e}",
                                                   "traceback": traceback.format_exc()[-4000:],
                                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        raise
    (run_dir / "error.json").unlink(missing_ok=True)
    return result


def _train(cfg: DictConfig, run_dir: Path, loggers: list, algo: Algo, rcfg: RolloutConfig,
           tcfg: TrainConfig) -> dict:
    result_path = run_dir / "result.json"
    start = time.time()
    set_threads(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Before the expensive set-up: a run that cannot resume says so at once.
    last = resume_checkpoint(run_dir / "checkpoints", move_bad=rank_zero_only.rank == 0)
    if last is not None:
        check_resumable(run_dir, cfg)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    prepare_data(cfg)
    retriever = RetryingRetriever(build_retriever(**OmegaConf.to_container(cfg.retriever, resolve=True)))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model, tokenizer, warm = load_policy_for(cfg, retriever, rcfg)
    torch.manual_seed(cfg.seed)  # the value head (PPO) is the only fresh weight: seed it per run
    ref = copy.deepcopy(model).eval()
    train_set, val_sets = load_train_and_validation(cfg.data.source, tuple(cfg.data.train), n_val=cfg.data.n_val)
    test_sets = load_eval(cfg.data.source, limit=cfg.data.test_limit)
    module = SearchAgentRLModule(model, tokenizer, ref, retriever, algo, train_set, val_sets, test_sets, rcfg, tcfg,
                                 seed=cfg.seed, eval_batch_size=cfg.eval.batch_size)
    checkpoints = SafeCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
                                 every_n_train_steps=cfg.checkpoint_every * module.opt_steps_per_rollout)
    trainer = L.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), max_epochs=-1, logger=loggers,
                        callbacks=[checkpoints], enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, val_check_interval=cfg.eval.val_every, check_val_every_n_epoch=None,
                        log_every_n_steps=1,
                        default_root_dir=str(run_dir))
    if last is not None:
        log.info("resuming %s from %s", run_dir, last)
    else:  # a fresh start (or a retry of a run that failed before its first checkpoint) logs afresh
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    module.resume_hook = functools.partial(truncate, loggers)
    trainer.fit(module, ckpt_path=str(last) if last is not None else None)
    trainer.test(module, verbose=False)
    test = module.test_results
    summary = module.run_summary()
    em = {d: r["em"] for d, r in test.items()}
    result = {
        "run": {"model": cfg.model.name, "family": cfg.model.family, "size": str(cfg.model.size), "algo": algo.name,
                "seed": cfg.seed, "steps": summary["steps"], "git_commit": git_commit(), "config_hash": config_hash(cfg),
                "architecture": architecture(cfg),
                "collapse_step": summary["collapse_step"], "drift_step": summary["drift_step"],
                "collapsed_reason": summary["collapsed_reason"],
                "nonfinite_skipped": summary["nonfinite_skipped"], "data": cfg.data.kind,
                "rollout_backend": summary["rollout_backend"], "recompute_old_logp": summary["recompute_old_logp"],
                "machine": machine(), "device": str(module.device), "torch": torch.__version__,
                "wall_s": round(time.time() - start, 1)},
        "test": test,
        "test_em_avg": sum(em.values()) / max(len(em), 1),
        "warmstart": warm["test"] if warm else None,
        "baselines": warm.get("baselines") if warm else None,
    }
    if trainer.is_global_zero:
        atomic_write_json(result_path, result)
    return result


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    result = train(cfg)
    print(json.dumps({"run_dir": cfg.run_dir, "test_em_avg": round(result["test_em_avg"], 4),
                      "collapse_step": result["run"]["collapse_step"]}))


if __name__ == "__main__":
    main()
