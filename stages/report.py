"""Run report: ``report.md`` with the run's config, the summary tables (methods side by side, best per column in
bold) and PNG plots, from the outputs of :mod:`stages.evaluate` and :mod:`stages.train`.

Plots (``<run>/plots/``, the folder replaced as a whole on every call):

* ``class_size_vs_train_count.png``  per-class set size vs training count (log x), one line per method;
* ``class_coverage.png``             per-class coverage, classes from head to tail, with the 1 - alpha line;
* ``lambda_evolution.png``           the multipliers lambda_k over epochs, one line per class, per method
                                     (from ``train/<method>/history.parquet``; skipped when there is none);
* ``coverage_vs_size.png``           mean coverage vs mean set size across the evaluated alphas.

The per-class and coverage-vs-size plots show one score (APS when evaluated, else the first) and the first
alpha; the tables show every (score, predictor, alpha). Matplotlib's object API (no pyplot): no display needed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from cact_ops.methods import order_key

from . import _io

# Columns of the tables: (summary column, header, lower is better?, format). None: not ranked.
_COLUMNS = (
    ("accuracy", "accuracy", False, "{:.3f}"),
    ("coverage_mean", "coverage", None, "{:.3f}"),
    ("size_mean", "size", True, "{:.2f}"),
    ("covgap_mean", "CovGap", True, "{:.2f}"),
    ("undercovered_mean", "under-covered", True, "{:.3f}"),
    ("sscv_mean", "SSCV", True, "{:.3f}"),
    ("many_size_mean", "many-shot size", True, "{:.2f}"),
    ("medium_size_mean", "medium-shot size", True, "{:.2f}"),
    ("few_size_mean", "few-shot size", True, "{:.2f}"),
)
_STD = {"coverage_mean": "coverage_std", "size_mean": "size_std", "covgap_mean": "covgap_std"}
PLOTS = ("class_size_vs_train_count.png", "class_coverage.png", "lambda_evolution.png", "coverage_vs_size.png")


def _method_order(methods) -> list[str]:
    return sorted(set(methods), key=order_key)


def _colors(methods: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _fmt(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def markdown_table(df: pl.DataFrame) -> str:
    """One (score, predictor, alpha) block as a Markdown table: a row per method, the best per column in bold.

    >>> df = pl.DataFrame({"method": ["ce", "cact"], "accuracy": [0.8, 0.7], "coverage_mean": [0.9, 0.91],
    ...     "coverage_std": [0.01, 0.01], "size_mean": [3.0, 2.0], "size_std": [0.1, 0.1]})
    >>> print(markdown_table(df))
    | method | accuracy | coverage | size |
    |---|---:|---:|---:|
    | ce | **0.800** | 0.900 ± 0.010 | 3.00 ± 0.10 |
    | cact | 0.700 | 0.910 ± 0.010 | **2.00** ± 0.10 |
    """
    cols = [c for c in _COLUMNS if c[0] in df.columns]
    best = {}  # on the values as displayed: equal-looking cells are marked alike
    for name, _, lower, fmt in cols:
        values = [float(fmt.format(v)) for v in df[name].to_list() if v is not None and not math.isnan(v)]
        if lower is not None and len(values) > 1:
            best[name] = min(values) if lower else max(values)
    lines = ["| method | " + " | ".join(h for _, h, _, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for row in df.iter_rows(named=True):
        cells = []
        for name, _, _, fmt in cols:
            cell = _fmt(row[name], fmt)
            if name in best and cell != "–" and float(cell) == best[name]:
                cell = f"**{cell}**"
            std = _STD.get(name)
            if std in row and row[std] is not None and not math.isnan(row[std]):
                cell += " ± " + fmt.format(row[std])
            cells.append(cell)
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compact_json(obj, indent: int = 0) -> str:
    """JSON with one line per object key and lists kept on one line (a config reads better that way).

    >>> print(compact_json({"b": {"alphas": [0.1, 0.05]}, "a": 1}))
    {
      "a": 1,
      "b": {
        "alphas": [0.1, 0.05]
      }
    }
    """
    if not isinstance(obj, dict) or not obj:
        return json.dumps(obj)
    pad = "  " * (indent + 1)
    items = [f"{pad}{json.dumps(str(k))}: {compact_json(v, indent + 1)}" for k, v in sorted(obj.items())]
    return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"


# ----------------------------------------------------------------------------------------------------------
# Plots


def _figure(ncols: int, width: float = 6.0, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


# Above this many classes, per-class lines become noise: the plots show group means of consecutive classes
# (ordered by training count) over the faint per-class values.
_MAX_LINES = 50
_GROUPS = 20


def _grouped(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means of x and y over ``_GROUPS`` groups of consecutive entries (NaN-aware)."""
    parts = [idx for idx in np.array_split(np.arange(len(x)), _GROUPS) if len(idx)]
    with np.errstate(invalid="ignore"):
        return (np.array([np.nanmean(x[i]) for i in parts]), np.array([np.nanmean(y[i]) for i in parts]))


