"""Every config composes, and what it composes to is valid for the object it configures."""

import dataclasses
import inspect
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sapo_bench.algos import Algo
from sapo_bench.module import TrainConfig
from sapo_bench.rollout import RolloutConfig
from sapo_bench.warmstart import WarmStartConfig

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml"))
          for g in ("model", "algo", "data", "retriever", "rollout", "trainer", "logger", "experiment")}


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _fields(cls):
    return {f.name for f in dataclasses.fields(cls)}


def test_groups_are_all_there():
    assert set(GROUPS["trainer"]) == {"cpu", "gpu", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}
    assert {"grpo", "sapo", "sapo_kl", "sapo_kl_r", "ppo"} <= set(GROUPS["algo"])
    assert "micro_smoke" in GROUPS["experiment"]


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_into_valid_objects(group, option):
    cfg = composed(f"{group}={option}")
    Algo.from_config(OmegaConf.to_container(cfg.algo, resolve=True))
    assert set(cfg.rollout) <= _fields(RolloutConfig)
    RolloutConfig(**cfg.rollout)
    TrainConfig(**OmegaConf.to_container(cfg.train, resolve=True))
    WarmStartConfig(**cfg.warmstart)
    trainer_args = set(inspect.signature(L.Trainer.__init__).parameters)
    assert set(cfg.trainer) <= trainer_args
    assert cfg.model.name and cfg.model.kind in {"micro", "hub", "gguf"}
    assert cfg.run_dir.endswith(f"{cfg.model.name}/{cfg.algo.name}/seed{cfg.seed}")


@pytest.mark.parametrize("option", GROUPS["trainer"])
def test_trainer_strategies_and_precisions_are_known_to_lightning(option):
    from lightning.pytorch.strategies import StrategyRegistry

    cfg = composed(f"trainer={option}").trainer
    assert cfg.get("strategy", "auto") in set(StrategyRegistry.available_strategies()) | {"auto", "ddp", "fsdp"}
    assert cfg.precision in {"32-true", "bf16-mixed", "16-mixed", "bf16-true"}
    if option == "cpu":
        L.Trainer(**cfg, logger=False, enable_checkpointing=False)


@pytest.mark.gpu
@pytest.mark.parametrize("option", [o for o in GROUPS["trainer"] if o != "cpu"])
def test_gpu_trainers_build_on_a_gpu(option):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if option.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    L.Trainer(**composed(f"trainer={option}").trainer, logger=False, enable_checkpointing=False)


def test_unknown_names_list_the_valid_ones():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="sapoo"):
        composed("algo=sapoo")
    with pytest.raises(MissingConfigException, match="qwen2-micro-1m"):  # Hydra lists the options
        composed("model=qwen9")
