"""Figures for sapo-report (matplotlib, written as PNG; no display needed).

* `<experiment>-dynamics.png`: the SAPO paper's Figure 1 per backbone: IS ratio, clip fraction,
  entropy and reward against the training step, one line per method (mean over seeds) with a band
  from the lowest to the highest seed.
* `<experiment>-datasets.png`: test EM per dataset and on average, bars per method (mean over
  seeds, ± std as error bars), one panel per backbone.
* `<experiment>-size.png`: average test EM against model size, one line per family and method;
  only for experiments with at least two sizes of a family.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from sapo_bench.data import DATASETS, DISPLAY  # noqa: E402

# (metric name in metrics.jsonl, panel title); the names are documented in docs/metrics.md. The
# ratio panels are the SAPO paper's Figure 1 signature, read where drift shows: the off-policy
# mini-batches' lower tail and its Definition 1 (a token mean of r stays near 1 as a run collapses).
DYNAMICS = [("off/is_ratio/p5", "IS ratio p5 (off-policy)"),
            ("off/isdd/frac_seq_prod_below_eps", "seqs with ∏r < 1e-3 (off-policy)"),
            ("loss/clip_frac", "clip fraction"), ("policy/entropy", "entropy"), ("train/reward_mean", "reward")]
STEP = "train/step"


def training_curves(run_dir: str | Path) -> pd.DataFrame:
    """One row per training step, the DYNAMICS metrics as columns."""
    from sapo_bench.report import training_steps

    df = pd.DataFrame(training_steps(run_dir))
    return df.reindex(columns=[STEP] + [m for m, _ in DYNAMICS]).drop_duplicates(STEP, keep="last")


def size_in_params(size: str) -> float:
    """'1m' -> 1e6, '1.5b' -> 1.5e9 (sizes as the model configs name them)."""
    m = re.fullmatch(r"([\d.]+)\s*([kmb])", str(size).strip().lower())
    if not m:
        return float("nan")
    return float(m.group(1)) * {"k": 1e3, "m": 1e6, "b": 1e9}[m.group(2)]


def _methods(runs: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(runs.method))


def _colors(methods: list[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}


def dynamics_figure(runs: pd.DataFrame, title: str, path: Path) -> Path | None:
    backbones = list(dict.fromkeys(runs.backbone))
    curves = {r.run_dir: training_curves(r.run_dir) for r in runs.itertuples()}
    if not any(len(c) for c in curves.values()):
        return None
    methods = _methods(runs)
    colors = _colors(methods)
    fig, axes = plt.subplots(len(backbones), len(DYNAMICS), figsize=(3.2 * len(DYNAMICS), 2.4 * len(backbones)),
                             squeeze=False, sharex=True)
    for i, backbone in enumerate(backbones):
        for method in methods:
            mine = runs[(runs.backbone == backbone) & (runs.method == method)]
            frames = [curves[d].assign(seed=s) for d, s in zip(mine.run_dir, mine.seed) if len(curves[d])]
            if not frames:
                continue
            df = pd.concat(frames)
            for j, (metric, _) in enumerate(DYNAMICS):
                g = df.groupby(STEP)[metric]
                mean, lo, hi = g.mean(), g.min(), g.max()
                ax = axes[i][j]
                ax.plot(mean.index, mean.values, color=colors[method], lw=1.4,
                        label=f"{method} (n={len(frames)})")
                if len(frames) > 1:
                    ax.fill_between(mean.index, lo.values, hi.values, color=colors[method], alpha=0.2, lw=0)
        for j, (_, name) in enumerate(DYNAMICS):
            axes[i][j].set_title(f"{backbone}: {name}" if j == 0 else name, fontsize=9)
            axes[i][j].grid(alpha=0.3)
        axes[i][0].legend(fontsize=7)
    for j in range(len(DYNAMICS)):
        axes[-1][j].set_xlabel("training step")
    fig.suptitle(f"{title}: training dynamics (line: mean over seeds; band: min to max)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def datasets_figure(table: pd.DataFrame, title: str, path: Path) -> Path | None:
    backbones = list(dict.fromkeys(table.backbone))
    if table.get("avg_mean") is None or table["avg_mean"].isna().all():
        return None
    cols = list(DATASETS) + ["avg"]
    methods = list(dict.fromkeys(table.method))
    colors = _colors(methods)
    fig, axes = plt.subplots(len(backbones), 1, figsize=(10, 2.6 * len(backbones)), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for i, backbone in enumerate(backbones):
        ax = axes[i][0]
        mine = table[table.backbone == backbone]
        for k, method in enumerate(methods):
            row = mine[mine.method == method]
            if row.empty or pd.isna(row.iloc[0].get("avg_mean")):
                continue
            r = row.iloc[0]
            xs = [c + (k - (len(methods) - 1) / 2) * width for c in range(len(cols))]
            means = [r[f"{c}_mean"] for c in cols]
            stds = [0.0 if pd.isna(r[f"{c}_std"]) else r[f"{c}_std"] for c in cols]
            ax.bar(xs, means, width, yerr=stds, color=colors[method], label=f"{method} (n={r.n})", capsize=2)
        ax.set_xticks(range(len(cols)), [DISPLAY.get(c, "Avg") for c in cols])
        ax.set_ylabel("test EM")
        tops = [mine[f"{c}_mean"].fillna(0) + mine[f"{c}_std"].fillna(0) for c in cols]
        ax.set_ylim(0, max(0.05, 1.15 * max(float(t.max()) for t in tops)))
        ax.set_title(backbone, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=len(methods))
    fig.suptitle(f"{title}: test EM per dataset (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def size_figure(runs: pd.DataFrame, table: pd.DataFrame, title: str, path: Path) -> Path | None:
    sizes = runs[["backbone", "family", "size"]].drop_duplicates()
    if not (sizes.groupby("family")["size"].nunique() >= 2).any():
        return None
    df = table.merge(sizes, on="backbone")
    df = df[df["avg_mean"].notna()].assign(params=lambda d: d["size"].map(size_in_params))
    if df.empty:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    colors = _colors(list(dict.fromkeys(df.method)))
    styles = dict(zip(dict.fromkeys(df.family), ["-", "--", ":", "-."]))
    for (family, method), g in df.groupby(["family", "method"], sort=False):
        g = g.sort_values("params")
        ax.errorbar(g.params, g.avg_mean, yerr=g.avg_std.fillna(0), color=colors[method], ls=styles[family],
                    marker="o", capsize=3, label=f"{family} · {method}")
    ax.set_xscale("log")
    ticks = sorted(df.drop_duplicates("size")[["params", "size"]].itertuples(index=False))
    ax.set_xticks([t.params for t in ticks], [t.size.upper() for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("parameters (model size)")
    ax.set_ylabel("average test EM")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{title}\nEM against model size (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Through a temporary file and a rename, like every other result file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)
    return path


def experiment_figures(experiment: str, title: str, runs: pd.DataFrame, table: pd.DataFrame,
                       out: Path) -> list[Path]:
    made = [dynamics_figure(runs, title, out / f"{experiment}-dynamics.png"),
            datasets_figure(table, title, out / f"{experiment}-datasets.png"),
            size_figure(runs, table, title, out / f"{experiment}-size.png")]
    return [p for p in made if p is not None]
