"""The run report's plots (:mod:`stages.report`), with matplotlib's object API (no pyplot: no display needed).

* ``class_size_vs_train_count.png``  per-class set size vs training count (log x), one line per method;
* ``class_coverage.png``             per-class coverage, classes from head to tail, with the 1 - alpha line;
* ``lambda_evolution.png``           the multipliers lambda_k over epochs, one line per class, per method;
* ``coverage_vs_size.png``           mean coverage vs mean set size, one curve per method across alphas.

Per-class values are means over the R calibration/test splits, with error bars of ± one standard deviation
across the splits when the per-split values are given (``spread``, from :mod:`stages.report_data`). Methods
differ in colour, hollow marker shape and line style, and the per-class points of the methods are shifted a
little apart along x, so that methods with equal values stay visible and their error bars do not hide each other.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from cact_ops import methods as registry

PLOTS = ("class_size_vs_train_count.png", "class_coverage.png", "lambda_evolution.png", "coverage_vs_size.png")
_MARKERS = "osD^vP*X"
_LINESTYLES = ("-", "--", "-.", ":")
# Above this many classes, per-class lines become noise: the plots show group means of consecutive classes
# (ordered by training count) over the faint per-class values.
_MAX_LINES = 50
_GROUPS = 20
# The per-class points of all methods together spread over this share of the spacing between neighbouring classes.
_SPREAD = 0.5
# An axis is logarithmic only when its positive values span at least this ratio (one decade).
_LOG_RATIO = 10.0


def _colors(methods: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _styles(colors: dict) -> dict[str, dict]:
    """Matplotlib line keywords per method: its colour, and a marker and line style by its position."""
    return {m: {"color": c, "marker": _MARKERS[i % len(_MARKERS)], "ls": _LINESTYLES[i % len(_LINESTYLES)]}
            for i, (m, c) in enumerate(colors.items())}


def _figure(ncols: int, nrows: int = 1, width: float = 6.0, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def log_scale(values) -> bool:
    """Whether values are best shown on a log axis: all positive and spanning at least a decade.

    >>> log_scale([1e-3, 0.5]), log_scale([0.2, 0.2]), log_scale([0.0, 5.0])
    (True, False, False)
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return bool(v.size and (v > 0).all() and v.max() / v.min() >= _LOG_RATIO)


# ----------------------------------------------------------------------------------------------------------
# Per-class plots


def _shifted(x: np.ndarray, i: int, n: int, log: bool) -> np.ndarray:
    """x of method ``i`` of ``n``: shifted by its place among the methods, a share of the spacing of x."""
    t = np.log10(x) if log else x
    steps = np.diff(np.unique(t[np.isfinite(t)]))
    step = float(np.median(steps)) if steps.size else 1.0
    t = t + _SPREAD * step * ((i - (n - 1) / 2) / max(n, 1))
    return 10 ** t if log else t