def _draw_classes(ax, x: np.ndarray, y: np.ndarray, color, label: str, many: bool, lw: float) -> None:
    """One method's per-class values: a line, or with many classes faint dots under the group means."""
    if many:
        ax.scatter(x, y, s=3, color=color, alpha=0.15, linewidths=0)
        gx, gy = _grouped(x, y)
        ax.plot(gx, gy, marker="o", ms=4, lw=1.8, color=color, label=label)
    else:
        ax.plot(x, y, marker="o", ms=3, lw=lw, color=color, label=label)


def _per_class_panels(per_class: pl.DataFrame, score: str, alpha: float):
    """The rows of one score and alpha, its predictors (one panel each), whether to group classes, the figure."""
    df = per_class.filter((pl.col("score") == score) & (pl.col("alpha") == alpha))
    predictors = df["predictor"].unique(maintain_order=True).to_list()
    fig, axes = _figure(len(predictors))
    return df, predictors, df["class"].n_unique() > _MAX_LINES, fig, axes


def plot_class_size(per_class: pl.DataFrame, score: str, alpha: float, colors: dict, path: Path) -> Path:
    """Per-class mean set size vs training count (log x), one line per method, one panel per predictor."""
    df, predictors, many, fig, axes = _per_class_panels(per_class, score, alpha)
    for ax, pred in zip(axes, predictors):
        for m in colors:
            d = df.filter((pl.col("predictor") == pred) & (pl.col("method") == m)).sort("train_count", "class")
            if not d.height:
                continue
            _draw_classes(ax, d["train_count"].to_numpy().astype(float), d["size_mean"].to_numpy(), colors[m], m,
                          many, lw=1.2)
        ax.set_xscale("log")
        ax.set_xlabel("training images of the class (log scale)")
        ax.set_ylabel("mean prediction set size")
        ax.set_title(f"{pred} CP, {score.upper()}, alpha={alpha:g}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="method")
    note = f" (lines: means of {_GROUPS} groups of classes; dots: classes)" if many else ""
    fig.suptitle(f"Per-class set size vs training count, tail classes on the left{note}")
    fig.savefig(path, dpi=110)
    return path


def plot_class_coverage(per_class: pl.DataFrame, score: str, alpha: float, colors: dict, path: Path) -> Path:
    """Per-class coverage, classes ordered head -> tail, with the 1 - alpha target line."""
    df, predictors, many, fig, axes = _per_class_panels(per_class, score, alpha)
    for ax, pred in zip(axes, predictors):
        for m in colors:
            d = df.filter((pl.col("predictor") == pred) & (pl.col("method") == m))
            d = d.sort(["train_count", "class"], descending=[True, False])
            if not d.height:
                continue
            _draw_classes(ax, np.arange(d.height, dtype=float), d["coverage_mean"].to_numpy(), colors[m], m, many,
                          lw=1.0)
        ax.axhline(1 - alpha, color="black", ls="--", lw=1.2, label=f"1 - alpha = {1 - alpha:g}")
        ax.set_xlabel("class, ordered by training count (head -> tail)")
        ax.set_ylabel("coverage of the class (mean over splits)")
        ax.set_title(f"{pred} CP, {score.upper()}, alpha={alpha:g}")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower left")
    note = f" (lines: means of {_GROUPS} groups of classes; dots: classes)" if many else ""
    fig.suptitle(f"Per-class coverage{note}")
    fig.savefig(path, dpi=110)
    return path


def plot_lambda(histories: dict[str, pl.DataFrame], train_counts: Sequence[int], path: Path) -> Path | None:
    """lambda_k over epochs, one line per class coloured by its training count, one panel per method."""
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    usable = {m: h for m, h in histories.items() if {"epoch", "class", "lambda"} <= set(h.columns)
              and h["lambda"].drop_nulls().len()}
    # Methods without a dual step (ce, conftr) carry a constant lambda: show the methods whose multipliers move,
    # else the CaCT ones (whose multipliers then stayed put, which is worth seeing), else all.
    varying = {m: h for m, h in usable.items() if h["lambda"].drop_nulls().n_unique() > 1}
    usable = varying or {m: h for m, h in usable.items() if m.startswith("cact")} or usable
    if not usable:
        return None
    from matplotlib.figure import Figure

    ncols = min(len(usable), 3)
    nrows = -(-len(usable) // ncols)
    fig = Figure(figsize=(5.0 * ncols, 4.2 * nrows), layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in grid[len(usable):]:
        ax.set_visible(False)
    axes = grid[: len(usable)]
    counts = np.maximum(np.asarray(train_counts, dtype=float), 1)
    norm = LogNorm(vmin=counts.min(), vmax=max(counts.max(), counts.min() * 1.01))
    cmap = colormaps["viridis"]
    for ax, (m, h) in zip(axes, usable.items()):
        h = h.drop_nulls("lambda").sort("class", "epoch")
        segs, cols = [], []
        for (k,), d in h.group_by("class", maintain_order=True):
            segs.append(np.column_stack([d["epoch"].to_numpy(), d["lambda"].to_numpy()]))
            cols.append(cmap(norm(counts[k] if k < len(counts) else counts.min())))
        ax.add_collection(LineCollection(segs, colors=cols, linewidths=1.0))
        lam = h["lambda"].to_numpy()
        ax.set_xlim(h["epoch"].min(), max(h["epoch"].max(), h["epoch"].min() + 1))
        if (lam > 0).all():
            ax.set_yscale("log")
            ax.set_ylim(lam.min() / 1.5, lam.max() * 1.5)
        else:
            pad = 0.05 * (lam.max() - lam.min() or 1.0)
            ax.set_ylim(lam.min() - pad, lam.max() + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("multiplier lambda_k")
        ax.set_title(m)
        if h["lambda"].n_unique() == 1:
            ax.text(0.5, 0.6, f"constant: lambda = {lam[0]:g}\nfor every class and epoch", transform=ax.transAxes,
                    ha="center", fontsize=10, bbox={"facecolor": "white", "alpha": 0.8})
        ax.grid(True, which="both", alpha=0.3)
    from matplotlib.cm import ScalarMappable

    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(grid), label="training images of the class")
    fig.suptitle("Class multipliers lambda_k over epochs (one line per class)")
    fig.savefig(path, dpi=110)
    return path


def plot_coverage_vs_size(summary: pl.DataFrame, score: str, colors: dict, path: Path) -> Path:
    """Mean coverage vs mean set size across alphas: colour = method, marker = alpha, one panel per predictor."""
    from matplotlib.lines import Line2D

    df = summary.filter(pl.col("score") == score)
    predictors = df["predictor"].unique(maintain_order=True).to_list()
    alphas = sorted(df["alpha"].unique().to_list())
    markers = dict(zip(alphas, "osD^vP*X" * 4))
    fig, axes = _figure(len(predictors))
    for ax, pred in zip(axes, predictors):
        for m in colors:
            d = df.filter((pl.col("predictor") == pred) & (pl.col("method") == m)).sort("alpha")
            if not d.height:
                continue
            x, y = d["size_mean"].to_numpy(), d["coverage_mean"].to_numpy()
            ax.plot(x, y, color=colors[m], lw=1.2)
            for xi, yi, a in zip(x, y, d["alpha"].to_list()):
                ax.plot([xi], [yi], marker=markers[a], color=colors[m], ms=7, ls="none")
        for a in alphas:
            ax.axhline(1 - a, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("mean prediction set size")
        ax.set_ylabel("coverage (mean over splits)")
        ax.set_title(f"{pred} CP, {score.upper()} (dotted: 1 - alpha)")
        ax.grid(True, alpha=0.3)
        handles = [Line2D([], [], color=colors[m], lw=2, label=m) for m in colors]
        handles += [Line2D([], [], color="black", marker=markers[a], ls="none", label=f"alpha={a:g}")
                    for a in alphas]
        ax.legend(handles=handles, loc="lower right", fontsize=8)
    fig.suptitle("Coverage vs set size across alphas")
    fig.savefig(path, dpi=110)
    return path


# ----------------------------------------------------------------------------------------------------------
# The report


def _read_histories(run_dir: Path, methods: Sequence[str]) -> dict[str, pl.DataFrame]:
    out = {}
    for m in methods:
        p = run_dir / "train" / m / "history.parquet"
        if p.is_file():
            out[m] = pl.read_parquet(p)
    return out


def _train_counts(per_class: pl.DataFrame) -> list[int]:
    d = per_class.select("class", "train_count").unique().sort("class")
    return d["train_count"].to_list()


def write_report(run_dir: str | Path, summary: pl.DataFrame | None = None, per_class: pl.DataFrame | None = None,
                 eval_config: dict | None = None, score: str | None = None, alpha: float | None = None) -> Path:
    """Write ``<run>/report.md`` and ``<run>/plots/*.png``; missing inputs are read from ``<run>/eval/``.

    ``score``/``alpha`` pick what the per-class plots show (default: APS if evaluated, else the first score;
    the first alpha).

    >>> write_report("runs/digits")   # doctest: +SKIP
    PosixPath('runs/digits/report.md')
    """
    run_dir = Path(run_dir)
    summary = pl.read_parquet(run_dir / "eval" / "summary.parquet") if summary is None else summary
    per_class = pl.read_parquet(run_dir / "eval" / "per_class.parquet") if per_class is None else per_class
    if eval_config is None and (run_dir / "eval" / "manifest.json").is_file():
        eval_config = json.loads((run_dir / "eval" / "manifest.json").read_text()).get("config")
    methods = _method_order(summary["method"].to_list())
    scores = summary["score"].unique(maintain_order=True).to_list()
    alphas = summary["alpha"].unique(maintain_order=True).to_list()
    score = score or ("aps" if "aps" in scores else scores[0])
    alpha = alphas[0] if alpha is None else float(alpha)
    colors = _colors(methods)
    histories = _read_histories(run_dir, methods)

    with _io.atomic_path(run_dir / "plots") as tmp:
        tmp.mkdir()
        made = [plot_class_size(per_class, score, alpha, colors, tmp / PLOTS[0]),
                plot_class_coverage(per_class, score, alpha, colors, tmp / PLOTS[1]),
                plot_lambda(histories, _train_counts(per_class), tmp / PLOTS[2]),
                plot_coverage_vs_size(summary, score, colors, tmp / PLOTS[3])]
    plots = [p.name for p in made if p is not None]

    lines = [f"# Report: {run_dir.name}", "",
             f"Run folder `{run_dir.resolve()}`. Hard split conformal prediction on the pool: "
             f"{int(summary['n_splits'][0])} random stratified calibration/test splits; every number is a mean "
             "over splits (± its standard deviation across splits). Class Adaptive Conformal Training: Marani et "
             "al., arXiv 2601.09522.", ""]
    lines += ["## Configuration", ""]
    config_path = run_dir / "config.json"
    if config_path.is_file():
        lines += ["Pipeline (`config.json`):", "", "```json", compact_json(json.loads(config_path.read_text())),
                  "```", ""]
    else:
        lines += ["No `config.json` in the run folder.", ""]
    if eval_config:
        lines += ["Evaluation (`eval/manifest.json`):", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(eval_config.items())]
        lines.append("")
    inf = summary.filter(pl.col("inf_threshold_frac") > 0)
    if inf.height:
        lines += ["## Warnings", ""]
        for r in inf.select("score", "predictor", "alpha", "inf_threshold_frac").unique(maintain_order=True) \
                .iter_rows(named=True):
            what = ("the threshold is +inf" if r["predictor"] == "standard"
                    else f"{r['inf_threshold_frac']:.0%} of the class thresholds are +inf")
            lines.append(f"- pool too small for alpha={r['alpha']:g} ({r['score']}, {r['predictor']}): {what}; "
                         "those sets are full (size K) and cover trivially.")
        lines.append("")
    lines += ["## Summary", "",
              "Best per column in **bold** (highest accuracy; lowest size, CovGap, under-covered class ratio, "
              "SSCV and shot-group sizes). Coverage is not ranked: split CP guarantees at least 1 - alpha "
              "(class-wise CP: per class), and higher is not better. CovGap is in percent.", ""]
    for a in alphas:
        lines += [f"### alpha = {a:g} (target coverage {1 - a:g})", ""]
        for s in scores:
            for p in summary["predictor"].unique(maintain_order=True).to_list():
                block = summary.filter((pl.col("alpha") == a) & (pl.col("score") == s) & (pl.col("predictor") == p))
                if not block.height:
                    continue
                block = block.with_columns(pl.col("method").replace_strict(
                    {m: i for i, m in enumerate(methods)}, return_dtype=pl.Int64).alias("_o")).sort("_o")
                lines += [f"#### {s.upper()}, {p} CP", "", markdown_table(block), ""]
    lines += ["## Plots", "",
              f"Per-class plots: {score.upper()} score, alpha = {alpha:g}.", ""]
    titles = {PLOTS[0]: "Per-class set size vs training count", PLOTS[1]: "Per-class coverage",
              PLOTS[2]: "Multiplier (lambda) evolution per class", PLOTS[3]: "Coverage vs size across alphas"}
    for name in PLOTS:
        if name in plots:
            lines += [f"### {titles[name]}", "", f"![{titles[name]}](plots/{name})", ""]
        elif name == PLOTS[2]:
            lines += [f"### {titles[name]}", "", "No training history with multipliers in this run "
                      "(`train/<method>/history.parquet`).", ""]
    return _io.write_text("\n".join(lines), run_dir / "report.md")
