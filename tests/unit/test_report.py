from pathlib import Path

import pandas as pd
import pytest

from sapo_bench.report import load_published, published_table, write_published

REFERENCE = Path(__file__).resolve().parents[2] / "results" / "reference" / "published_results.csv"
HEADER = "source,table,backbone,method,dataset,metric,value,note\n"


def _row(table, method):
    return table[(table["method"] == method) & (table["metric"] == "em")].iloc[0]


def test_recomputed_averages_match_the_papers_headline_numbers(tmp_path):
    table = published_table(load_published(REFERENCE))
    # SAPO's "+10.6": SAPO-3B-Instruct 0.442 against the published Search-R1 figure 0.336
    assert _row(table, "SAPO-Instruct")["avg"] == pytest.approx(0.442, abs=5e-4)
    assert _row(table, "Search-R1-Instruct (GRPO)")["avg"] == pytest.approx(0.336, abs=5e-4)
    # the matched re-run of Table 2: 0.388 -> 0.429
    assert _row(table, "GRPO (matched re-run)")["avg"] == pytest.approx(0.388, abs=5e-4)
    # a method reported on four datasets only has no overall average
    step = _row(table, "StepSearch-Base")
    assert step["multi-hop"] == pytest.approx(0.294, abs=5e-4) and step.isna()["avg"]
    written = write_published(REFERENCE, tmp_path)
    md = written[0].read_text()
    assert "Published numbers (not measured here)" in md and "| Qwen2.5-3B | SAPO-Instruct |" in md
    assert r"\toprule" in written[2].read_text()


@pytest.mark.parametrize("line,message", [
    ("s,T1,b,m,nq,em,zero,\n", r"bad\.csv:3: value 'zero' is not a number"),
    ("s,T1,b,m,squad,em,0.1,\n", r"bad\.csv:3: unknown dataset 'squad'; valid: nq, triviaqa"),
    ("s,T1,b,m,nq,acc,0.1,\n", r"bad\.csv:3: unknown metric 'acc'; valid: em, f1"),
    ("s,T1,b,m,nq,em,42,\n", r"bad\.csv:3: value 42.0 is outside \[0, 1\]"),
])
def test_bad_reference_row_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + "s,T1,b,m,nq,em,0.5,\n" + line)
    with pytest.raises(ValueError, match=message):
        load_published(path)


# --- measured tables ------------------------------------------------------------------------------

from sapo_bench.data import DATASETS  # noqa: E402
from sapo_bench.report import WARM_START, display_rows, measured_table, paired_difference  # noqa: E402


def test_paired_difference_is_the_t_interval_of_per_seed_differences():
    mean, lo, hi = paired_difference([0.1, 0.2, 0.3])
    # sd 0.1, n 3, t(0.975, 2) = 4.3027
    assert mean == pytest.approx(0.2) and hi - mean == pytest.approx(4.3027 * 0.1 / 3 ** 0.5, rel=1e-4)
    assert lo == pytest.approx(2 * mean - hi)
    one = paired_difference([0.05])
    assert one[0] == 0.05 and pd.isna(one[1]) and pd.isna(one[2])


def _result(avg, collapse_step=None, warm=0.1, degenerate_step=None):
    em = {d: avg for d in DATASETS}
    return {"run": {"collapse_step": collapse_step, "degenerate_step": degenerate_step}, "test": {d: {"em": v, "f1": v} for d, v in em.items()},
            "warmstart": {d: {"em": warm, "f1": warm} for d in DATASETS}}


def _runs(cells):
    return pd.DataFrame([{"backbone": b, "method": m, "seed": s, "state": state, "result": res,
                          "collapse_step": res["run"]["collapse_step"] if res else None,
                          "degenerate_step": res["run"].get("degenerate_step") if res else None}
                         for b, m, s, state, res in cells])


def test_measured_table_means_stds_and_seed_paired_differences():
    runs = _runs([("q", "grpo", 0, "done", _result(0.10)), ("q", "grpo", 1, "done", _result(0.20)),
                  ("q", "grpo", 2, "failed", None),
                  ("q", "sapo", 0, "done", _result(0.30)), ("q", "sapo", 1, "done", _result(0.30, collapse_step=7)),
                  ("q", "sapo", 2, "done", _result(0.90, degenerate_step=4))])  # seed 2 has no GRPO partner: not paired
    t = measured_table(runs, "grpo").set_index("method")
    assert list(t.index) == [WARM_START, "grpo", "sapo"]
    assert t.loc[WARM_START, "avg_mean"] == pytest.approx(0.1) and t.loc[WARM_START, "n"] == 1
    assert t.loc["grpo", "n"] == 2 and t.loc["grpo", "n_runs"] == 3
    assert t.loc["grpo", "nq_mean"] == pytest.approx(0.15) and t.loc["grpo", "nq_std"] == pytest.approx(0.0707, abs=1e-4)
    assert t.loc["sapo", "avg_mean"] == pytest.approx(0.5)
    assert t.loc["sapo", "n_pairs"] == 2 and t.loc["sapo", "delta"] == pytest.approx(0.15)  # (0.2 + 0.1) / 2
    assert t.loc["sapo", "delta_rel"] == pytest.approx(1.0)  # 0.15 over the paired GRPO mean 0.15
    assert t.loc["sapo", "collapsed"] == 1 and t.loc["sapo", "collapse_steps"] == "7"
    assert pd.isna(t.loc["grpo"].get("delta"))
    header, rows = display_rows(t.reset_index(), "grpo")
    by_method = {r[1]: dict(zip(header, r)) for r in rows}
    sapo = by_method["sapo†‡"]
    assert sapo["Avg"] == "0.500 ± 0.346" and sapo["collapsed"] == "1/3 (step 7)"
    assert sapo["degenerate"] == "1/3 (from step 4)" and by_method["grpo"]["degenerate"] == "0/2"
    assert by_method["grpo"]["n"] == "2/3" and sapo["Δ %"] == "+100%"


def test_a_run_is_degenerate_when_its_last_steps_are_mostly_invalid_actions(tmp_path):
    import json

    from sapo_bench.report import degenerate_step

    def write(rates):
        lines = [{"train/step": i + 1, "train/reward_mean": 0.0, "rollout/invalid_frac": r} for i, r in enumerate(rates)]
        lines.insert(2, {"train/step": 2, "val/em": 0.1})  # validation lines are not training steps
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        return degenerate_step(tmp_path)

    assert write([0.0, 0.1, 0.6, 0.2, 0.7, 0.9, 1.0]) == 5
    assert write([0.0, 0.9, 1.0, 1.0, 0.2, 0.1, 0.1]) is None  # recovered
    assert write([0.6, 0.7]) is None  # too short to say
    assert degenerate_step(tmp_path / "missing") is None