def _class_points(x: np.ndarray, mean: np.ndarray, per_split: np.ndarray | None, many: bool):
    """Points to draw for one method: (x, y, error bar or None), per class or, with ``many``, per group of
    consecutive classes (the error bar of a group: the sd across splits of the group's mean)."""
    if not many:
        err = per_split.std(axis=0, ddof=1) if per_split is not None and len(per_split) > 1 else None
        return x, mean, err
    parts = [idx for idx in np.array_split(np.arange(len(x)), _GROUPS) if len(idx)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a group of classes all NaN: a NaN point
        gx = np.array([np.nanmean(x[i]) for i in parts])
        gy = np.array([np.nanmean(mean[i]) for i in parts])
        err = None
        if per_split is not None and len(per_split) > 1:
            err = np.stack([np.nanmean(per_split[:, i], axis=1) for i in parts], axis=1).std(axis=0, ddof=1)
    return gx, gy, err


def _split_matrix(spread: pl.DataFrame | None, method: str, predictor: str, column: str,
                  classes: np.ndarray) -> np.ndarray | None:
    """[R, len(classes)]: ``column`` of ``spread`` per split for ``classes`` in that order; None without it."""
    if spread is None:
        return None
    d = spread.filter((pl.col("method") == method) & (pl.col("predictor") == predictor)).sort("split", "class")
    if not d.height:
        return None
    return d[column].to_numpy().reshape(d["split"].n_unique(), -1)[:, classes]


def _log_x(ax) -> None:
    """A log x axis labelled 1, 2, 5, 10, 20, ... in plain numbers (no crowded minor labels)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _plot_per_class(per_class: pl.DataFrame, score: str, alpha: float, colors: dict, path: Path,
                    spread: pl.DataFrame | None, column: str, by_count: bool) -> Path:
    """The per-class figure of ``column`` (``size`` or ``coverage``), one panel per predictor: vs the training
    count (log x, tail left) when ``by_count``, else vs the class's place from head to tail."""
    df = per_class.filter((pl.col("score") == score) & (pl.col("alpha") == alpha))
    predictors = df["predictor"].unique(maintain_order=True).to_list()
    many = df["class"].n_unique() > _MAX_LINES
    fig, axes = _figure(len(predictors))
    styles = _styles(colors)
    n = len(colors)
    bars = False
    for ax, pred in zip(axes, predictors):
        for i, m in enumerate(colors):
            d = df.filter((pl.col("predictor") == pred) & (pl.col("method") == m))
            d = d.sort("train_count", "class", descending=[not by_count, False])
            if not d.height:
                continue
            x = d["train_count"].to_numpy().astype(float) if by_count else np.arange(d.height, dtype=float)
            mean = d[f"{column}_mean"].to_numpy()
            splits = _split_matrix(spread, m, pred, column, d["class"].to_numpy())
            if many:
                ax.scatter(x, mean, s=3, color=colors[m], alpha=0.15, linewidths=0)
            px, py, err = _class_points(x, mean, splits, many)
            bars |= err is not None
            ax.errorbar(_shifted(px, i, n, by_count), py, yerr=err, ms=5, lw=1.8 if many else 1.1, capsize=2,
                        elinewidth=0.8, mfc="none", label=m, **styles[m])
        if by_count:
            _log_x(ax)
            ax.set_xlabel("training images of the class (log scale)")
            ax.set_ylabel("prediction set size of the class")
        else:
            ax.axhline(1 - alpha, color="black", ls="--", lw=1.2, label=f"1 - alpha = {1 - alpha:g}")
            ax.set_xlabel("class, ordered by training count (head -> tail)")
            ax.set_ylabel("coverage of the class")
        ax.set_title(f"{pred} CP, {score.upper()}, alpha={alpha:g}")
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), title="method", loc="outside right center", fontsize=8)
    what = "set size vs training count, tail classes on the left" if by_count else "coverage, head to tail"
    notes = ["mean over splits" + (" ± 1 sd across splits" if bars else "")]
    if many:
        notes.append(f"points: means of {_GROUPS} groups of classes; dots: classes")
    fig.suptitle(f"Per-class {what}\n({'; '.join(notes)})")
    fig.savefig(path, dpi=110)
    return path


def plot_class_size(per_class: pl.DataFrame, score: str, alpha: float, colors: dict, path: Path,
                    spread: pl.DataFrame | None = None) -> Path:
    """Per-class mean set size vs training count (log x), one line per method, one panel per predictor; error
    bars across splits from ``spread`` (per-split rows: method, predictor, split, class, size)."""
    return _plot_per_class(per_class, score, alpha, colors, path, spread, "size", by_count=True)


def plot_class_coverage(per_class: pl.DataFrame, score: str, alpha: float, colors: dict, path: Path,
                        spread: pl.DataFrame | None = None) -> Path:
    """Per-class coverage, classes ordered head -> tail, with the 1 - alpha target line; error bars as
    :func:`plot_class_size`."""
    return _plot_per_class(per_class, score, alpha, colors, path, spread, "coverage", by_count=False)


# ----------------------------------------------------------------------------------------------------------
# Multipliers


