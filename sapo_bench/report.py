"""Tables from results. For now: the published numbers, rendered as the papers print them.

    sapo-report [--reference results/reference/published_results.csv] [--out results/tables]

Writes published.{md,csv,tex}. Averages are recomputed from the seven columns (1-hop = NQ,
TriviaQA, PopQA; multi-hop = the other four; Avg = all seven), never read from a paper, and are
left blank where a paper reports fewer than all of their datasets.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pandas as pd

from sapo_bench.data import DATASETS, DISPLAY, MULTI_HOP, SINGLE_HOP
from sapo_bench.io import atomic_write_text

REFERENCE_COLUMNS = ["source", "table", "backbone", "method", "dataset", "metric", "value", "note"]
METRICS = ("em", "f1")
AVERAGES = {"1-hop": SINGLE_HOP, "multi-hop": MULTI_HOP, "avg": DATASETS}


def load_published(path: str | Path) -> pd.DataFrame:
    """Read the long-format reference CSV; a bad row is an error naming the file and line."""
    path = Path(path)
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != REFERENCE_COLUMNS:
            raise ValueError(f"{path}:1: header must be {','.join(REFERENCE_COLUMNS)}; got {','.join(reader.fieldnames or [])}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if row["dataset"] not in DATASETS:
                raise ValueError(f"{where}: unknown dataset {row['dataset']!r}; valid: {', '.join(DATASETS)}")
            if row["metric"] not in METRICS:
                raise ValueError(f"{where}: unknown metric {row['metric']!r}; valid: {', '.join(METRICS)}")
            try:
                value = float(row["value"])
            except ValueError:
                raise ValueError(f"{where}: value {row['value']!r} is not a number") from None
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{where}: value {value} is outside [0, 1]")
            rows.append({**row, "value": value})
    df = pd.DataFrame(rows, columns=REFERENCE_COLUMNS)
    dup = df.duplicated(["source", "table", "backbone", "method", "dataset", "metric"])
    if dup.any():
        first = df[dup].iloc[0]
        raise ValueError(f"{path}: duplicate entry for {first['table']} / {first['backbone']} / {first['method']} / "
                         f"{first['dataset']} / {first['metric']}")
    return df


def with_averages(wide: pd.DataFrame) -> pd.DataFrame:
    """Add 1-hop, multi-hop and avg columns: unweighted means, NaN unless every member is present."""
    wide = wide.reindex(columns=list(DATASETS))
    for name, members in AVERAGES.items():
        wide[name] = wide[list(members)].mean(axis=1, skipna=False)
    return wide


def published_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (source, table, backbone, method, metric); the seven datasets and the averages as columns."""
    keys = ["source", "table", "backbone", "method", "metric"]
    wide = df.pivot_table(index=keys, columns="dataset", values="value", aggfunc="first", sort=False)
    return with_averages(wide).reset_index()


def _fmt(v) -> str:
    return "" if pd.isna(v) else f"{v:.3f}"


def to_markdown(table: pd.DataFrame, label_cols: list[str]) -> str:
    value_cols = [c for c in table.columns if c not in label_cols]
    header = label_cols + [DISPLAY.get(c, c) for c in value_cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(label_cols) + ["---:"] * len(value_cols)) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join([str(row[c]) for c in label_cols] + [_fmt(row[c]) for c in value_cols]) + " |")
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        s = s.replace(a, b)
    return s


def to_latex(table: pd.DataFrame, label_cols: list[str]) -> str:
    value_cols = [c for c in table.columns if c not in label_cols]
    lines = [r"\begin{tabular}{" + "l" * len(label_cols) + "r" * len(value_cols) + "}", r"\toprule",
             " & ".join(_tex(c) for c in label_cols + [DISPLAY.get(c, c) for c in value_cols]) + r" \\", r"\midrule"]
    for _, row in table.iterrows():
        lines.append(" & ".join([_tex(str(row[c])) for c in label_cols] + [_fmt(row[c]) for c in value_cols]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_published(reference: Path, out: Path) -> list[Path]:
    table = published_table(load_published(reference))
    parts = ["# Published numbers (not measured here)\n",
             f"From `{reference}`; averages recomputed. These are the papers' numbers, never mixed with "
             "measured cells.\n"]
    for (source, tab, metric), block in table.groupby(["source", "table", "metric"], sort=False):
        parts.append(f"\n## {source}, {tab} — {metric.upper()}\n\n")
        parts.append(to_markdown(block.drop(columns=["source", "table", "metric"]), ["backbone", "method"]))
    written = [out / "published.md", out / "published.csv", out / "published.tex"]
    atomic_write_text(written[0], "".join(parts))
    atomic_write_text(written[1], table.to_csv(index=False, float_format="%.4f"))
    atomic_write_text(written[2], to_latex(table.drop(columns=["source"]), ["table", "backbone", "method", "metric"]))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sapo-report", description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=Path("results/reference/published_results.csv"))
    parser.add_argument("--out", type=Path, default=Path("results/tables"))
    args = parser.parse_args(argv)
    for path in write_published(args.reference, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
