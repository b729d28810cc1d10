from pathlib import Path

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