def plot_lambda(histories: dict[str, pl.DataFrame], train_counts: Sequence[int], path: Path) -> Path | None:
    """lambda_k over epochs, one line per class coloured by its training count, one panel per method; a log axis
    only where a panel's multipliers span a decade or more."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    usable = {m: h for m, h in histories.items() if {"epoch", "class", "lambda"} <= set(h.columns)
              and h["lambda"].drop_nulls().len()}
    # Methods without a dual step (ce, conftr) carry a constant lambda: show the methods with a dual step (CaCT's,
    # even when their multipliers stayed put, which is worth seeing) and any other whose multipliers move; else all.
    usable = {m: h for m, h in usable.items() if h["lambda"].drop_nulls().n_unique() > 1
              or (m in registry.names() and registry.get(m).uses_dual)} or usable
    if not usable:
        return None
    ncols = min(len(usable), 3)
    fig, grid = _figure(ncols, -(-len(usable) // ncols), width=5.0)
    for ax in grid[len(usable):]:
        ax.set_visible(False)
    counts = np.maximum(np.asarray(train_counts, dtype=float), 1)
    norm = LogNorm(vmin=counts.min(), vmax=max(counts.max(), counts.min() * 1.01))
    cmap = colormaps["viridis"]
    for ax, (m, h) in zip(grid, usable.items()):
        h = h.drop_nulls("lambda").sort("class", "epoch")
        segs, cols = [], []
        for (k,), d in h.group_by("class", maintain_order=True):
            segs.append(np.column_stack([d["epoch"].to_numpy(), d["lambda"].to_numpy()]))
            cols.append(cmap(norm(counts[k] if k < len(counts) else counts.min())))
        ax.add_collection(LineCollection(segs, colors=cols, linewidths=1.0))
        lam = h["lambda"].to_numpy()
        ax.set_xlim(h["epoch"].min(), max(h["epoch"].max(), h["epoch"].min() + 1))
        if log_scale(lam):
            ax.set_yscale("log")
            ax.set_ylim(lam.min() / 1.5, lam.max() * 1.5)
        else:
            pad = 0.05 * (lam.max() - lam.min()) or 0.1 * abs(lam.max()) or 1.0
            ax.set_ylim(lam.min() - pad, lam.max() + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("multiplier lambda_k" + (" (log scale)" if log_scale(lam) else ""))
        ax.set_title(m)
        if h["lambda"].n_unique() == 1:
            ax.text(0.5, 0.6, f"constant: lambda = {lam[0]:g}\nfor every class and epoch", transform=ax.transAxes,
                    ha="center", fontsize=10, bbox={"facecolor": "white", "alpha": 0.8})
        ax.grid(True, which="both", alpha=0.3)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(grid), label="training images of the class",
                 fraction=0.03, aspect=40)
    fig.suptitle("Class multipliers lambda_k over epochs (one line per class)")
    fig.savefig(path, dpi=110)
    return path


# ----------------------------------------------------------------------------------------------------------
# Coverage vs size


def plot_coverage_vs_size(summary: pl.DataFrame, score: str, colors: dict, path: Path,
                          curve: pl.DataFrame | None = None) -> Path:
    """Mean coverage vs mean set size across alphas, one curve per method (its colour, line style and marker),
    one panel per predictor. ``curve`` (from :mod:`stages.report_data`: method, predictor, alpha, coverage_mean,
    size_mean, inf_threshold_frac, evaluated) gives a grid of alphas; without it, the summary's evaluated alphas.
    Evaluated alphas are the large markers; a cross marks an alpha with an infinite threshold (full sets). A
    curve is not shifted (x is a measured value): the markers of earlier methods are larger instead, so that equal
    curves show nested marker shapes."""
    from matplotlib.lines import Line2D

    if curve is None:
        curve = summary.filter(pl.col("score") == score).with_columns(pl.lit(True).alias("evaluated"))
    predictors = curve["predictor"].unique(maintain_order=True).to_list()
    evaluated = sorted(curve.filter(pl.col("evaluated"))["alpha"].unique().to_list())
    styles = _styles(colors)
    fig, axes = _figure(len(predictors))
    for ax, pred in zip(axes, predictors):
        sizes = curve.filter(pl.col("predictor") == pred)["size_mean"].to_numpy()
        for i, m in enumerate(colors):
            d = curve.filter((pl.col("predictor") == pred) & (pl.col("method") == m)).sort("alpha")
            if not d.height:
                continue
            x, y = d["size_mean"].to_numpy(), d["coverage_mean"].to_numpy()
            grow = len(colors) - 1 - i  # earlier methods get larger markers: equal points show nested shapes
            ax.plot(x, y, ms=4 + 0.5 * grow, lw=1.2, mfc="none", **styles[m])
            ev = d["evaluated"].to_numpy()
            ax.plot(x[ev], y[ev], marker=styles[m]["marker"], color=colors[m], ms=7 + 0.8 * grow, mew=1.4, mfc="none",
                    ls="none")
            inf = d["inf_threshold_frac"].to_numpy() > 0
            ax.plot(x[inf], y[inf], marker="x", color="black", ms=5, mew=1.0, ls="none")
        for a in evaluated:
            ax.axhline(1 - a, color="grey", ls=":", lw=0.8)
            ax.annotate(f"1 - alpha = {1 - a:g}", (1.0, 1 - a), xycoords=("axes fraction", "data"), ha="right",
                        va="bottom", fontsize=7, color="dimgrey")
        if log_scale(sizes):
            _log_x(ax)
        ax.set_xlabel("mean prediction set size" + (" (log scale)" if log_scale(sizes) else ""))
        ax.set_ylabel("coverage (mean over splits)")
        ax.set_title(f"{pred} CP, {score.upper()}")
        ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], mfc="none", label=m, **styles[m]) for m in colors]
    handles.append(Line2D([], [], color="black", marker="o", ms=8, mfc="none", ls="none", label="evaluated alpha"))
    if (curve["inf_threshold_frac"] > 0).any():
        handles.append(Line2D([], [], color="black", marker="x", ls="none", label="a threshold is +inf"))
    fig.legend(handles=handles, title="method", loc="outside right center", fontsize=8)
    alphas = curve["alpha"].unique().sort().to_list()
    fig.suptitle(f"Coverage vs set size across {len(alphas)} alphas ({alphas[0]:g} to {alphas[-1]:g})")
    fig.savefig(path, dpi=110)
    return path
