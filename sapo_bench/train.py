"""sapo-train: one run = one (model, algo, seed), configured by Hydra (conf/config.yaml).

    sapo-train experiment=micro_smoke
    sapo-train model=llama-micro-4m algo=sapo seed=1 train.max_steps=60

A run lives in its own folder (`run_dir`, named by model, algo and seed, so that starting the same
run again finds it): metrics.jsonl (one line per training step and per validation), checkpoints/,
config.yaml, and result.json once it has finished. Started again, a finished run is skipped and an
interrupted one resumes from checkpoints/last.ckpt.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import traceback
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from sapo_bench.algos import Algo
from sapo_bench.data import load_eval, load_train_and_validation
from sapo_bench.io import atomic_write_json, atomic_write_text
from sapo_bench.module import SearchAgentRLModule, TrainConfig
from sapo_bench.retrieval import build_retriever
from sapo_bench.rollout import RolloutConfig
from sapo_bench.runtime import (CONF_DIR, RetryingRetriever, config_hash, finished_result, git_commit,
                                load_policy_for, machine, prepare_data, set_threads)

log = logging.getLogger("sapo_bench")


class JsonlLogger(Logger):
    """metrics.jsonl: one JSON object per logging call, appended and flushed as it happens."""

    def __init__(self, run_dir: str):
        super().__init__()
        self.path = Path(run_dir) / "metrics.jsonl"

    @property
    def name(self):
        return "jsonl"

    @property
    def version(self):
        return 0

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs):
        pass  # train() writes the resolved config.yaml itself

    @rank_zero_only
    def log_metrics(self, metrics, step=None):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"optimizer_step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
            f.flush()

    @rank_zero_only
    def truncate(self, last_step: int) -> None:
        """Forget lines past `last_step` (a resumed run replays those steps)."""
        if self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("train/step", 0) <= last_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))


def train(cfg: DictConfig) -> dict:
    """Run (or resume, or skip) one training run; returns its result.json content.

    A failure leaves error.json (the traceback) beside the run's checkpoints, for the sweep and the
    report to show; the next successful attempt removes it.
    """
    run_dir = Path(cfg.run_dir)
    done = finished_result(run_dir, config_hash(cfg))
    if done is not None:
        log.info("%s is finished; skipping (delete result.json to run it again)", run_dir)
        return done
    try:
        result = _train(cfg, run_dir)
    except Exception as e:
        atomic_write_json(run_dir / "error.json", {"error": f"{type(e).__name__}: {e}",
                                                   "traceback": traceback.format_exc()[-4000:],
                                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        raise
    (run_dir / "error.json").unlink(missing_ok=True)
    return result


def _train(cfg: DictConfig, run_dir: Path) -> dict:
    result_path = run_dir / "result.json"
    start = time.time()
    set_threads(cfg)
    algo = Algo.from_config(OmegaConf.to_container(cfg.algo, resolve=True))
    rcfg = RolloutConfig(**OmegaConf.to_container(cfg.rollout, resolve=True), chat_template=bool(cfg.model.chat_template))
    tcfg = TrainConfig(**OmegaConf.to_container(cfg.train, resolve=True))
    run_dir.mkdir(parents=True, exist_ok=True)
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
    logger = hydra.utils.instantiate(cfg.logger)
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
                                  every_n_train_steps=cfg.checkpoint_every * module.opt_steps_per_rollout)
    trainer = L.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), max_epochs=-1, logger=logger,
                        callbacks=[checkpoints], enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, val_check_interval=cfg.eval.val_every, check_val_every_n_epoch=None,
                        log_every_n_steps=1,
                        default_root_dir=str(run_dir))
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        log.info("resuming %s from %s", run_dir, last)
    else:  # a fresh start (or a retry of a run that failed before its first checkpoint) logs afresh
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    module.resume_hook = getattr(logger, "truncate", None)
    trainer.fit(module, ckpt_path=str(last) if last.exists() else None)
    trainer.test(module, verbose=False)
    test = module.test_results
    summary = module.run_summary()
    em = {d: r["em"] for d, r in test.items()}
    result = {
        "run": {"model": cfg.model.name, "family": cfg.model.family, "size": str(cfg.model.size), "algo": algo.name,
                "seed": cfg.seed, "steps": summary["steps"], "git_commit": git_commit(), "config_hash": config_hash(cfg),
                "collapse_step": summary["collapse_step"], "collapsed_reason": summary["collapsed_reason"],
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
