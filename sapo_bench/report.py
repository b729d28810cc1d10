"""sapo-report: paper-style tables and figures from the runs of experiments.

    sapo-report micro_main micro_ablation               # results/tables/<exp>.{md,csv,tex}, results/figures/
    sapo-report micro_smoke out_root=runs/x --out results/smoke   # the overrides the sweep was given
    sapo-report                                          # the published numbers only

An experiment's runs are found exactly as sapo-sweep finds them (the same grid, the same overrides),
so a table lists every run it should have: finished ones in the cells, failed or missing ones
named under it. Measured tables: rows backbone x method (at micro scale the baseline rows of
sapo_bench.baselines and the warm start come first); columns the seven test sets, the 1-hop,
multi-hop and overall averages (recomputed, unweighted); cells mean ± std over seeds with n; the
difference of each method's average to the baseline method (GRPO, i.e. Search-R1) on the same
backbone, paired by seed, with a 95% t-interval, and to the no-search row; collapsed runs flagged.
The published numbers (results/reference/) go to a separate table, published.{md,csv,tex}, never
into measured cells.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd

from sapo_bench.baselines import BASELINES, PRETRAINED_BASELINES
from sapo_bench.data import DATASETS, DISPLAY, MULTI_HOP, SINGLE_HOP
from sapo_bench.io import atomic_write_text
from sapo_bench.runtime import git_commit
from sapo_bench.sweep import Run, expand, split_args

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


# --- measured tables --------------------------------------------------------------------------

SUMMARY = list(AVERAGES)  # "1-hop", "multi-hop", "avg"
# Below this baseline average a relative difference says nothing (0.0005 -> 0.02 is "+3900%").
MIN_RELATIVE_BASE = 0.01
WARM_START = "warm start"
NO_SEARCH = "no_search"       # the baseline every policy row is compared with (Δ Avg vs no search)
MODEL_FREE = ("common_answer", "oracle")  # no model involved: one row per table, not per backbone
NO_BACKBONE = "—"
# A run whose policy has stopped producing valid actions: the invalid-action rate (search or answer
# tags missing) averaged over its last 3 training steps. The collapse detector looks for ratio
# drift (DESIGN §6); this catches the other way a run fails, an entropy runaway.
DEGENERATE_INVALID = 0.5


def training_steps(run_dir: str | Path) -> list[dict]:
    """The lines of a run's metrics.jsonl that are training steps (they carry the reward)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"train/reward_mean"' in line]


def degenerate_step(run_dir: str | Path) -> int | None:
    """The step from which a degenerate run's invalid-action rate stayed ≥ DEGENERATE_INVALID, else None."""
    rate = [(int(m["train/step"]), m.get("rollout/invalid_frac", 0.0)) for m in training_steps(run_dir)]
    if len(rate) < 3 or sum(r for _, r in rate[-3:]) / 3 < DEGENERATE_INVALID:
        return None
    onset = rate[-1][0]
    for step, r in reversed(rate):
        if r < DEGENERATE_INVALID:
            break
        onset = step
    return onset


def run_rows(runs: list[Run]) -> pd.DataFrame:
    """One row per run of the grid: what it is, its state, and its test EM/F1 per dataset."""
    rows = []
    for r in runs:
        state = r.state()
        row = {"backbone": r.cfg.model.name, "family": r.cfg.model.family, "size": str(r.cfg.model.size),
               "method": r.cfg.algo.name, "seed": int(r.cfg.seed), "state": state, "run_dir": str(r.run_dir),
               "error": r.error() if state == "failed" else None, "collapse_step": None, "degenerate_step": None,
               "result": None}
        if state == "done":
            result = json.loads((r.run_dir / "result.json").read_text())
            row.update(result=result, collapse_step=result["run"]["collapse_step"],
                       degenerate_step=degenerate_step(r.run_dir))
        rows.append(row)
    return pd.DataFrame(rows)


def scores(results: list[dict], metric: str, key: str = "test") -> pd.DataFrame:
    """Per-run scores: the seven datasets and the averages as columns."""
    wide = pd.DataFrame([{d: v[metric] for d, v in (res[key] or {}).items()} for res in results])
    return with_averages(wide)


