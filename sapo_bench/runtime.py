"""What every entry point shares: config paths and hashes, provenance, threads, data and policy set-up.

Kept apart from train.py so that sapo-eval, sapo-sweep, sapo-report and the benchmarks can use it
without importing the trainer (which imports them back).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sapo_bench.algos import Algo
from sapo_bench.io import file_lock
from sapo_bench.retrieval import build_retriever
from sapo_bench.rollout import RolloutConfig
from sapo_bench.settings import check_int

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
log = logging.getLogger("sapo_bench")


class RetryingRetriever:
    """Retries a failing retriever, then stops the run with a clear error (its checkpoint stays)."""

    def __init__(self, inner, tries: int = 3, wait: float = 2.0):
        self.inner, self.tries, self.wait = inner, tries, wait

    def search(self, queries, k=3):
        for attempt in range(1, self.tries + 1):
            try:
                return self.inner.search(queries, k)
            except Exception as e:  # noqa: BLE001 - any failure of the tool is retried the same way
                if attempt == self.tries:
                    raise RuntimeError(f"retriever failed {self.tries} times, stopping the run "
                                       f"(the last checkpoint is kept): {e}") from e
                log.warning("retriever failed (%s), retry %d/%d", e, attempt, self.tries - 1)
                time.sleep(self.wait * attempt)


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=CONF_DIR.parent,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=CONF_DIR.parent).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# Keys that say where a run goes, how fast, or how a table shows it; not what it computes.
NOT_IDENTITY = ("run_dir", "out_root", "hydra", "cpu_threads", "checkpoint_every", "checkpoint", "out", "report")


def machine() -> str:
    """What a run ran on, for the tables' provenance line: CPU model and cores, and the GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu} ({os.cpu_count()} cores){gpu}"


def config_hash(cfg: DictConfig) -> str:
    """Identity of what was run: the resolved config without where it was written or how fast."""
    c = OmegaConf.to_container(cfg, resolve=True)
    # Where metrics go is not identity either (`logger=wandb` is the same run), but instead of
    # leaving it out, every run hashes the one logger all runs had before it could be chosen:
    # runs made then keep their hash, and so their results.
    c["logger"] = {"_target_": "sapo_bench.train.JsonlLogger", "run_dir": c["run_dir"]}
    for k in NOT_IDENTITY:
        c.pop(k, None)
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def set_threads(cfg: DictConfig) -> None:
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))


def prepare_data(cfg: DictConfig) -> None:
    """The micro world is generated on first use (seconds), and again when the cached one was made
    by another generator version (tokenizers and warm starts are keyed by its world.json, so they
    follow); real datasets must already exist."""
    if cfg.data.kind != "micro":
        return
    from sapo_bench.world import GENERATOR, WorldConfig, write_world

    manifest = Path(cfg.data.root) / "world.json"
    made_by = json.loads(manifest.read_text()).get("generator") if manifest.exists() else None
    if made_by != GENERATOR:
        if made_by is not None:
            log.warning("%s was made by %s; writing it again with %s", cfg.data.root, made_by, GENERATOR)
        write_world(cfg.data.root, WorldConfig(seed=cfg.data.world_seed, scale=cfg.data.world_scale))


def prepare(cfg: DictConfig) -> None:
    """Build what every run of a sweep shares (world, tokenizer, retrieval index) once, up front."""
    prepare_data(cfg)
    build_retriever(**OmegaConf.to_container(cfg.retriever, resolve=True))
    if cfg.model.kind == "micro":
        from sapo_bench.models import micro_tokenizer

        micro_tokenizer(cfg.data.root)


RUN_CONFIG_KEYS = ("algo", "rollout", "model", "train", "warmstart", "data", "checkpoint_every", "eval")  # what run_configs reads


def has_warm_start(cfg: DictConfig) -> bool:
    """Whether runs of this config begin from a cached supervised warm start: a micro model's
    (warmstart.py), or a pretrained model's SFT pass (`sft_warmstart`, realstart.py)."""
    return cfg.model.kind == "micro" or bool(cfg.get("sft_warmstart"))


def run_configs(cfg: DictConfig) -> tuple[Algo, RolloutConfig, "TrainConfig"]:
    """A training run's algorithm, rollout and training configs, each checked alone and then
    together, and the run's own sizes: what cannot work fails here, before anything is built."""
    from sapo_bench.module import TrainConfig, check_run  # lazily: module.py imports runtime's importers

    algo = Algo.from_config(OmegaConf.to_container(cfg.algo, resolve=True))
    rcfg = RolloutConfig(**OmegaConf.to_container(cfg.rollout, resolve=True), chat_template=bool(cfg.model.chat_template))
    tcfg = TrainConfig(**OmegaConf.to_container(cfg.train, resolve=True))
    check_run(tcfg, algo, rcfg)
    if has_warm_start(cfg):
        warmstart_config(cfg)
    check_int("checkpoint_every", cfg.checkpoint_every)
    check_int("eval.val_every", cfg.eval.val_every)
    check_int("eval.batch_size", cfg.eval.batch_size)
    return algo, rcfg, tcfg


