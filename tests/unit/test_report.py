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


def test_the_published_table_shows_llds_with_its_headline_numbers_under_its_own_source(tmp_path):
    table = published_table(load_published(REFERENCE))
    llds = table[table.source == "arXiv:2512.04220v2 (LLDS)"]

    def avg(backbone, method):
        return llds[(llds.backbone == backbone) & (llds.method == method)].iloc[0]["avg"]

    # the paper's abstract: 3B-Instruct GRPO 0.336 -> 0.441, 7B-Instruct 0.396 -> 0.483, 3B-Base 0.312 -> 0.360
    for backbone, grpo, with_llds in (("Qwen2.5-3B-Instruct", 0.336, 0.441), ("Qwen2.5-7B-Instruct", 0.396, 0.483),
                                      ("Qwen2.5-3B-Base", 0.312, 0.360)):
        assert avg(backbone, "GRPO") == pytest.approx(grpo, abs=5e-4)
        assert avg(backbone, "GRPO + LLDS") == pytest.approx(with_llds, abs=5e-4)
    assert avg("Qwen2.5-3B-Base", "GRPO + LLDS-MA") == pytest.approx(0.440, abs=5e-4)
    assert len(llds) == 11 and set(llds.metric) == {"em"}
    md = write_published(REFERENCE, tmp_path)[0].read_text()
    section = md.split("## arXiv:2512.04220v2 (LLDS), Tables 1-2 — EM")[1].split("\n## ")[0]
    assert "| Qwen2.5-7B-Instruct | GRPO + LLDS |" in section and "SAPO" not in section


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


def _scores(v):
    return {d: {"em": v, "f1": v, "n": 4} for d in DATASETS}


def _result(avg, collapse_step=None, warm=0.1, degenerate_step=None, baselines=None):
    """A result.json; `baselines` {name: EM on every dataset}, or None for a run made before baselines."""
    em = {d: avg for d in DATASETS}
    res = {"run": {"collapse_step": collapse_step, "degenerate_step": degenerate_step},
           "test": {d: {"em": v, "f1": v} for d, v in em.items()}, "warmstart": _scores(warm)}
    if baselines is not None:
        res["baselines"] = {name: _scores(v) for name, v in baselines.items()}
    return res


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


def test_baseline_rows_come_first_and_every_policy_row_is_compared_with_no_search():
    from sapo_bench.report import NO_BACKBONE, latex_table, no_search_verdicts

    q = {"no_search": 0.05, "naive_rag": 0.30, "oracle": 0.90}
    runs = _runs([
        ("q", "grpo", 0, "done", _result(0.10)),  # made before baselines: the next run of q reports them
        ("q", "grpo", 1, "done", _result(0.20, baselines=q)),
        ("q", "sapo", 0, "done", _result(0.30, baselines=q)), ("q", "sapo", 1, "done", _result(0.32, baselines=q)),
        ("m", "grpo", 0, "done", _result(0.50, baselines={"no_search": 0.05, "naive_rag": 0.2, "oracle": 0.8})),
        ("l", "grpo", 0, "done", _result(0.10)), ("l", "sapo", 0, "done", _result(0.20))])  # no baselines at all
    t = measured_table(runs, "grpo")
    direct, rag, ceiling = "Direct answer (no search)", "Naive RAG (one search with the question)", \
        "Oracle chain (teacher, ceiling)"
    assert list(zip(t.backbone, t.method, t.kind)) == [
        (NO_BACKBONE, ceiling, "baseline"),  # no model in it: once, at the top, from the first backbone
        ("q", direct, "baseline"), ("q", rag, "baseline"), ("q", WARM_START, "warmstart"),
        ("q", "grpo", "trained"), ("q", "sapo", "trained"),
        ("m", direct, "baseline"), ("m", rag, "baseline"), ("m", WARM_START, "warmstart"), ("m", "grpo", "trained"),
        ("l", WARM_START, "warmstart"), ("l", "grpo", "trained"), ("l", "sapo", "trained")]
    r = t.set_index(["backbone", "method"])
    assert r.loc[(NO_BACKBONE, ceiling), "avg_mean"] == pytest.approx(0.9) and r.loc[("q", rag), "n"] == 1
    # Δ vs no search (0.05): warm start 0.10 - 0.05; grpo seeds 0.05, 0.15 -> 0.10 ± t(0.975, 1) * 0.0707 / √2
    assert r.loc[("q", WARM_START), "delta_ns"] == pytest.approx(0.05)
    assert r.loc[("q", "grpo"), "delta_ns"] == pytest.approx(0.10)
    assert r.loc[("q", "grpo"), "delta_ns_hi"] == pytest.approx(0.10 + 12.7062 * 0.05, abs=1e-4)
    assert r.loc[("q", "sapo"), "delta_ns_lo"] == pytest.approx(0.26 - 12.7062 * 0.01, abs=1e-4)
    assert r.loc[("m", "grpo"), "delta_ns"] == pytest.approx(0.45) and pd.isna(r.loc[("m", "grpo"), "delta_ns_lo"])
    assert r.loc[("l", "sapo")].isna()["delta_ns"] and r.loc[("q", direct)].isna()["delta_ns"]

    header, rows = display_rows(t, "grpo")
    cell = {(row[0], row[1]): dict(zip(header, row)) for row in rows}
    assert cell[(NO_BACKBONE, ceiling)]["Avg"] == "0.900" and cell[(NO_BACKBONE, ceiling)]["n"] == "1"
    assert cell[("q", direct)]["Δ Avg vs no search"] == "" and cell[("q", direct)]["collapsed"] == ""
    assert cell[("q", WARM_START)]["Δ Avg vs no search"] == "+0.050"
    assert cell[("q", "grpo")]["Δ Avg vs no search"] == "+0.100 [-0.535, +0.735]"
    assert cell[("q", "sapo")]["Δ Avg vs no search"] == "+0.260 [+0.133, +0.387]"
    assert cell[("q", "sapo")]["Δ Avg vs grpo"] == "+0.160" and cell[("l", "sapo")]["Δ Avg vs no search"] == ""
    # grpo's interval reaches below 0, m's single seed has none; l has no no-search row to compare with
    assert no_search_verdicts(t) == [
        "q: grpo does not clearly beat no search (Δ Avg vs no search ≤ 0, or its 95% interval does not exclude 0).",
        "m: grpo does not clearly beat no search (Δ Avg vs no search ≤ 0, or its 95% interval does not exclude 0)."]
    assert no_search_verdicts(t[t.method != "grpo"]) == [
        "q: every trained row beats no search (its 95% interval of Δ Avg vs no search lies above 0)."]
    tex = latex_table(header, display_rows(t, "grpo", tex=True)[1], "caption")
    assert r"--- & Oracle chain (teacher, ceiling) & 1 & 0.900" in tex and r"$\Delta$ Avg vs no search" in tex


