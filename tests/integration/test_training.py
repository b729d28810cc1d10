"""End to end on a tiny world: warm start, GRPO/SAPO/PPO steps, test, result.json; kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from metric_names import documented

from sapo_bench.evaluate import run_eval
from sapo_bench.train import train

CONF = Path(__file__).resolve().parents[2] / "conf"
REQUIRED = ["train/reward_mean", "is_ratio/mean", "is_ratio/min", "is_ratio/frac_below_tau",
            "is_ratio/pos_frac_below_tau", "isdd/frac_seq_prod_below_eps", "loss/policy", "loss/clip_frac",
            "loss/ref_kl", "policy/entropy", "rollout/searches_mean", "rollout/invalid_frac", "rollout/response_len",
            "train/zero_adv_frac", "rollout/answered_frac", "isdd/frac_seq_geo_below_eps", "off/is_ratio/p5",
            "off/isdd/frac_seq_prod_below_eps", "off/isdd/frac_seq_geo_below_eps", "on/is_ratio/pos_frac_below_tau"]


def tiny_overrides(tmp, algo="grpo", steps=2):
    return [f"algo={algo}", f"out_root={tmp}/runs", f"data.root={tmp}/world", "data.world_scale=0.05",
            f"train.max_steps={steps}", "train.prompts_per_step=2", "train.group_size=3", "train.mini_batch_size=3",
            "train.micro_batch_size=3", "warmstart.questions=32", "warmstart.epochs=1", "warmstart.eval_limit=4",
            "data.n_val=4", "data.test_limit=4", "eval.val_every=2", "checkpoint_every=1",
            "rollout.max_new_tokens=8", "rollout.max_turns=2", "rollout.max_response_tokens=120"]


def tiny_cfg(tmp, **kw):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=tiny_overrides(tmp, **kw))


def lines(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ["sapo", "ppo"])
def test_a_tiny_run_end_to_end(tmp_path, algo):
    cfg = tiny_cfg(tmp_path, algo=algo)
    if algo == "sapo":  # the mismatch machinery on the hf engine, where behaviour = training numerics
        cfg.train.recompute_old_logp, cfg.train.tis = True, True
    result = train(cfg)
    run = Path(cfg.run_dir)
    saved = json.loads((run / "result.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["run"]["algo"] == algo and saved["run"]["steps"] == 2 and saved["run"]["seed"] == 0
    assert set(saved["test"]) == {"nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle"}
    assert all(0 <= r["em"] <= 1 and r["n"] == 4 for r in saved["test"].values())
    assert saved["run"]["config_hash"] and saved["run"]["git_commit"]
    assert "baselines" in saved  # the warm start's baseline rows, for the report (None before it measures them)
    steps = [m for m in lines(run) if "train/reward_mean" in m]
    assert [m["train/step"] for m in steps] == [1.0, 2.0]
    for name in REQUIRED:
        assert name in steps[0], name
    assert steps[0]["train/optimizer_steps"] == 2  # 6 responses in mini-batches of 3: off-policy structure
    if algo == "sapo":
        assert "loss/sapo_term" in steps[0]
        assert "on/loss/sapo_gated_frac" in steps[0] and "off/loss/sapo_gated_frac" in steps[0]
        for m in steps:  # the hf engine's behaviour log-probs are the training forward's
            assert m["rollout/logp_gap_max"] < 1e-4 and m["rollout/tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
            assert m["rollout/tis_capped_frac"] == 0.0
    else:
        assert "loss/value" in steps[0]
        assert "rollout/logp_gap_mean" not in steps[0]  # hf: nothing recomputed by default
    assert saved["run"]["rollout_backend"] == "hf" and saved["run"]["recompute_old_logp"] == (algo == "sapo")
    assert any("val/em" in m for m in lines(run))
    # Every logged name is documented once in docs/metrics.md (per-dataset names by their pattern).
    assert {k for m in lines(run) for k in m if not documented(k)} <= {"epoch", "optimizer_step"}
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "config.yaml").exists()
    # started again, a finished run is skipped, not redone
    mtime = (run / "result.json").stat().st_mtime
    train(cfg)
    assert (run / "result.json").stat().st_mtime == mtime
    # sapo-eval on the run's checkpoint reproduces the run's own test numbers
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        ecfg = compose(config_name="config", overrides=tiny_overrides(tmp_path, algo=algo) +
                       [f"checkpoint={run}/checkpoints/last.ckpt", f"out={tmp_path}/eval.json"])
    evaluated = run_eval(ecfg)
    assert json.loads((tmp_path / "eval.json").read_text())["test"] == evaluated["test"] == saved["test"]


def test_sapo_eval_writes_a_world_it_has_not_seen_and_scores_its_warm_start(tmp_path):
    # The retriever reads the world's corpus, so the world is written before it is built.
    cfg = tiny_cfg(tmp_path)
    cfg.out = str(tmp_path / "eval.json")
    assert not (tmp_path / "world").exists()
    evaluated = run_eval(cfg)
    assert (tmp_path / "world" / "world.json").exists()
    assert set(evaluated["test"]) == {"nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle"}
    assert json.loads((tmp_path / "eval.json").read_text())["test"] == evaluated["test"]


@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path):
    steps = 4
    args = tiny_overrides(tmp_path, steps=steps) + ["eval.val_every=100"]
    ref_args = [a.replace(f"out_root={tmp_path}/runs", f"out_root={tmp_path}/ref") for a in args]
    subprocess.run([sys.executable, "-m", "sapo_bench.train", *ref_args], check=True, capture_output=True)
    ref_dir = next((tmp_path / "ref").rglob("result.json")).parent
    proc = subprocess.Popen([sys.executable, "-m", "sapo_bench.train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    run_dir = None
    while time.time() < deadline:
        found = list((tmp_path / "runs").rglob("metrics.jsonl"))
        if found and sum('"train/reward_mean"' in line for line in found[0].read_text().splitlines()) >= 2:
            run_dir = found[0].parent
            break
        time.sleep(0.2)
    assert run_dir is not None, "the run never reached step 2"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "result.json").exists()
    subprocess.run([sys.executable, "-m", "sapo_bench.train", *args], check=True, capture_output=True)
    got = [m for m in lines(run_dir) if "train/reward_mean" in m]
    want = [m for m in lines(ref_dir) if "train/reward_mean" in m]
    assert [m["train/step"] for m in got] == list(map(float, range(1, steps + 1)))
    for g, w in zip(got, want):
        for key in ("train/reward_mean", "loss/policy", "is_ratio/mean", "policy/entropy"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (g["train/step"], key)
    a = json.loads((run_dir / "result.json").read_text())["test"]
    b = json.loads((ref_dir / "result.json").read_text())["test"]
    assert a == b


def test_non_finite_losses_are_skipped_counted_and_mark_the_run_collapsed(tmp_path, monkeypatch):
    import torch

    from sapo_bench import module

    from sapo_bench.runtime import load_policy_for, prepare_data
    from sapo_bench.rollout import RolloutConfig
    from sapo_bench.retrieval import build_retriever

    cfg = tiny_cfg(tmp_path, steps=3)
    prepare_data(cfg)  # warm start first (cached), so only the RL updates see the divergence
    load_policy_for(cfg, build_retriever("bm25", corpus_path=cfg.data.corpus),
                    RolloutConfig(**cfg.rollout, chat_template=False))
    real = module.token_logp
    rollout_modes = []
    real_rollout = module.rollout

    def watched_rollout(engine, *args, **kwargs):  # the hf engine generates with the policy itself
        rollout_modes.append(engine.model.training)
        return real_rollout(engine, *args, **kwargs)

    monkeypatch.setattr(module, "rollout", watched_rollout)

    modes = []

    def diverged(*args, **kwargs):  # finite for the first step's two optimiser steps, then NaN
        lp, ent, val = real(*args, **kwargs)
        if torch.is_grad_enabled():
            modes.append(args[0].training)
            if len(modes) > 2:
                return lp * float("nan"), ent, val
        return lp, ent, val

    monkeypatch.setattr(module, "token_logp", diverged)
    cfg.train.nonfinite_patience = 2
    result = train(cfg)  # recorded, not crashed
    assert result["run"]["collapsed_reason"] == "nonfinite"
    assert result["run"]["nonfinite_skipped"] == 2 and result["run"]["steps"] == 2
    steps = [m for m in lines(cfg.run_dir) if "train/reward_mean" in m]
    assert steps[-1]["train/optimizer_steps"] == 0 and steps[-1]["train/collapsed"] == 1.0
    # a step's line holds what it computed: the losses of step 1, none (not step 1's again) at step 2
    assert "loss/policy" in steps[0] and "loss/policy" not in steps[-1] and "is_ratio/p5" not in steps[-1]
    # the update runs in train mode; the policy is back in eval mode for rollouts and scoring
    assert modes and all(modes)
    assert rollout_modes and not any(rollout_modes)


def test_a_failing_retriever_is_retried_then_stops_with_a_clear_error():
    from sapo_bench.runtime import RetryingRetriever

    class Flaky:
        calls = 0

        def search(self, queries, k=3):
            self.calls += 1
            if self.calls < 3:
                raise ConnectionError("down")
            return [[] for _ in queries]

    flaky = Flaky()
    assert RetryingRetriever(flaky, tries=3, wait=0).search(["q"]) == [[]] and flaky.calls == 3
    with pytest.raises(RuntimeError, match="retriever failed 2 times, stopping the run .*last checkpoint is kept.*down"):
        RetryingRetriever(Flaky(), tries=2, wait=0).search(["q"])
