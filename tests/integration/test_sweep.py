"""A small sweep and its report, end to end: parallel runs, skip on re-run, failures that do not stop
the sweep, a folder of another configuration left alone, and the tables and figures it all makes."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sapo_bench.sweep import expand

TINY = ["data.world_scale=0.05", "train.max_steps=2", "train.prompts_per_step=2", "train.group_size=3",
        "train.mini_batch_size=3", "train.micro_batch_size=3", "warmstart.questions=32", "warmstart.epochs=1",
        "data.n_val=4", "data.test_limit=4", "eval.val_every=2", "checkpoint_every=1",
        "rollout.max_new_tokens=8", "rollout.max_turns=2", "rollout.max_response_tokens=120"]


def sweep_cli(*args):
    return subprocess.run([sys.executable, "-m", "sapo_bench.sweep", *args], capture_output=True, text=True,
                          timeout=500)


def test_a_sweep_runs_resumes_reports_and_survives_a_failure(tmp_path):
    over = TINY + [f"out_root={tmp_path}/runs", f"data.root={tmp_path}/world", "model=qwen2-micro-1m", "seed=0,1"]
    runs = {r.run_dir.relative_to(tmp_path / "runs").as_posix(): r for r in expand(["micro_smoke"], over)}
    assert sorted(runs) == [f"micro/default/qwen2-micro-1m/{a}/seed{s}" for a in ("grpo", "sapo") for s in (0, 1)]

    # one run that cannot resume (its checkpoint is garbage) and one folder of another configuration
    broken = runs["micro/default/qwen2-micro-1m/sapo/seed1"].run_dir
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    foreign = runs["micro/default/qwen2-micro-1m/grpo/seed1"].run_dir
    foreign.mkdir(parents=True)
    (foreign / "result.json").write_text(json.dumps({"run": {"config_hash": "0123456789abcdef"}}))

    first = sweep_cli("micro_smoke", "--jobs", "2", *over)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "[2/4 done" in first.stdout and "FAILED qwen2-micro-1m/sapo/seed1" in first.stdout
    assert "conflict: qwen2-micro-1m/grpo/seed1" in first.stdout
    assert json.loads((foreign / "result.json").read_text()) == {"run": {"config_hash": "0123456789abcdef"}}
    assert (broken / "error.json").exists() and not (broken / "result.json").exists()
    done = runs["micro/default/qwen2-micro-1m/grpo/seed0"].run_dir / "result.json"
    mtime = done.stat().st_mtime

    # the report: two finished runs in the cells, the other two named under the table
    out = tmp_path / "results"
    rep = subprocess.run([sys.executable, "-m", "sapo_bench.report", "micro_smoke", *over, "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    md = (out / "tables" / "micro_smoke.md").read_text()
    assert "micro world's mirrors" in md and "Runs: 2 of 4 finished" in md
    assert "| qwen2-micro-1m | grpo | 1/2 |" in md and "| qwen2-micro-1m | warm start | 1 |" in md
    assert "qwen2-micro-1m / sapo / seed 1:" in md and "another configuration" in md
    assert r"\toprule" in (out / "tables" / "micro_smoke.tex").read_text()
    csv = pd.read_csv(out / "tables" / "micro_smoke.csv")
    assert set(csv.metric) == {"em", "f1"} and {"avg_mean", "avg_std", "delta", "delta_lo"} <= set(csv.columns)
    for fig in ("micro_smoke-dynamics.png", "micro_smoke-datasets.png"):
        assert (out / "figures" / fig).stat().st_size > 10_000

    # fixed, the sweep runs only what is missing; finished results are not touched
    (broken / "checkpoints" / "last.ckpt").unlink()
    second = sweep_cli("micro_smoke", "--jobs", "2", *over)
    assert "2 finished already, 1 to run" in second.stdout, second.stdout
    assert second.returncode == 1  # the foreign folder is still there, and still reported
    assert done.stat().st_mtime == mtime
    assert (broken / "result.json").exists() and not (broken / "error.json").exists()
    listing = sweep_cli("micro_smoke", "--list", *over).stdout
    assert listing.count("done") == 3 and "conflict" in listing


def test_unknown_experiment_lists_the_valid_ones():
    res = sweep_cli("micro_mian")
    assert res.returncode != 0 and "unknown experiment 'micro_mian'; valid:" in res.stderr
    assert "micro_main" in res.stderr


@pytest.mark.parametrize("experiment", ["micro_main", "micro_ablation", "micro_stabilisers"])
def test_tables_that_share_a_run_share_its_folder(experiment):
    main = {r.run_dir for r in expand(["micro_main"])}
    both = expand(["micro_main", experiment])
    assert len(both) == len(main | {r.run_dir for r in expand([experiment])})
    assert {r.run_dir for r in both} >= main


def test_two_tables_claiming_one_folder_with_different_settings_is_an_error():
    # micro_stress without a setting of its own would write into micro_main's folders
    with pytest.raises(SystemExit, match="claimed by micro_main and micro_stress with different configurations"):
        expand(["micro_main", "micro_stress"], ["setting=default"])
