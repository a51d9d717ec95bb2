"""The conformal-prediction evaluation engine: hard split CP of a pool's logits over R random calibration/test
splits, for any registered score, both predictors (standard, class-wise) and several alphas, with every
registered summary metric, per split; and the summary, per-class, per-split and paired-difference rows.

It is the code behind every published number (``stages.evaluate`` reads the logits, calls
:func:`evaluate_pool` per method, and writes the tables these rows make), kept here, in pure PyTorch/NumPy,
so that it is tested, benchmarked (``benchmarks/cp_eval_vs_torchcp_mapie.py``) and reused without Ray.

Its pieces, one concept each: scores are :class:`cact_ops.scores.Score` objects (registry
``SCORE_REGISTRY``); thresholds are :func:`cact_ops.cp.thresholds` (all splits and alphas from one sort of
the calibration scores); set metrics are :class:`cact_ops.metrics.SetStats` and the metric registry
``METRIC_REGISTRY``; the row sort and set-size kernels are :mod:`cact_ops.ranking`.

How it stays fast (see docs/BENCHMARKS.md). Everything that does not depend on the split is done once per
method: the softmax and one sort of every pool row (shared by the rank-monotone scores), the score matrices,
the true-class scores. A split is then index arithmetic: standard set sizes of a rank-monotone score (LAC, APS,
RAPS: sets are prefixes of the classes ranked by probability) are a binary search in each row's rank-ordered
scores; other scores, and class-wise thresholds, take one comparison per test row; all metrics are bincounts
over the split axis, from two sufficient statistics of a set: its size and whether it covers the label.
With one or two splits (the 1-split workload of the benchmark), what only pays off over many splits is limited
to the rows that need it: the class order (an argsort) of APS/RAPS and LAC's class-order scores are built for
the test rows only. On the CPU, thresholds come from NumPy (a partition at the needed ranks, not a full sort).

Randomness (the splits and the APS/RAPS U) comes from ``seed`` only: a rerun gives identical numbers. U is
drawn once per pool sample (shared by the scores and by every method: common random numbers make method
comparisons paired); each split then uses independent U's for its calibration and test samples.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from .cp import thresholds
from .metrics import (
    METRIC_REGISTRY,
    SHOT_GROUPS,
    SetStats,
    compute_metrics,
    paired_difference,
    paired_metrics,
    shot_groups,
)
from .ranking import classwise_sizes, prefix_sizes, rank_pool
from .scores import SCORE_REGISTRY, Score, score_object, softmax

DEFAULT_SCORES = ("lac", "aps", "raps")
PREDICTORS = ("standard", "classwise")
# Up to this many (split x alpha) thresholds, LAC's standard set sizes are counted directly (one comparison pass
# each) rather than after a sort of every row (which costs about as much as 4-8 comparison passes).
_DIRECT_COUNT_MAX = 4
# Up to this many splits, the argmax and the class-order scores (class-wise sets of APS/RAPS, LAC's sets) are
# computed for the test rows only.
_FEW_SPLITS = 2
KEYS = ("method", "score", "predictor", "alpha")
PER_CLASS_COLUMNS = KEYS + ("class", "class_name", "shot", "train_count", "test_count", "coverage_mean",
                            "size_mean")


# ----------------------------------------------------------------------------------------------------------
# Column names: from the registries, at call time (a metric registered later is in them)


def score_names() -> tuple[str, ...]:
    """Names of the registered scores."""
    return tuple(SCORE_REGISTRY)


def per_split_metrics() -> tuple[str, ...]:
    """Names of the registered summary metrics: the value columns of the per-split rows."""
    return tuple(METRIC_REGISTRY)


def per_split_columns() -> tuple[str, ...]:
    return KEYS + ("split",) + per_split_metrics()


def paired_columns() -> tuple[str, ...]:
    """``<metric>_diff_mean/_lo/_hi`` per paired metric, then ``control``."""
    return tuple(f"{m}_diff_{s}" for m in paired_metrics() for s in ("mean", "lo", "hi")) + ("control",)


def summary_columns() -> tuple[str, ...]:
    cols = [*KEYS, "n_splits"]
    for m in METRIC_REGISTRY.values():
        cols += [m.mean_column] + ([f"{m.name}_std"] if m.std else [])
    return tuple(cols) + ("inf_threshold_frac",) + paired_columns()


# ----------------------------------------------------------------------------------------------------------
# Splits and U


def _stream_seed(seed: int, stream: str) -> int:
    """An independent 63-bit seed per random stream ("splits", "u"), derived from the one config seed."""
    state = np.random.SeedSequence([int(seed), zlib.crc32(stream.encode())]).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


def split_indices(labels: torch.Tensor, n_splits: int, cal_fraction: float = 0.5, seed: int = 0):
    """Stratified random calibration/test splits of a pool: index tensors ``cal`` [R, n_cal], ``test`` [R, n_test].

    Class k gives ``floor(cal_fraction * n_k + 0.5)`` calibration points to every split. Both halves are grouped
    by class in ascending order, so ``labels[cal[r]]`` (and ``labels[test[r]]``) is the same for every split r.
    One argsort of random keys offset by the label does the grouping and the shuffle at once.

    >>> cal, test = split_indices(torch.tensor([0, 1, 0, 1, 1, 0]), n_splits=3)
    >>> cal.shape, torch.tensor([0, 1, 0, 1, 1, 0])[cal[0]].tolist()
    (torch.Size([3, 4]), [0, 0, 1, 1])
    """
    labels = torch.as_tensor(labels).long().cpu()
    n = labels.numel()
    gen = torch.Generator().manual_seed(_stream_seed(seed, "splits"))
    keys = torch.rand(n_splits, n, generator=gen, dtype=torch.float64) + labels.double()
    perm = keys.argsort(dim=1, stable=True)
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if n else 0)
    sorted_labels = labels.sort().values
    starts = counts.cumsum(0) - counts
    position = torch.arange(n) - starts[sorted_labels]
    n_cal = torch.floor(counts.double() * cal_fraction + 0.5).long()
    is_cal = position < n_cal[sorted_labels]
    return perm[:, is_cal], perm[:, ~is_cal]


def draw_u(n: int, seed: int = 0) -> torch.Tensor:
    """U ~ Unif(0, 1) per pool sample for randomised scores (APS/RAPS) (float64, seeded).

    >>> bool((draw_u(4, seed=1) == draw_u(4, seed=1)).all())
    True
    """
    gen = torch.Generator().manual_seed(_stream_seed(seed, "u"))
    return torch.rand(n, generator=gen, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------
# Evaluation of one pool


@dataclass
class ScoreResult:
    """Metrics of one (score, predictor) over R splits x A alphas: a [R, A] tensor per registered summary
    metric, and ``class_coverage``, ``class_size`` [R, A, K]."""

    score: str
    predictor: str
    metrics: dict[str, torch.Tensor]
    inf_frac: torch.Tensor  # [A] share of +inf thresholds


def evaluate_pool(logits: torch.Tensor, labels: torch.Tensor, train_counts: Sequence[int],
                  scores: Sequence[str | Score] = DEFAULT_SCORES, predictors: Sequence[str] = PREDICTORS,
                  alphas: Sequence[float] = (0.1, 0.05), n_splits: int = 20, cal_fraction: float = 0.5,
                  seed: int = 0, raps_lam: float = 0.01, raps_k_reg: int = 5, randomized: bool = True,
                  device: str = "cpu", dtype: torch.dtype = torch.float32, splits=None,
                  score_params: Mapping[str, Mapping] | None = None):
    """Hard split CP of one method's pool logits over ``n_splits`` splits: (accuracy [R], list of ScoreResult,
    one per score x predictor in that order).

    ``scores`` are registered names (:data:`cact_ops.scores.SCORE_REGISTRY`) or :class:`Score` objects;
    ``score_params`` gives keyword arguments per score name (RAPS gets ``lam=raps_lam, k_reg=raps_k_reg``
    unless given there). ``splits`` may pass precomputed ``(cal, test)`` from :func:`split_indices` (the
    benchmark and the tests do); by default they are drawn from ``seed``.

    >>> _ = torch.manual_seed(0); x = torch.randn(200, 3); y = x.argmax(1)
    >>> acc, res = evaluate_pool(x, y, [50, 20, 5], scores=["lac"], predictors=["standard"], n_splits=2)
    >>> acc.tolist(), res[0].metrics["coverage"].shape
    ([1.0, 1.0], torch.Size([2, 2]))
    """
    objs = [score_object(s) for s in scores]
    params = {"raps": {"lam": raps_lam, "k_reg": raps_k_reg}, **(score_params or {})}
    bad = [p for p in predictors if p not in PREDICTORS]
    if bad:
        raise ValueError(f"unknown predictor(s) {bad}; known: {', '.join(PREDICTORS)}")
    num_classes = logits.shape[1]
    labels = labels.long()
    cal, test = split_indices(labels, n_splits, cal_fraction, seed) if splits is None else splits
    dev = torch.device(device)
    logits, labels_d = logits.to(dev, dtype), labels.to(dev)
    cal, test = cal.to(dev), test.to(dev)
    y_cal, y_test = labels_d[cal[0]], labels_d[test[0]]
    groups = shot_groups(train_counts)
    if groups.numel() != num_classes:
        raise ValueError(f"train_counts has {groups.numel()} classes but logits have {num_classes}")
    r_, a_ = cal.shape[0], len(alphas)
    # With few splits only the test rows are read beyond their true class (the calibration side needs the
    # true-class scores only): the argmax, the class-order scores and their argsort then run on those rows alone.
    few_rows, few_test = None, None  # those rows (pool indices), and each test row's position among them
    if dev.type == "cpu" and r_ <= _FEW_SPLITS:
        if r_ == 1:  # one split: its test rows as they are (no sort, no search)
            few_rows, few_test = test[0], torch.arange(test.shape[1])[None]
        else:
            few_rows = torch.unique(test)
            few_test = torch.searchsorted(few_rows, test)
        if few_rows.numel() > 0.75 * len(labels):  # nearly every row: the whole pool is cheaper than a copy
            few_rows, few_test = None, None
    if few_rows is None:
        correct = logits.argmax(dim=1) == labels_d
    else:
        correct = logits.index_select(0, few_rows).argmax(dim=1) == labels_d.index_select(0, few_rows)
    accuracy = correct[test if few_test is None else few_test].to(torch.float64).mean(dim=1)
    probs = softmax(logits)
    classwise_needed = "classwise" in predictors
    # One sort of every row serves the scores computed from it (APS/RAPS) and the standard sizes of every
    # rank-monotone score (a binary search per threshold). LAC alone with a few thresholds is cheaper without it:
    # one comparison pass per (split, alpha).
    need_sort = any(s.from_ranks for s in objs) or (
        "standard" in predictors and r_ * a_ > _DIRECT_COUNT_MAX and any(s.rank_monotone for s in objs))
    need_order = classwise_needed and any(s.from_ranks for s in objs)
    order_rows = few_rows if need_order else None
    ranked = rank_pool(probs, labels_d, need_order, order_rows) if need_sort else None
    u = draw_u(len(labels), seed).to(dev, dtype) if randomized else None
    results = []
    for score in objs:
        kw = params.get(score.name, {})
        u_s = u if (u is not None or not score.randomized) else torch.ones(len(labels), dtype=dtype, device=dev)
        s_rank = score.rank_scores(ranked, u_s, **kw) if (score.rank_monotone and ranked is not None) else None
        # s_class holds the class-order scores of the pool rows s_rows (None: every row); with few splits only
        # the test rows are needed (the calibration side uses the true-class scores only).
        s_class, s_rows = None, None
        lazy = (score.elementwise and not score.randomized and few_rows is not None
                and (classwise_needed or s_rank is None))
        if lazy:
            s_rows = few_rows
            s_class = score.class_scores(probs.index_select(0, s_rows), None, **kw)
        elif classwise_needed or s_rank is None:
            s_class = score.class_scores(probs, u_s, ranked=ranked, s_rank=s_rank, **kw)
            if score.from_ranks and ranked is not None and ranked.order_rows is not None:
                s_rows = ranked.order_rows
        if s_rank is not None:  # the true class's score: at its rank (= its class column, bit for bit)
            true = s_rank.gather(1, ranked.rank_y[:, None]).squeeze(1)
        elif lazy:  # an elementwise score of the true-class column alone (= its column of every score, bit for bit)
            true = score.class_scores(probs.gather(1, labels_d[:, None]), None, **kw).squeeze(1)
        else:
            true = s_class.gather(1, labels_d[:, None]).squeeze(1)
        test_rows = test if s_rows is None else few_test  # rows of s_class (s_rows is few_rows or None)
        t_cal, t_test = true[cal], true[test]
        for predictor in predictors:
            classwise = predictor == "classwise"
            q, inf_frac = thresholds(t_cal, y_cal, alphas, num_classes, classwise)
            if classwise:
                covered = t_test[:, None, :] <= q[:, :, y_test]
                sizes = classwise_sizes(s_class, test_rows, q)
            elif s_rank is None:
                covered = t_test[:, None, :] <= q[:, :, None]
                sizes = classwise_sizes(s_class, test_rows, q[:, :, None].expand(r_, a_, num_classes).contiguous())
            else:
                covered = t_test[:, None, :] <= q[:, :, None]
                sizes = prefix_sizes(s_rank, test, q)
            stats = SetStats(covered, sizes, y_test, num_classes, alphas, groups, accuracy)
            results.append(ScoreResult(score.name, predictor, compute_metrics(stats), inf_frac))
    return accuracy, results


# ----------------------------------------------------------------------------------------------------------
# Rows of the output tables (plain dicts; the stage makes the frames)


def _std(x: torch.Tensor) -> float:
    return float(x.std(correction=1)) if x.numel() > 1 else float("nan")


def summarize(method: str, accuracy: torch.Tensor, results: Sequence[ScoreResult], alphas: Sequence[float],
              classes: Sequence[str], train_counts: Sequence[int], test_counts: Sequence[int]):
    """Rows of ``summary`` (without the paired columns) and ``per_class`` (lists of dicts) for one method:
    means (and stds) over splits, columns as :func:`summary_columns` and ``PER_CLASS_COLUMNS``."""
    groups = shot_groups(train_counts).tolist()
    summary, per_class = [], []
    for res in results:
        m = {k: v.cpu() for k, v in res.metrics.items()}
        for a, alpha in enumerate(alphas):
            row = {"method": method, "score": res.score, "predictor": res.predictor, "alpha": float(alpha),
                   "n_splits": int(accuracy.numel())}
            for metric in METRIC_REGISTRY.values():
                values = m[metric.name][:, a]
                row[metric.mean_column] = float(values.mean())
                if metric.std:
                    row[f"{metric.name}_std"] = _std(values)
            row["inf_threshold_frac"] = float(res.inf_frac[a])
            summary.append(row)
            cov_k = m["class_coverage"][:, a].mean(0).tolist()
            size_k = m["class_size"][:, a].mean(0).tolist()
            for k, name in enumerate(classes):
                per_class.append({
                    "method": method, "score": res.score, "predictor": res.predictor, "alpha": float(alpha),
                    "class": k, "class_name": str(name), "shot": SHOT_GROUPS[groups[k]],
                    "train_count": int(train_counts[k]), "test_count": int(test_counts[k]),
                    "coverage_mean": cov_k[k], "size_mean": size_k[k],
                })
    return summary, per_class


def per_split_rows(method: str, accuracy: torch.Tensor, results: Sequence[ScoreResult],
                   alphas: Sequence[float]) -> list[dict]:
    """Rows of ``per_split`` for one method: the values of every split that :func:`summarize` averages."""
    names = per_split_metrics()
    rows = []
    for res in results:
        m = {k: res.metrics[k].cpu() for k in names}
        for a, alpha in enumerate(alphas):
            values = {k: v[:, a].tolist() for k, v in m.items()}
            for r in range(accuracy.numel()):
                rows.append({"method": method, "score": res.score, "predictor": res.predictor, "alpha": float(alpha),
                             "split": r, **{k: v[r] for k, v in values.items()}})
    return rows


def paired_rows(split_rows: Sequence[dict], control: str) -> list[dict]:
    """Per (method, score, predictor, alpha) of ``split_rows``: the paired mean of (method - control) over the
    splits and its 95% Student-t interval (:func:`cact_ops.metrics.paired_difference`) for every paired metric
    (:func:`paired_columns`), and ``control``.

    Rows of the control itself, and every row when the control is not in ``split_rows``, have NaN differences
    and ``control`` None. Splits are matched by index, which pairs them: every method was evaluated on the
    same splits.
    """
    blocks: dict[tuple, list[dict]] = {}
    for row in split_rows:
        blocks.setdefault(tuple(row[k] for k in KEYS), []).append(row)
    names, nan = paired_metrics(), float("nan")
    out = []
    for (method, score, predictor, alpha), rows in blocks.items():
        row = {"method": method, "score": score, "predictor": predictor, "alpha": alpha,
               **{c: nan for c in paired_columns()[:-1]}, "control": None}
        ref = blocks.get((control, score, predictor, alpha))
        if method != control and ref is not None:
            mine, theirs = (sorted(x, key=lambda r: r["split"]) for x in (rows, ref))
            if [r["split"] for r in mine] != [r["split"] for r in theirs]:
                raise ValueError(f"{method} and {control} were evaluated on different splits ({score}, {predictor}, "
                                 f"alpha={alpha}): no paired comparison")
            for metric in names:
                mean, lo, hi = paired_difference([r[metric] for r in mine], [r[metric] for r in theirs])
                row |= {f"{metric}_diff_mean": mean, f"{metric}_diff_lo": lo, f"{metric}_diff_hi": hi}
            row["control"] = control
        out.append(row)
    return out


def with_paired(summary_rows: Sequence[dict], split_rows: Sequence[dict], control: str) -> list[dict]:
    """The summary rows completed with their paired columns (:func:`paired_rows`), in :func:`summary_columns`
    order."""
    paired = {tuple(r[k] for k in KEYS): r for r in paired_rows(split_rows, control)}
    cols = summary_columns()
    return [{c: (row | paired[tuple(row[k] for k in KEYS)]).get(c) for c in cols} for row in summary_rows]


__all__ = [
    "DEFAULT_SCORES", "PREDICTORS", "KEYS", "PER_CLASS_COLUMNS", "ScoreResult", "draw_u", "evaluate_pool",
    "paired_columns", "paired_rows", "per_split_columns", "per_split_metrics", "per_split_rows", "score_names",
    "split_indices", "summarize", "summary_columns", "thresholds", "with_paired",
]