def test_every_trained_row_is_compared_with_its_warm_start_one_sample_per_seed():
    from sapo_bench.report import warm_start_verdicts

    runs = _runs([("q", "grpo", 0, "done", _result(0.20)), ("q", "grpo", 1, "done", _result(0.22)),
                  *[("q", "sapo", s, "done", _result(0.05 + 0.001 * s)) for s in range(3)],
                  ("q", "llds", 0, "done", _result(0.0)), ("q", "llds", 1, "done", _result(0.3)),
                  ("m", "grpo", 0, "done", _result(0.5, warm=0.4))])
    t = measured_table(runs, "grpo")
    r = t.set_index(["backbone", "method"])
    # warm start 0.10: grpo seeds +0.10, +0.12 -> +0.11 ± t(0.975, 1) * 0.01414 / √2 = ± 0.127
    assert r.loc[("q", "grpo"), "delta_ws"] == pytest.approx(0.11)
    assert r.loc[("q", "grpo"), "delta_ws_lo"] == pytest.approx(0.11 - 12.7062 * 0.01, abs=1e-4)
    assert r.loc[("m", "grpo"), "delta_ws"] == pytest.approx(0.1) and pd.isna(r.loc[("m", "grpo"), "delta_ws_lo"])
    assert pd.isna(r.loc[("q", WARM_START), "delta_ws"])  # the warm start is not compared with itself
    header, rows = display_rows(t, "grpo")
    cell = {(row[0], row[1]): dict(zip(header, row)) for row in rows}
    assert cell[("q", "grpo")]["Δ Avg vs warm start"] == "+0.110 [-0.017, +0.237]"
    assert cell[("q", WARM_START)]["Δ Avg vs warm start"] == ""
    # grpo's interval reaches below 0 with two seeds this far apart; sapo's three lie close below 0
    assert warm_start_verdicts(t) == [
        "q: sapo below; grpo, llds not told apart from the warm start (95% interval of Δ Avg vs warm start).",
        "m: grpo not told apart from the warm start (95% interval of Δ Avg vs warm start)."]
    close = _runs([("q", "grpo", s, "done", _result(0.2 + 0.001 * s)) for s in range(3)])
    assert warm_start_verdicts(measured_table(close, "grpo")) == [
        "q: grpo above the warm start (95% interval of Δ Avg vs warm start)."]


def test_runs_made_before_baselines_give_the_old_rows_and_no_verdict():
    runs = _runs([("q", "grpo", 0, "done", _result(0.1)), ("q", "sapo", 0, "done", _result(0.2))])
    t = measured_table(runs, "grpo")
    assert list(t.method) == [WARM_START, "grpo", "sapo"] and "delta_ns" not in t
    from sapo_bench.report import no_search_verdicts

    assert no_search_verdicts(t) == []
    header, rows = display_rows(t, "grpo")
    assert all(dict(zip(header, row))["Δ Avg vs no search"] == "" for row in rows)


def test_a_report_with_no_finished_run_says_so_and_writes_nothing(tmp_path):
    from sapo_bench.report import write_experiment

    overrides = [f"out_root={tmp_path}/runs", f"data.root={tmp_path}/world"]
    with pytest.raises(SystemExit, match=r"sapo-report micro_smoke: no finished run \(8 new\): nothing written"):
        write_experiment("micro_smoke", overrides, tmp_path / "results", "sapo-report micro_smoke")
    assert not (tmp_path / "results").exists()