def paired_difference(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of per-seed differences and its 95% t-interval (NaN bounds with fewer than 2 pairs)."""
    from scipy import stats

    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = pd.Series(diffs).std(ddof=1)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _single_row(backbone: str, method: str, kind: str, per_dataset: dict, metric: str) -> dict:
    """A row measured once (a baseline, the warm start): means, no stds."""
    w = with_averages(pd.DataFrame([{d: v[metric] for d, v in per_dataset.items()}])).iloc[0]
    return {"backbone": backbone, "method": method, "kind": kind, "n": 1, "n_runs": 1,
            **{f"{c}_mean": w[c] for c in w.index}, **{f"{c}_std": math.nan for c in w.index}}


def measured_table(runs: pd.DataFrame, baseline: str = "grpo", metric: str = "em") -> pd.DataFrame:
    """Rows in grid order: per backbone its baseline rows, the warm-start row and the trained rows,
    where runs report them; model-free baselines once, first, under backbone NO_BACKBONE."""
    out, top = [], []
    done = runs[runs.state == "done"]
    for backbone in dict.fromkeys(runs.backbone):
        mine = done[done.backbone == backbone]
        # Runs of one backbone share their warm start, so the first that reports baselines speaks for all.
        reported = [res["baselines"] for res in mine.result if res.get("baselines")]
        no_search_avg = math.nan
        for name, label in {**PRETRAINED_BASELINES, **BASELINES}.items():
            if not reported or not reported[0].get(name):
                continue
            if name in MODEL_FREE:
                if not any(r["method"] == label for r in top):
                    top.append(_single_row(NO_BACKBONE, label, "baseline", reported[0][name], metric))
                continue
            out.append(_single_row(backbone, label, "baseline", reported[0][name], metric))
            if name == NO_SEARCH:
                no_search_avg = out[-1]["avg_mean"]
        warm = [res["warmstart"] for res in mine.result if res.get("warmstart")]
        warm_avg = math.nan
        if warm:
            out.append(_single_row(backbone, WARM_START, "warmstart", warm[0], metric))
            warm_avg = out[-1]["avg_mean"]
            if not pd.isna(no_search_avg) and not pd.isna(warm_avg):
                out[-1]["delta_ns"] = warm_avg - no_search_avg
        base = mine[mine.method == baseline]
        base_avg = dict(zip(base.seed, scores(list(base.result), metric).avg)) if len(base) else {}
        for method in dict.fromkeys(runs[runs.backbone == backbone].method):
            sub = mine[mine.method == method]
            row = {"backbone": backbone, "method": method, "kind": "trained", "n": len(sub),
                   "n_runs": int(((runs.backbone == backbone) & (runs.method == method)).sum())}
            if len(sub):
                sc = scores(list(sub.result), metric)
                row.update({f"{c}_mean": sc[c].mean() for c in sc.columns})
                row.update({f"{c}_std": sc[c].std(ddof=1) if len(sc) > 1 else math.nan for c in sc.columns})
                collapsed = sub[sub.collapse_step.notna()]
                row["collapsed"] = len(collapsed)
                row["collapse_steps"] = ",".join(str(int(s)) for s in collapsed.collapse_step)
                degenerate = sub[sub.degenerate_step.notna()]
                row["degenerate"] = len(degenerate)
                row["degenerate_steps"] = ",".join(str(int(s)) for s in degenerate.degenerate_step)
                pairs = [(a, base_avg[s]) for s, a in zip(sub.seed, sc.avg) if s in base_avg]
                if method != baseline and pairs:
                    d, lo, hi = paired_difference([a - b for a, b in pairs])
                    b_mean = sum(b for _, b in pairs) / len(pairs)
                    row.update(delta=d, delta_lo=lo, delta_hi=hi, n_pairs=len(pairs),
                               delta_rel=d / b_mean if b_mean >= MIN_RELATIVE_BASE else math.nan)
                # The no-search row and the warm start are one number each, which every seed of the
                # backbone starts from (or is scored beside): each seed is paired with it, and the
                # interval is a one-sample one.
                for prefix, ref in (("delta_ns", no_search_avg), ("delta_ws", warm_avg)):
                    above = [a - ref for a in sc.avg if not pd.isna(a)]
                    if not pd.isna(ref) and above:
                        d, lo, hi = paired_difference(above)
                        row.update({prefix: d, f"{prefix}_lo": lo, f"{prefix}_hi": hi})
            out.append(row)
    table = pd.DataFrame(top + out)
    last = [c for p in ("delta_ns", "delta_ws") for c in (p, f"{p}_lo", f"{p}_hi") if c in table]
    return table[[c for c in table.columns if c not in last] + last]


def _kind(r) -> str:
    """A row's kind; tables made before the kind column tell the warm start by its name."""
    kind = r.get("kind")
    return kind if isinstance(kind, str) else "warmstart" if r.method == WARM_START else "trained"


def warm_start_verdicts(table: pd.DataFrame) -> list[str]:
    """One line per backbone with a warm-start row: the trained rows whose 95% interval of Δ Avg vs
    warm start lies above 0 (RL improved on its starting point), and those that fell below it."""
    lines = []
    if "delta_ws" not in table:
        return lines
    for backbone in dict.fromkeys(table.backbone):
        trained = table[(table.backbone == backbone) & (table.kind == "trained") & table.delta_ws.notna()]
        if trained.empty:
            continue
        up = [r.method for r in trained.itertuples() if r.delta_ws > 0 and r.delta_ws_lo > 0]
        down = [r.method for r in trained.itertuples() if r.delta_ws < 0 and r.delta_ws_hi < 0]
        same = [r.method for r in trained.itertuples() if r.method not in up + down]
        parts = [f"{', '.join(m)} {verb}" for m, verb in ((up, "above"), (down, "below"), (same, "not told apart from"))
                 if m]
        lines.append(f"{backbone}: {'; '.join(parts)} the warm start (95% interval of Δ Avg vs warm start).")
    return lines


def no_search_verdicts(table: pd.DataFrame) -> list[str]:
    """One line per backbone with a no-search row: which trained rows do not clearly beat it
    (Δ Avg vs no search ≤ 0, or a 95% interval that does not exclude 0), or that every one does."""
    lines = []
    if "delta_ns" not in table or "kind" not in table:
        return lines
    label = BASELINES[NO_SEARCH]
    for backbone in dict.fromkeys(table.backbone):
        mine = table[table.backbone == backbone]
        trained = mine[(mine.kind == "trained") & mine.delta_ns.notna()]
        if not ((mine.kind == "baseline") & (mine.method == label)).any() or trained.empty:
            continue
        weak = [r.method for r in trained.itertuples() if not (r.delta_ns > 0 and r.delta_ns_lo > 0)]
        if weak:
            lines.append(f"{backbone}: {', '.join(weak)} {'does' if len(weak) == 1 else 'do'} not clearly beat "
                         "no search (Δ Avg vs no search ≤ 0, or its 95% interval does not exclude 0).")
        else:
            lines.append(f"{backbone}: every trained row beats no search (its 95% interval of Δ Avg vs no search "
                         "lies above 0).")
    return lines


def _cell(mean, std, tex: bool = False) -> str:
    if pd.isna(mean):
        return "–"
    pm = r" $\pm$ " if tex else " ± "
    return f"{mean:.3f}" if pd.isna(std) else f"{mean:.3f}{pm}{std:.3f}"


def _signed(v, fmt="{:+.3f}") -> str:
    return "" if v is None or pd.isna(v) else fmt.format(v)


def display_rows(table: pd.DataFrame, baseline: str, tex: bool = False) -> tuple[list[str], list[list[str]]]:
    cols = list(DATASETS) + SUMMARY
    names = {**DISPLAY, "1-hop": "1-hop", "multi-hop": "Multi-hop", "avg": "Avg"}
    header = ["Backbone", "Method", "n"] + [names[c] for c in cols]
    header += [f"Δ Avg vs {baseline}", "Δ %", "95% CI", "Δ Avg vs no search", "Δ Avg vs warm start", "collapsed",
               "degenerate"]
    rows = []
    for _, r in table.iterrows():
        trained = _kind(r) == "trained"
        method = r.method + ("†" if r.get("collapsed", 0) > 0 else "") + ("‡" if r.get("degenerate", 0) > 0 else "")
        n = "1" if not trained else f"{r.n}/{r.n_runs}" if r.n < r.n_runs else str(r.n)
        cells = [_cell(r.get(f"{c}_mean"), r.get(f"{c}_std"), tex) for c in cols]
        ci = "" if pd.isna(r.get("delta_lo", math.nan)) else f"[{r.delta_lo:+.3f}, {r.delta_hi:+.3f}]"
        rel = _signed(r.get("delta_rel"), "{:+.0%}").replace("%", r"\%" if tex else "%")
        vs_none, vs_warm = (_signed(r.get(p)) + ("" if pd.isna(r.get(f"{p}_lo", math.nan))
                                                 else f" [{r[f'{p}_lo']:+.3f}, {r[f'{p}_hi']:+.3f}]")
                            for p in ("delta_ns", "delta_ws"))
        collapsed = "" if not trained or r.n == 0 else (
            f"{int(r.collapsed)}/{r.n}" + (f" (step {r.collapse_steps})" if r.collapsed else ""))
        degenerate = "" if not trained or r.n == 0 else (
            f"{int(r.degenerate)}/{r.n}" + (f" (from step {r.degenerate_steps})" if r.degenerate else ""))
        rows.append([r.backbone, method, n] + cells
                    + [_signed(r.get("delta")), rel, ci, vs_none, vs_warm, collapsed, degenerate])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _tex_text(s: str) -> str:
    return _tex(s).replace("Δ", r"$\Delta$").replace("†", r"$^\dagger$").replace("‡", r"$^\ddagger$").replace("—", "---").replace("–", "--").replace("±", r"$\pm$")


def latex_table(header: list[str], rows: list[list[str]], caption: str) -> str:
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\caption{" + _tex_text(caption) + "}",
             r"\begin{tabular}{ll" + "r" * (len(header) - 2) + "}", r"\toprule",
             " & ".join(_tex_text(h) for h in header) + r" \\", r"\midrule"]
    last = None
    for r in rows:
        if last is not None and r[0] != last:
            lines.append(r"\midrule")
        last = r[0]
        lines.append(" & ".join([_tex_text(r[0]), _tex_text(r[1])] + [c if "$" in c else _tex_text(c) for c in r[2:]])
                     + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def provenance(runs: pd.DataFrame, command: str) -> str:
    def short(commit: str) -> str:
        return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")

    done = runs[runs.state == "done"]
    commits = sorted({short(r["run"]["git_commit"]) for r in done.result})
    machines = sorted({r["run"]["machine"] for r in done.result})
    minutes = sum(r["run"]["wall_s"] for r in done.result) / 60
    return (f"Made by `{command}` on {time.strftime('%Y-%m-%d')}. Runs: {len(done)} of {len(runs)} finished "
            f"({minutes:.0f} run-minutes in all) at commit {', '.join(commits) or '–'} on {', '.join(machines) or '–'}; "
            f"report at commit {short(git_commit())}.\n")


def write_experiment(experiment: str, overrides: list[str], out: Path, command: str) -> list[Path]:
    grid_runs = expand([experiment], overrides)
    runs, cfg = run_rows(grid_runs), grid_runs[0].cfg
    if not (runs.state == "done").any():  # a table of nothing would replace the one already there
        states = ", ".join(f"{n} {s}" for s, n in runs.state.value_counts().items())
        raise SystemExit(f"sapo-report {experiment}: no finished run ({states}): nothing written; "
                         f"`sapo-sweep {experiment}` runs them, `sapo-sweep {experiment} --list` says why not")
    baseline, title = cfg.report.baseline, cfg.report.title or experiment
    micro = cfg.data.kind == "micro"
    table = measured_table(runs, baseline, "em")
    header, rows = display_rows(table, baseline)
    scope = ("Columns are the **micro world's mirrors** of the seven benchmarks (generated questions over a "
             "fictional corpus, DESIGN §8), not the real datasets: compare methods within this table, never "
             "with the papers' numbers." if micro else "Columns are the real test sets (FlashRAG).")
    parts = [f"# {title} ({experiment})\n\n", provenance(runs, command), "\n", scope, "\n\n",
             f"Test EM, mean ± std over n seeds. Δ: each method's average minus {baseline}'s on the same backbone, "
             "paired by seed, with a 95% t-interval; Δ % is relative to the baseline (blank when the baseline is below "
             f"{MIN_RELATIVE_BASE}). † marks rows with a collapsed "
             "run (the collapse detector's ratio drift, DESIGN §6), ‡ rows with a degenerate run (invalid actions in "
             f"≥ {DEGENERATE_INVALID:.0%} of episodes over its last 3 steps; the step it began): their cells include "
             "them. "
             + (f"`{WARM_START}` is the supervised starting point every run of that backbone begins from; the seeds "
                "of a backbone share it, so the ± spread is RL's alone, not the warm start's (README, Results). "
                f"Baseline rows (n = 1, the warm start's questions, scored like every row): *{BASELINES['common_answer']}* "
                f"gives every question the train mix's most common gold answer; *{BASELINES['no_search']}* "
                f"and *{BASELINES['naive_rag']}* are the warm-started policy, greedy, made to answer at once or after "
                f"one search with the question as query; *{BASELINES['oracle']}* searches each question's gold chain by "
                "title and copies the gold answer only if every evidence string was retrieved (the ceiling). Rows "
                f"without a model are shown once, backbone {NO_BACKBONE}. Δ Avg vs no search is a row's average minus "
                "its backbone's no-search average, mean over seeds with a one-sample 95% t-interval; Δ Avg vs warm start "
                "likewise against the warm start every seed began from: what RL added.\n\n"
                if micro else "\n\n"),
             markdown_table(header, rows)]
    if any((table.method == label).any() for label in PRETRAINED_BASELINES.values()):
        parts.insert(-1, f"*{PRETRAINED_BASELINES['zero_shot']}* and *{PRETRAINED_BASELINES['zero_shot_rag']}* are the "
                         "pretrained model before any training (its chat template and the rollout's prompt; greedy, "
                         "free, or made to search the question once and then answer); `warm start` is its supervised "
                         "pass on the teacher's trajectories (the papers' SFT row, sapo_bench/realstart.py), from which "
                         "the RL rows start.\n\n")
    verdicts = no_search_verdicts(table) + warm_start_verdicts(table)
    if verdicts:
        parts.append("\n" + "".join(f"* {line}\n" for line in verdicts))
    missing = runs[runs.state != "done"]
    if len(missing):
        parts.append(f"\nNot in the cells ({len(missing)}):\n\n")
        for _, r in missing.iterrows():
            why = r.error if isinstance(r.error, str) else {"new": "not run yet", "partial": "interrupted (resumes when swept again)",
                              "conflict": "its folder holds another configuration's result"}.get(r.state, r.state)
            why = " ".join(str(why).split())  # one line, however the error was written
            parts.append(f"* {r.backbone} / {r.method} / seed {r.seed}: {why[:300]}\n")
    tables = out / "tables"
    written = [tables / f"{experiment}.md", tables / f"{experiment}.csv", tables / f"{experiment}.tex"]
    atomic_write_text(written[0], "".join(parts))
    full = pd.concat([(table if m == "em" else measured_table(runs, baseline, m)).assign(metric=m) for m in METRICS],
                     ignore_index=True)
    atomic_write_text(written[1], full.to_csv(index=False, float_format="%.4f"))
    caption = f"{title}. Test EM, mean ± std over seeds" + (" on the micro world's mirrors of the benchmarks"
                                                                  if micro else "")
    _, tex_rows = display_rows(table, baseline, tex=True)
    atomic_write_text(written[2], latex_table(header, tex_rows, caption))
    from sapo_bench.figures import experiment_figures

    # The figures compare what was trained; the baseline rows stay in the tables.
    written += experiment_figures(experiment, title, runs, table[table.kind != "baseline"], out / "figures")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sapo-report", description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="*", metavar="EXPERIMENT|OVERRIDE",
                        help="experiments to tabulate and the Hydra overrides their sweep was given")
    parser.add_argument("--reference", type=Path, default=Path("results/reference/published_results.csv"))
    parser.add_argument("--out", type=Path, default=Path("results"), help="writes <out>/tables and <out>/figures")
    parser.add_argument("--made-by", help="the command to name in the tables (default: this one)")
    a = parser.parse_intermixed_args(argv)
    command = a.made_by or "sapo-report " + " ".join(sys.argv[1:] if argv is None else argv)
    written = write_published(a.reference, a.out / "tables")
    if a.args:
        experiments, overrides = split_args(a.args)
        for exp in experiments:
            written += write_experiment(exp, overrides, a.out, command.strip())
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
