"""Run report: ``report.md`` with the run's config, the summary tables (methods side by side, the best of a column
in bold only when it beats the runner-up significantly over the splits), the paired differences against the
control (:func:`cact_ops.methods.control`), notes on multipliers that stayed at their floor, and PNG plots, from
the outputs of :mod:`stages.evaluate` and :mod:`stages.train`. Methods appear in registry order everywhere.

Plots (``<run>/plots/``; each call replaces these files, each atomically, and leaves any other file there alone):

* ``class_size_vs_train_count.png``  per-class set size vs training count (log x), one line per method;
* ``class_coverage.png``             per-class coverage, classes from head to tail, with the 1 - alpha line;
* ``lambda_evolution.png``           the multipliers lambda_k over epochs, one line per class, per method
                                     (from ``train/<method>/history.parquet``; skipped when there is none);
* ``coverage_vs_size.png``           mean coverage vs mean set size across the evaluated alphas.

The per-class and coverage-vs-size plots show one score (APS when evaluated, else the first) and the first
alpha; the summary tables show every (score, predictor, alpha), the paired tables that score and every alpha.
Methods differ in colour, marker and line style, so overlapping lines stay apart. Matplotlib's object API (no
pyplot): no display needed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from cact_ops import methods as registry
from cact_ops.methods import order_key
from cact_ops.metrics import METRIC_REGISTRY, paired_difference, paired_metrics

from . import _io

# The table columns come from the metric registry (cact_ops.metrics.METRIC_REGISTRY), read at call time: a
# registered metric is a column here too.


def _columns() -> list[tuple[str, str, bool | None, str]]:
    """Columns of the summary tables: (summary column, header, lower is better? (None: not ranked), format)."""
    return [(m.mean_column, m.header, m.lower_is_better, m.fmt) for m in METRIC_REGISTRY.values()]


def _std_columns() -> dict[str, str]:
    """Summary mean column -> its std column, for the metrics that have one."""
    return {m.mean_column: f"{m.name}_std" for m in METRIC_REGISTRY.values() if m.std}


def _paired() -> list[tuple[str, str, str]]:
    """Columns of the paired tables: (metric of eval/per_split.parquet, header, format of a signed difference);
    the lower-is-better metrics first, then the unranked ones, then the higher-is-better ones."""
    side, order = {True: 0, None: 1, False: 2}, list(METRIC_REGISTRY)
    metrics = sorted((METRIC_REGISTRY[n] for n in paired_metrics()),
                     key=lambda m: (side[m.lower_is_better], order.index(m.name)))
    return [(m.name, m.header, m.diff_fmt) for m in metrics]


# A multiplier at or below max(this, 10 x the run's lambda_min) in the last epoch counts as at its floor.
LAMBDA_FLOOR = 1e-3
_MARKERS = "osD^vP*X"
_LINESTYLES = ("-", "--", "-.", ":")
PLOTS = ("class_size_vs_train_count.png", "class_coverage.png", "lambda_evolution.png", "coverage_vs_size.png")


def _method_order(methods) -> list[str]:
    return sorted(set(methods), key=order_key)


def _colors(methods: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _styles(colors: dict) -> dict[str, dict]:
    """Matplotlib line keywords per method: its colour, and a marker and line style by its position."""
    return {m: {"color": c, "marker": _MARKERS[i % len(_MARKERS)], "ls": _LINESTYLES[i % len(_LINESTYLES)]}
            for i, (m, c) in enumerate(colors.items())}


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value, fmt: str) -> str:
    return "–" if _missing(value) else fmt.format(value)


def _excludes_zero(lo, hi) -> bool:
    return not (_missing(lo) or _missing(hi)) and (lo > 0 or hi < 0)


def significant_best(df: pl.DataFrame, per_split: pl.DataFrame, column: str, lower: bool) -> str | None:
    """The method with the best mean in ``column`` of one (score, predictor, alpha) block, if the paired 95%
    interval of (best - runner-up) over the splits of ``per_split`` (the same block) excludes zero; else None."""
    ranked = sorted(((v, m) for m, v in zip(df["method"].to_list(), df[column].to_list()) if not _missing(v)),
                    key=lambda vm: vm[0] if lower else -vm[0])
    metric = column.removesuffix("_mean")
    if len(ranked) < 2 or metric not in per_split.columns:
        return None
    best, second = (per_split.filter(pl.col("method") == m).sort("split") for _, m in ranked[:2])
    if best.height < 2 or not best["split"].equals(second["split"]):
        return None
    _, lo, hi = paired_difference(best[metric].to_numpy(), second[metric].to_numpy())
    return ranked[0][1] if _excludes_zero(lo, hi) else None


def markdown_table(df: pl.DataFrame, per_split: pl.DataFrame | None = None) -> str:
    """One (score, predictor, alpha) block as a Markdown table, a row per method. The best value of a ranked
    column is in bold only where it beats the runner-up significantly (:func:`significant_best` on
    ``per_split``, the per-split rows of the same block); without ``per_split`` nothing is bold.

    >>> df = pl.DataFrame({"method": ["ce", "cact"], "accuracy": [0.8, 0.7], "coverage_mean": [0.9, 0.91],
    ...     "coverage_std": [0.01, 0.01], "size_mean": [3.0, 2.0], "size_std": [0.1, 0.1]})
    >>> splits = pl.DataFrame({"method": ["ce"] * 3 + ["cact"] * 3, "split": [0, 1, 2] * 2,
    ...     "accuracy": [0.7, 0.9, 0.8, 0.8, 0.6, 0.7], "size": [2.9, 3.0, 3.1, 2.0, 2.1, 1.9]})
    >>> print(markdown_table(df, splits))
    | method | accuracy | coverage | size |
    |---|---:|---:|---:|
    | ce | 0.800 | 0.900 ± 0.010 | 3.00 ± 0.10 |
    | cact | 0.700 | 0.910 ± 0.010 | **2.00** ± 0.10 |
    """
    cols = [c for c in _columns() if c[0] in df.columns]
    stds = _std_columns()
    bold = {}
    if per_split is not None:
        for name, _, lower, _ in cols:
            if lower is not None and (m := significant_best(df, per_split, name, lower)) is not None:
                bold[name] = m
    lines = ["| method | " + " | ".join(h for _, h, _, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for row in df.iter_rows(named=True):
        cells = []
        for name, _, _, fmt in cols:
            cell = _fmt(row[name], fmt)
            if bold.get(name) == row["method"]:
                cell = f"**{cell}**"
            std = stds.get(name)
            if std in row and not _missing(row[std]):
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


def _draw_classes(ax, x: np.ndarray, y: np.ndarray, style: dict, label: str, many: bool, lw: float) -> None:
    """One method's per-class values: a line, or with many classes faint dots under the group means.

    Hollow markers of distinct shapes and distinct line styles keep methods with equal values visible."""
    kw = {**style, "mfc": "none", "label": label}
    if many:
        ax.scatter(x, y, s=3, color=style["color"], alpha=0.15, linewidths=0)
        gx, gy = _grouped(x, y)
        ax.plot(gx, gy, ms=5, lw=1.8, **kw)
    else:
        ax.plot(x, y, ms=5, lw=lw, **kw)


def _per_class_panels(per_class: pl.DataFrame, score: str, alpha: float):
    """The rows of one score and alpha, its predictors (one panel each), whether to group classes, the figure."""
    df = per_class.filter((pl.col("score") == score) & (pl.col("alpha") == alpha))
    predictors = df["predictor"].unique(maintain_order=True).to_list()
    fig, axes = _figure(len(predictors))
    return df, predictors, df["class"].n_unique() > _MAX_LINES, fig, axes


def plot_class_size(per_class: pl.DataFrame, score: str, alpha: float, colors: dict, path: Path) -> Path:
    """Per-class mean set size vs training count (log x), one line per method, one panel per predictor."""
    df, predictors, many, fig, axes = _per_class_panels(per_class, score, alpha)
    styles = _styles(colors)
    for ax, pred in zip(axes, predictors):
        for m in colors:
            d = df.filter((pl.col("predictor") == pred) & (pl.col("method") == m)).sort("train_count", "class")
            if not d.height:
                continue
            _draw_classes(ax, d["train_count"].to_numpy().astype(float), d["size_mean"].to_numpy(), styles[m], m,
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
    styles = _styles(colors)
    for ax, pred in zip(axes, predictors):
        for m in colors:
            d = df.filter((pl.col("predictor") == pred) & (pl.col("method") == m))
            d = d.sort(["train_count", "class"], descending=[True, False])
            if not d.height:
                continue
            _draw_classes(ax, np.arange(d.height, dtype=float), d["coverage_mean"].to_numpy(), styles[m], m, many,
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
    usable = varying or {m: h for m, h in usable.items()
                         if m in registry.names() and registry.get(m).uses_dual} or usable
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
    """Mean coverage vs mean set size across alphas: colour and line style = method, marker = alpha, one panel
    per predictor."""
    from matplotlib.lines import Line2D

    df = summary.filter(pl.col("score") == score)
    predictors = df["predictor"].unique(maintain_order=True).to_list()
    alphas = sorted(df["alpha"].unique().to_list())
    markers = dict(zip(alphas, _MARKERS * 4))
    styles = _styles(colors)
    fig, axes = _figure(len(predictors))
    for ax, pred in zip(axes, predictors):
        for m in colors:
            d = df.filter((pl.col("predictor") == pred) & (pl.col("method") == m)).sort("alpha")
            if not d.height:
                continue
            x, y = d["size_mean"].to_numpy(), d["coverage_mean"].to_numpy()
            ax.plot(x, y, color=colors[m], ls=styles[m]["ls"], lw=1.2)
            for xi, yi, a in zip(x, y, d["alpha"].to_list()):
                ax.plot([xi], [yi], marker=markers[a], color=colors[m], ms=7, ls="none")
        for a in alphas:
            ax.axhline(1 - a, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("mean prediction set size")
        ax.set_ylabel("coverage (mean over splits)")
        ax.set_title(f"{pred} CP, {score.upper()} (dotted: 1 - alpha)")
        ax.grid(True, alpha=0.3)
        handles = [Line2D([], [], color=colors[m], ls=styles[m]["ls"], lw=2, label=m) for m in colors]
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


def _lambda_min(run_dir: Path, method: str) -> float:
    """``loop.lambda_min`` of ``train/<method>/config.json``; 0 when it cannot be read."""
    try:
        return float(json.loads((run_dir / "train" / method / "config.json").read_text())["loop"]["lambda_min"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def lambda_floor_notes(run_dir: str | Path, histories: dict[str, pl.DataFrame]) -> list[str]:
    """A sentence per method with multipliers whose every lambda_k ended the last epoch at its floor
    (<= max(``LAMBDA_FLOOR``, 10 x the run's lambda_min)): such a run is CE fine-tuning, which the tables
    would otherwise leave the reader to discover."""
    notes = []
    for m, h in histories.items():
        if m not in registry.names() or not registry.get(m).uses_dual or not {"epoch", "lambda"} <= set(h.columns):
            continue
        h = h.drop_nulls(["epoch", "lambda"])
        if not h.height:
            continue
        last = int(h["epoch"].max())
        top = float(h.filter(pl.col("epoch") == last)["lambda"].max())
        floor = max(LAMBDA_FLOOR, 10.0 * _lambda_min(Path(run_dir), m))
        if top <= floor:
            notes.append(f"every multiplier of {m} stayed at its floor: the CE backbone already meets every class's "
                         f"size target on D_val, so {m} reduced to CE fine-tuning here; see eta / --eta-relative "
                         f"(last epoch {last}: largest lambda_k = {top:.3g} <= {floor:.3g}).")
    return notes


def paired_tables(summary: pl.DataFrame, score: str, methods: Sequence[str]) -> list[str]:
    """Markdown lines of the paired-differences section for one score: a table per alpha, a row per (predictor,
    method), cells ``mean [lo, hi]`` of (method - control) from the summary's ``<metric>_diff_*`` columns, in
    bold where the interval excludes zero."""
    control = registry.control()
    lines = [f"## Paired differences against {control}", ""]
    if "control" not in summary.columns:
        return lines + ["Not in this summary (it was evaluated before paired differences were computed); rerun "
                        "`python -m stages.evaluate` on the run folder.", ""]
    if control not in methods:
        return lines + [f"{control} was not evaluated in this run: there is no control to compare against.", ""]
    n = int(summary["n_splits"][0])
    cols = [c for c in _paired() if f"{c[0]}_diff_mean" in summary.columns]
    lines += [f"Each cell: the mean over the R = {n} calibration/test splits of (method − {control}), paired split "
              "by split (every method is evaluated on the same splits), and its 95% Student-t interval "
              "[lo, hi]; **bold**: the interval excludes zero. Negative is better for size and CovGap, positive for "
              f"accuracy; coverage is not ranked. {score.upper()} score. These intervals are over the R "
              "calibration/test splits of this one training seed: they do not include seed-to-seed variation.", ""]
    if n < 2:
        lines += ["With a single split the intervals are undefined (shown as –).", ""]
    predictors = summary["predictor"].unique(maintain_order=True).to_list()
    rank = {m: i for i, m in enumerate(methods)}
    for a in summary["alpha"].unique(maintain_order=True).to_list():
        block = summary.filter((pl.col("score") == score) & (pl.col("alpha") == a) & (pl.col("method") != control))
        if not block.height:
            continue
        rows = sorted(block.iter_rows(named=True), key=lambda r: (predictors.index(r["predictor"]), rank[r["method"]]))
        lines += [f"### alpha = {a:g}", "", "| predictor | method | " + " | ".join(h for _, h, _ in cols) + " |",
                  "|---|---|" + "---:|" * len(cols)]
        for r in rows:
            cells = []
            for metric, _, fmt in cols:
                mean, lo, hi = (r[f"{metric}_diff_{k}"] for k in ("mean", "lo", "hi"))
                cell = _fmt(mean, fmt) + (" [–]" if _missing(lo) else f" [{fmt.format(lo)}, {fmt.format(hi)}]")
                cells.append(f"**{cell}**" if _excludes_zero(lo, hi) else cell)
            lines.append(f"| {r['predictor']} | {r['method']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _matching_per_split(summary: pl.DataFrame, per_split: pl.DataFrame | None) -> pl.DataFrame | None:
    """``per_split`` if it holds ``n_splits`` splits of every (method, score, predictor, alpha) of the summary, else
    None (a file from another evaluation must not decide what is bold)."""
    if per_split is None or not {"method", "score", "predictor", "alpha", "split"} <= set(per_split.columns):
        return None
    keys = ["method", "score", "predictor", "alpha"]
    counts = per_split.group_by(keys).agg(pl.col("split").n_unique().alias("_n"))
    joined = summary.select(keys + ["n_splits"]).join(counts, on=keys, how="left")
    return per_split if joined.height and (joined["_n"] == joined["n_splits"]).all() else None


def _write_plots(folder: Path, makers: dict) -> list[str]:
    """Write each plot of ``makers`` (file name -> function writing it to a path, returning None when it has
    nothing to show) atomically into ``folder``; returns the names written. Only these files are touched: another
    file in ``folder`` is never replaced or deleted, and a plot of ours that has nothing to show this time is
    removed (an old one would describe another run)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in makers.items():
        with _io.atomic_path(folder / name) as tmp:
            made = make(tmp)
        if made is not None:
            written.append(name)
        else:
            (folder / name).unlink(missing_ok=True)
    return written


def write_report(run_dir: str | Path, summary: pl.DataFrame | None = None, per_class: pl.DataFrame | None = None,
                 per_split: pl.DataFrame | None = None, eval_config: dict | None = None, score: str | None = None,
                 alpha: float | None = None) -> Path:
    """Write ``<run>/report.md`` and ``<run>/plots/*.png``; missing inputs are read from ``<run>/eval/``.

    ``per_split`` (``eval/per_split.parquet``) decides what is bold; it is read from disk only together with the
    summary, and without it (older run folders, or a summary passed alone) nothing is bold. ``score``/``alpha``
    pick what the per-class plots and paired tables show (default: APS if evaluated, else the first score; the
    first alpha).

    >>> write_report("runs/digits")   # doctest: +SKIP
    PosixPath('runs/digits/report.md')
    """
    run_dir = Path(run_dir)
    if summary is None:
        summary = pl.read_parquet(run_dir / "eval" / "summary.parquet")
        if per_split is None and (run_dir / "eval" / "per_split.parquet").is_file():
            per_split = pl.read_parquet(run_dir / "eval" / "per_split.parquet")
    per_split = _matching_per_split(summary, per_split)
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

    makers = {PLOTS[0]: lambda path: plot_class_size(per_class, score, alpha, colors, path),
              PLOTS[1]: lambda path: plot_class_coverage(per_class, score, alpha, colors, path),
              PLOTS[2]: lambda path: plot_lambda(histories, _train_counts(per_class), path),
              PLOTS[3]: lambda path: plot_coverage_vs_size(summary, score, colors, path)}
    plots = _write_plots(run_dir / "plots", makers)

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
    notes = lambda_floor_notes(run_dir, histories)
    if notes:
        lines += ["## Multipliers at their floor", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Summary", "",
              "Ranked columns: highest accuracy; lowest size, CovGap, under-covered class ratio, SSCV and "
              "shot-group sizes. Coverage is not ranked: split CP guarantees at least 1 - alpha (class-wise CP: per "
              "class), and higher is not better. CovGap is in percent.", ""]
    for a in alphas:
        lines += [f"### alpha = {a:g} (target coverage {1 - a:g})", ""]
        for s in scores:
            for p in summary["predictor"].unique(maintain_order=True).to_list():
                block = summary.filter((pl.col("alpha") == a) & (pl.col("score") == s) & (pl.col("predictor") == p))
                if not block.height:
                    continue
                block = block.with_columns(pl.col("method").replace_strict(
                    {m: i for i, m in enumerate(methods)}, return_dtype=pl.Int64).alias("_o")).sort("_o")
                splits = None if per_split is None else per_split.filter(
                    (pl.col("alpha") == a) & (pl.col("score") == s) & (pl.col("predictor") == p))
                lines += [f"#### {s.upper()}, {p} CP", "", markdown_table(block, splits), ""]
    if per_split is None:
        lines += ["Nothing is in bold: there are no per-split results for this summary (`eval/per_split.parquet`: "
                  "the run was evaluated before they were written, or the report was not given them), so whether a "
                  "best value beats the runner-up cannot be tested. Rerun `python -m stages.evaluate` on the run "
                  "folder to get them.", ""]
    else:
        lines += ["**Bold**: the best value of a ranked column, only where the paired 95% Student-t interval of "
                  f"(best − runner-up) over the {int(summary['n_splits'][0])} calibration/test splits excludes zero; "
                  "a best value not in bold is not distinguishable from the runner-up on these splits.", ""]
    lines += paired_tables(summary, score, methods)
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
