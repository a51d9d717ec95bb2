"""Per-split values the report's plots need but ``eval/`` does not store, recomputed from the run's logits.

``eval/per_class.parquet`` holds per-class means over the R calibration/test splits, and ``eval/summary.parquet``
the evaluated alphas only. The plots want more: per-class error bars across the R splits, and coverage vs set
size over a grid of alphas (:data:`ALPHA_GRID` and the evaluated ones). Both come from one more call of
:func:`cact_ops.engine.evaluate_pool` per method, for the plotted score only, on CPU, with the evaluation's own
settings (``eval/manifest.json``: ``n_splits``, ``pool_cal_fraction``, ``seed``, RAPS parameters, randomisation,
dtype). The splits and U are seeded, so these are the evaluation's splits and U: at the plotted alpha the
recomputed per-class means are those of ``per_class.parquet``, and this is checked (logits rewritten since the
evaluation give other means, and then nothing recomputed is used). The cost is about one more evaluation of one
score: 1-2 s per method for a 10,000 x 1,000 pool with 20 splits.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import torch

from cact_ops import engine

from ._io import RunFolder

# Alphas of the coverage-vs-size curves, besides the evaluated ones.
ALPHA_GRID = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3)
# Recomputed per-class means must agree with eval/per_class.parquet to this absolute tolerance.
_TOLERANCE = 1e-6


@dataclass
class PlotData:
    """What :func:`recompute` found; ``why`` says, when the frames are None, why they could not be made.

    ``per_split``: one row per (method, predictor, split, class) at the plotted alpha, columns ``coverage`` and
    ``size``. ``curve``: one row per (method, predictor, alpha), means over the splits ``coverage_mean`` and
    ``size_mean``, ``inf_threshold_frac`` and ``evaluated`` (the alpha is one of the evaluation's)."""

    per_split: pl.DataFrame | None = None
    curve: pl.DataFrame | None = None
    why: str | None = None


def recompute(run_dir: str | Path, per_class: pl.DataFrame, score: str, alpha: float, methods: Sequence[str],
              predictors: Sequence[str], eval_config: dict | None) -> PlotData:
    """Per-split per-class values at ``alpha`` and the coverage-vs-size curves of ``score`` for ``methods``,
    from ``<run>/logits/<method>/pool.parquet``; a :class:`PlotData` with only ``why`` when the evaluation's
    settings or a logits file is missing, or the result disagrees with ``per_class`` (the evaluation's means)."""
    from .evaluate import read_logits

    if not eval_config or "n_splits" not in eval_config:
        return PlotData(why="the evaluation's settings are unknown (no eval/manifest.json)")
    if not per_class.filter((pl.col("score") == score) & (pl.col("alpha") == alpha)).height:
        return PlotData(why=f"eval/per_class.parquet has no rows for {score} at alpha = {alpha:g}")
    cfg = eval_config
    train_counts = per_class.select("class", "train_count").unique().sort("class")["train_count"].to_list()
    evaluated = sorted(float(a) for a in cfg.get("alphas") or [alpha])
    alphas = sorted(set(ALPHA_GRID) | set(evaluated) | {float(alpha)})
    at = alphas.index(float(alpha))
    splits, rows, curve = None, [], []
    for m in methods:
        path = RunFolder(run_dir).logits(m, "pool")
        if not path.is_file():
            return PlotData(why=f"{path.relative_to(run_dir)} is missing")
        pool = read_logits(path)
        if len(train_counts) != pool.logits.shape[1]:
            return PlotData(why=f"{path.relative_to(run_dir)} has {pool.logits.shape[1]} classes, the evaluation "
                                f"{len(train_counts)}")
        if splits is None:
            share = cfg.get("pool_cal_fraction", cfg.get("cal_fraction", 0.5))  # its name before
            splits = engine.split_indices(pool.labels, int(cfg["n_splits"]), float(share), int(cfg.get("seed", 0)))
        _, results = engine.evaluate_pool(
            pool.logits, pool.labels, train_counts, (score,), tuple(predictors), tuple(alphas), splits=splits,
            seed=int(cfg.get("seed", 0)), raps_lam=float(cfg.get("raps_lam", 0.01)),
            raps_k_reg=int(cfg.get("raps_k_reg", 5)), randomized=bool(cfg.get("randomized", True)),
            dtype=getattr(torch, cfg.get("dtype", "float32")))
        for res in results:
            cov = res.metrics["class_coverage"][:, at].cpu().numpy()  # [R, K]
            size = res.metrics["class_size"][:, at].cpu().numpy()
            r, k = cov.shape
            rows.append(pl.DataFrame({"method": [m] * (r * k), "predictor": [res.predictor] * (r * k),
                                      "split": np.repeat(np.arange(r), k), "class": np.tile(np.arange(k), r),
                                      "coverage": cov.ravel(), "size": size.ravel()}))
            curve.append(pl.DataFrame({
                "method": [m] * len(alphas), "predictor": [res.predictor] * len(alphas), "alpha": alphas,
                "coverage_mean": res.metrics["coverage"].mean(0).cpu().numpy(),
                "size_mean": res.metrics["size"].mean(0).cpu().numpy(),
                "inf_threshold_frac": res.inf_frac.cpu().numpy().astype(np.float64),
                "evaluated": [a in evaluated for a in alphas]}))
    per_split = pl.concat(rows)
    if not _agrees(per_split, per_class, score, alpha):
        return PlotData(why="the logits no longer give the evaluation's per-class means (rewritten since, or "
                            "evaluated on another device); rerun `python -m stages.evaluate` on the run folder")
    return PlotData(per_split=per_split, curve=pl.concat(curve))


def _agrees(per_split: pl.DataFrame, per_class: pl.DataFrame, score: str, alpha: float) -> bool:
    """Whether the means over splits of ``per_split`` equal the evaluation's ``per_class`` means."""
    means = per_split.group_by("method", "predictor", "class").agg(pl.col("coverage").mean().alias("_c"),
                                                                  pl.col("size").mean().alias("_s"))
    ref = per_class.filter((pl.col("score") == score) & (pl.col("alpha") == alpha))
    joined = ref.join(means, on=["method", "predictor", "class"], how="inner")
    if joined.height != ref.height or not joined.height:
        return False
    return all(np.allclose(joined[a].to_numpy(), joined[b].to_numpy(), rtol=0, atol=_TOLERANCE, equal_nan=True)
               for a, b in (("coverage_mean", "_c"), ("size_mean", "_s")))