def warmstart_config(cfg: DictConfig):
    """The micro warm start's settings: `warmstart`, updated by the model's own `model.warmstart`
    (a model file's `warmstart:` block overrides the keys it names)."""
    from sapo_bench.warmstart import WarmStartConfig  # lazily: warmstart imports this module's importers

    own = cfg.model.get("warmstart")
    own = OmegaConf.to_container(own, resolve=True) if own is not None else {}
    return WarmStartConfig(**{**OmegaConf.to_container(cfg.warmstart, resolve=True), **own})


def warm_start_tag(wcfg) -> str:
    """A short hash of a warm start's settings: one lock per (model, settings)."""
    return hashlib.sha256(json.dumps(asdict(wcfg), sort_keys=True, default=str).encode()).hexdigest()[:8]


def load_policy_for(cfg: DictConfig, retriever, rcfg: RolloutConfig):
    """(model, tokenizer, warm-start report or None)."""
    if cfg.model.kind == "micro":
        # Lazy: the warm start imports the evaluation code, which imports this module.
        from sapo_bench.warmstart import warm_start

        # Parallel runs of one model and warm-start settings wait for the first to build its warm
        # start, then load it; runs of other settings (a sweep over warmstart.*) build theirs alongside.
        wcfg = warmstart_config(cfg)
        with file_lock(Path(cfg.data.root) / ".cache" / f"warmstart-{cfg.model.name}-{warm_start_tag(wcfg)}.lock"):
            return warm_start(cfg.model.name, cfg.data.root, retriever, rcfg, wcfg, seed=cfg.data.world_seed)
    if cfg.get("sft_warmstart") and not cfg.get("checkpoint"):
        # A pretrained model fine-tuned on the teacher's trajectories first (experiment=micro_real;
        # sapo_bench/realstart.py). Not for sapo-eval of a checkpoint: its weights replace these.
        from sapo_bench.realstart import pretrained_warm_start

        wcfg = warmstart_config(cfg)
        with file_lock(Path(cfg.data.root) / ".cache" / f"sft-{cfg.model.name}-{warm_start_tag(wcfg)}.lock"):
            return pretrained_warm_start(cfg.model, cfg.data.root, retriever, rcfg, wcfg, seed=cfg.data.world_seed)
    from sapo_bench.models import load_policy

    model, tok = load_policy(cfg.model)
    return model, tok, None


class RunConflict(RuntimeError):
    """A run folder already holds a finished run of a different configuration."""


def check_resumable(run_dir: Path, cfg: DictConfig) -> None:
    """A run folder's checkpoint is resumed only by the configuration that wrote it: run folders are
    named by model, algorithm, setting and seed, not by every setting (a world seed, a warm-start
    override), so a run of another configuration can land in the same folder and would otherwise
    carry on from the first one's weights."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return
    theirs, ours = config_hash(OmegaConf.load(path)), config_hash(cfg)
    if theirs != ours:
        raise RunConflict(f"{run_dir} holds an unfinished run of another configuration (config hash {theirs}, this "
                          f"one is {ours}); its checkpoints are kept: move the folder away, or give this run another "
                          "out_root or setting")


def architecture(cfg: DictConfig) -> str | None:
    """A digest of a micro model's shape, None for other models. The config hash does not see it: a
    model file names a micro model and its parameter count, and `models.MICRO_MODELS` holds the
    shape, so a new shape with the same count (heads regrouped, say) leaves the hash as it was.
    Kept beside the hash, rather than in it, so that every run made before it keeps its identity."""
    if cfg.model.kind != "micro":
        return None
    from sapo_bench.models import MICRO_MODELS

    return hashlib.sha256(json.dumps(MICRO_MODELS[cfg.model.name], sort_keys=True).encode()).hexdigest()[:16]


def finished_result(run_dir: Path, cfg_hash: str, arch: str | None = None) -> dict | None:
    """The finished result in run_dir, None if there is none; a different configuration's is an error,
    and so is one of another micro-model shape (`architecture`; runs that predate it record none)."""
    path = Path(run_dir) / "result.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    kept = "it is kept: move it away, or give this run another out_root or setting"
    if result["run"].get("config_hash") != cfg_hash:
        raise RunConflict(f"{path} holds a finished run of another configuration (config hash "
                          f"{result['run'].get('config_hash')}, this one is {cfg_hash}); {kept}")
    theirs = result["run"].get("architecture")
    if arch is not None and theirs is not None and theirs != arch:
        raise RunConflict(f"{path} holds a finished run of another shape of {result['run'].get('model')} "
                          f"(architecture {theirs}, models.MICRO_MODELS now gives {arch}); {kept}")
    return result
