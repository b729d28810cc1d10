"""Settings that cannot work fail at start, with a message that names the setting."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from sapo_bench.algos import Algo
from sapo_bench.module import TrainConfig, check_run
from sapo_bench.rollout import RolloutConfig
from sapo_bench.runtime import run_configs
from sapo_bench.settings import SettingError
from sapo_bench.sweep import expand, sweep
from sapo_bench.train import train

CONF = Path(__file__).resolve().parents[2] / "conf"
GRPO = Algo.from_config({"name": "grpo", "loss": "grpo", "advantage": "grpo"})
PPO = Algo.from_config({"name": "ppo", "loss": "ppo", "advantage": "gae", "value_head": True})


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("train,says", [
    ({"group_size": 0}, "train.group_size must be at least 1, got 0"),
    ({"prompts_per_step": 0}, "train.prompts_per_step must be at least 1, got 0"),
    ({"max_steps": 0}, "train.max_steps must be at least 1, got 0"),
    ({"max_steps": -3}, "train.max_steps must be at least 1, got -3"),
    ({"ppo_epochs": 0}, "train.ppo_epochs must be at least 1, got 0"),
    ({"mini_batch_size": 0}, "train.mini_batch_size must be at least 1, got 0"),
    ({"micro_batch_size": 0}, "train.micro_batch_size must be at least 1, got 0"),
    ({"nonfinite_patience": 0}, "train.nonfinite_patience must be at least 1, got 0"),
    ({"group_size": 2.5}, "train.group_size must be a whole number, got 2.5"),
    ({"prompts_per_step": 2, "group_size": 3, "mini_batch_size": 8},
     r"train.mini_batch_size \(8\) is larger than the rollout batch, "
     r"train.prompts_per_step × train.group_size = 2 × 3 = 6"),
    ({"mini_batch_size": 10, "micro_batch_size": 4},
     r"train.micro_batch_size \(4\) must divide train.mini_batch_size \(10\)"),
    ({"mini_batch_size": 10, "micro_batch_size": 20}, r"train.micro_batch_size \(20\) must divide"),
    ({"lr": -1e-4}, "train.lr must be at least 0, got -0.0001"),
    ({"lr": float("nan")}, "train.lr must be a finite number, got nan"),
    ({"warmup_ratio": 1.5}, "train.warmup_ratio must be at most 1, got 1.5"),
    ({"grad_clip": -1.0}, "train.grad_clip must be at least 0"),
    ({"ref_kl_beta": -0.1}, "train.ref_kl_beta must be at least 0"),
    ({"tis_cap": 0.0}, "train.tis_cap must be positive, got 0.0"),
    ({"reward": "bleu"}, "unknown reward 'bleu'; valid: em, f1"),
    ({"collapse": {"seq_len": 0}}, "train.collapse.seq_len must be at least 1, got 0"),
    ({"collapse": {"reward_frac": 0.0}}, "train.collapse.reward_frac must be positive"),
    ({"collapse": {"window_frac": 1.5}}, "train.collapse.window_frac must be at most 1"),
    ({"collapse": {"ratio_p5": "low"}}, "train.collapse.ratio_p5 must be a finite number"),
    ({"collapse": {"window": 5}}, "unknown train.collapse key 'window'; valid: window_frac, start_frac, "
                                  "reward_frac, ratio_p5, seq_frac, seq_len"),
])
def test_impossible_training_settings_name_themselves(train, says):
    base = {"prompts_per_step": 8, "group_size": 5, "mini_batch_size": 10, "micro_batch_size": 10}
    with pytest.raises(ValueError, match=says):
        TrainConfig(**{**base, **train})


def test_what_can_work_is_accepted():
    TrainConfig(prompts_per_step=2, group_size=3, mini_batch_size=4, micro_batch_size=2, lr=0.0, grad_clip=0.0)
    TrainConfig(prompts_per_step=1, group_size=1, mini_batch_size=1, micro_batch_size=1)  # PPO's single samples


def test_a_group_of_one_cannot_train_a_group_baseline():
    one = TrainConfig(prompts_per_step=4, group_size=1, mini_batch_size=4, micro_batch_size=4)
    with pytest.raises(SettingError, match="train.group_size=1 cannot train algo 'grpo': its grpo advantage"):
        check_run(one, GRPO, RolloutConfig())
    check_run(one, PPO, RolloutConfig())  # GAE's baseline is the value head


@pytest.mark.parametrize("rollout,says", [
    ({"max_new_tokens": 0}, "rollout.max_new_tokens must be at least 1, got 0"),
    ({"topk": 0}, "rollout.topk must be at least 1, got 0"),
    ({"max_turns": -1}, "rollout.max_turns must be at least 0, got -1"),
    ({"max_response_tokens": 0}, "rollout.max_response_tokens must be at least 1"),
    ({"temperature": 0.0}, "rollout.temperature must be positive, got 0.0"),
    ({"top_p": 1.5}, "rollout.top_p must be at most 1, got 1.5"),
])
def test_impossible_rollout_settings_name_themselves(rollout, says):
    with pytest.raises(SettingError, match=says):
        RolloutConfig(**rollout)


@pytest.mark.parametrize("override,says", [
    ("train.group_size=0", "train.group_size must be at least 1, got 0"),
    ("checkpoint_every=0", "checkpoint_every must be at least 1, got 0"),
    ("eval.val_every=0", "eval.val_every must be at least 1, got 0"),
    ("eval.batch_size=0", "eval.batch_size must be at least 1, got 0"),
    ("train.tis=true", r"train.tis=true .*set train.recompute_old_logp=true"),
    ("warmstart.batch_size=0", "warmstart.batch_size must be at least 1, got 0"),
    ("warmstart.epochs=0", "warmstart.epochs must be positive, got 0"),
    ("warmstart.p_stop_early=1.5", "warmstart.p_stop_early must be at most 1, got 1.5"),
    ("warmstart.aux_skip_top=-1", "warmstart.aux_skip_top must be at least 0, got -1"),
])
def test_a_run_checks_its_configs_together(override, says):
    extra = ["train.recompute_old_logp=false"] if override == "train.tis=true" else []
    with pytest.raises(SettingError, match=says):
        run_configs(composed(override, *extra))


def test_sapo_train_stops_before_it_writes_anything(tmp_path):
    cfg = composed(f"out_root={tmp_path}/runs", f"data.root={tmp_path}/world", "train.group_size=0")
    with pytest.raises(SettingError, match="train.group_size must be at least 1, got 0"):
        train(cfg)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "world").exists()  # no error.json, no world


def test_sapo_sweep_stops_before_any_run_starts(tmp_path):
    runs = expand(["micro_smoke"], [f"out_root={tmp_path}/runs", f"data.root={tmp_path}/world",
                                    "train.prompts_per_step=2", "train.group_size=3"])
    with pytest.raises(SystemExit, match=r"sapo-sweep: qwen2-micro-1m/grpo/seed0: train.mini_batch_size \(8\) "
                                         "is larger than the rollout batch"):
        sweep(runs, jobs=1, out=lambda line: None)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "world").exists()
