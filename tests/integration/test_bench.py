"""benchmarks/perf.py end to end at toy size: every case runs in its own process and the report
holds every measure with its peer and ratio. Speed itself is measured by `make bench`, not here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOY = ["--prompts", "2", "--group", "2", "--mini-batch", "2", "--completion-tokens", "6", "--repeats", "1",
       "--rounds", "1", "--warmup", "0", "--loss-repeats", "2"]


def small_world(root: Path) -> list[str]:
    return ["--override", f"data.root={root}", "data.world_scale=0.05", "warmstart.questions=24",
            "warmstart.epochs=1", "data.test_limit=2", "rollout.max_new_tokens=8", "rollout.max_obs_tokens=40"]


def test_perf_harness_runs_every_case_and_reports_each_measure(tmp_path):
    out, raw = tmp_path / "perf.md", tmp_path / "perf.json"
    # The vllm rows need .venv-vllm (tests/vllm_backend/test_vllm_bench.py runs them): here the report
    # must say they were not measured, and why.
    proc = subprocess.run([sys.executable, "benchmarks/perf.py", *TOY, *small_world(tmp_path / "world"),
                           "--vllm-python", str(tmp_path / "no-venv" / "python"),
                           "--out", str(out), "--json", str(raw)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    for row in ("rollout tokens/s, warm-started policy", "rollout tokens/s, untrained policy",
                "GRPO training step, s", "SAPO's term, share of the update", "peak memory", "## Threads and dtype",
                "TRL GRPOTrainer", "regenerate each turn", "Machine:", "Versions:", "trl ",
                "The vllm rollout rows were not measured", "make install-vllm"):
        assert row in report, row
    assert report in proc.stdout  # printed too
    res = json.loads(raw.read_text())
    for case in ("rollout:sapo-bench", "rollout:regenerate", "rollout-untrained:sapo-bench",
                 "rollout-untrained:regenerate"):
        assert res[case]["tokens_per_s"] > 0 and res[case]["positions_per_episode"] > 0
    for case in ("rollout:sapo-bench", "rollout-untrained:sapo-bench"):  # behaviour = training numerics
        assert res[case]["logp_gap"]["max"] < 1e-4
    # Regenerating re-encodes each turn's context: it computes more positions than the KV cache does.
    untrained = res["rollout-untrained:regenerate"]["positions_per_episode"]
    assert untrained > res["rollout-untrained:sapo-bench"]["positions_per_episode"]
    assert all(s > 0 for s in res["step:sapo-bench"]["seconds"] + res["step:TRL"]["seconds"])
    assert res["step:sapo-bench"]["breakdown"]["update_s"] > 0
    assert len(res["update"]["grpo"]) == len(res["update"]["sapo"]) == 1
    assert set(res["settings:dtype"]) == {"fp32", "bf16"} and res["settings:dtype"]["fp32"]["logp_err_max"] == 0


def test_perf_harness_rejects_an_unknown_case():
    proc = subprocess.run([sys.executable, "benchmarks/perf.py", "--cases", "nope"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr and "rollout" in proc.stderr


@pytest.mark.gpu
def test_gpu_benchmark_reports_rollout_speed_step_time_and_mfu(tmp_path):
    """On a GPU machine: `pytest -m gpu`. The numbers go to benchmarks/reports/performance-gpu.md
    when run by `make bench` with BENCH_ARGS='--device cuda ...'; here they must merely be sane."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    raw = tmp_path / "perf.json"
    proc = subprocess.run([sys.executable, "benchmarks/perf.py", "--device", "cuda", "--model", "qwen2-micro-16m",
                           "--cases", "rollout", "step", "update", "--repeats", "2", "--rounds", "1", "--json", str(raw),
                           *small_world(tmp_path / "world")], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(raw.read_text())
    assert res["rollout:sapo-bench"]["tokens_per_s"] > 0
    assert 0 < res["step:sapo-bench"]["mfu"] < 1 and res["step:sapo-bench"]["memory"]["kind"] == "cuda"
