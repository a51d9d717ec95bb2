"""Metrics of prediction sets, vectorised over samples (no Python loop over samples or classes), and the registry
of the per-split summary metrics the evaluation engine reports.

One implementation: every set metric is computed from two sufficient statistics of each set, whether it covers
the label and its size, by the batched kernels of :class:`SetStats` (float64, batched over any leading axes,
e.g. splits x alphas). The functions on explicit bool sets (``coverage``, ``covgap``, ``sscv``, ...) call the
same kernels with one batch entry, and return float32 as they always have. Per-class quantities are NaN for
classes absent from ``labels``; summaries average over present classes.

``METRIC_REGISTRY`` (name -> :class:`SummaryMetric`: batched function of a :class:`SetStats`, report header,
lower-is-better, formats, whether the summary has a std and a paired difference) decides the columns of the
evaluation's ``per_split``/``summary`` tables and of the report: a new summary column is one
:func:`register_metric` call.

:func:`paired_difference` compares two methods over the same calibration/test splits (a Student-t interval,
with the t quantile computed here: ``cact_ops`` does not depend on SciPy).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ._checks import check_alpha, check_labels, check_matrix, check_sets

# Size strata of Angelopoulos et al. (RAPS) for SSCV: [0,1], [2,3], [4,10], [11,100], [101,1000], [1001, inf).
DEFAULT_SIZE_BINS = (1, 3, 10, 100, 1000)
SHOT_GROUPS = ("many", "medium", "few")


# ----------------------------------------------------------------------------------------------------------
# The batched kernels


def _bin_sums(values: torch.Tensor, bins: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Sums of ``values`` [..., m] per bin (``bins`` [m] or [..., m]) along the last axis: float64 [..., n_bins]."""
    out = torch.zeros(*values.shape[:-1], n_bins, dtype=torch.float64, device=values.device)
    return out.scatter_add_(-1, bins.expand_as(values), values)


def _bin_means(values: torch.Tensor, bins: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Means of ``values`` [..., m] (float64) per bin of ``bins`` [m]: [..., n_bins], NaN for an empty bin."""
    n = torch.bincount(bins, minlength=n_bins).to(torch.float64)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=values.device)
    return torch.where(n > 0, _bin_sums(values, bins, n_bins) / n.clamp(min=1), nan)


class SetStats:
    """Prediction sets of a batch reduced to their sufficient statistics, and every set metric computed from them.

    ``covered`` (bool) and ``sizes`` (int) are [..., A, m] over m test samples with ``labels`` [m] (the leading
    axes, e.g. R splits, are free; A = len(alphas), the targets 1 - alpha broadcast over that axis). ``groups``
    [K] are the shot groups (:func:`shot_groups`), ``accuracy`` [...] the top-1 accuracy of each batch entry.
    Metrics are float64 tensors of shape [..., A]; shared intermediates (per-class coverage and size) are
    computed once, on first use.

    >>> st = SetStats(torch.tensor([[True, False]]), torch.tensor([[1, 2]]), torch.tensor([0, 1]), 2, [0.1],
    ...               groups=torch.tensor([0, 2]))
    >>> st.coverage().tolist(), st.covgap().tolist(), st.group_size[..., 2].tolist()
    ([0.5], [50.0], [2.0])
    """

    def __init__(self, covered: torch.Tensor, sizes: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 alphas: Sequence[float] = (), groups: torch.Tensor | None = None,
                 accuracy: torch.Tensor | None = None, size_bins=DEFAULT_SIZE_BINS):
        dev = covered.device
        self.covered, self.sizes = covered, sizes
        self.labels = labels.to(dev)
        self.num_classes, self.size_bins = num_classes, size_bins
        self.cov = covered.to(torch.float64)
        self.size = sizes.to(torch.float64)
        # [A]: broadcasts over the alpha axis of [..., A] results; target[:, None] over [..., A, K] ones.
        self.target = torch.tensor([1.0 - a for a in alphas], dtype=torch.float64, device=dev)
        self.groups = None if groups is None else groups.to(dev)
        self.accuracy = accuracy
        self.present = torch.bincount(self.labels, minlength=num_classes) > 0
        self._nan = torch.tensor(float("nan"), dtype=torch.float64, device=dev)

    @property
    def batch_shape(self) -> torch.Size:
        """[..., A]: the shape of every summary metric."""
        return self.cov.shape[:-1]

    @functools.cached_property
    def class_coverage(self) -> torch.Tensor:
        """Coverage per true class [..., A, K] (NaN for classes without a sample)."""
        return _bin_means(self.cov, self.labels, self.num_classes)

    @functools.cached_property
    def class_size(self) -> torch.Tensor:
        """Mean set size per true class [..., A, K] (NaN for classes without a sample)."""
        return _bin_means(self.size, self.labels, self.num_classes)

    @functools.cached_property
    def group_size(self) -> torch.Tensor:
        """Mean set size per shot group (many, medium, few) [..., A, 3] (NaN for an empty group)."""
        if self.groups is None:
            raise ValueError("SetStats needs groups (cact_ops.metrics.shot_groups) for shot-group sizes")
        return _bin_means(self.size, self.groups[self.labels], len(SHOT_GROUPS))

    def coverage(self) -> torch.Tensor:
        return self.cov.mean(-1)

    def average_size(self) -> torch.Tensor:
        return self.size.mean(-1)

    def covgap(self) -> torch.Tensor:
        """100 x mean over present classes of |class coverage - (1 - alpha)| (Ding et al. 2023)."""
        if not bool(self.present.any()):
            return self._nan.expand(self.batch_shape)
        gap = (self.class_coverage[..., self.present] - self.target[:, None]).abs()
        return 100.0 * gap.mean(-1)

    def undercovered(self, tolerance: float = 0.0) -> torch.Tensor:
        """Fraction of present classes whose coverage is below 1 - alpha - tolerance (NaN: no present class)."""
        if not bool(self.present.any()):
            return self._nan.expand(self.batch_shape)
        target = self.target if tolerance == 0 else self.target - tolerance
        return (self.class_coverage[..., self.present] < target[:, None]).to(torch.float64).mean(-1)

    def sscv(self) -> torch.Tensor:
        """Size-stratified coverage violation: max over non-empty size strata of |coverage - (1 - alpha)|.

        ``size_bins`` are the inclusive upper edges of the strata (bucketize: size <= edge[i] is in stratum i).
        NaN when no stratum has a sample."""
        edges = torch.as_tensor(self.size_bins, dtype=self.sizes.dtype, device=self.cov.device)
        stratum = torch.bucketize(self.sizes, edges, right=False)
        n_strata = len(self.size_bins) + 1
        count = _bin_sums(torch.ones_like(self.cov), stratum, n_strata)
        hits = _bin_sums(self.cov, stratum, n_strata)
        viol = torch.where(count > 0, (hits / count.clamp(min=1) - self.target[:, None]).abs(), -torch.inf)
        worst = viol.amax(-1)
        return torch.where(worst == -torch.inf, self._nan, worst)

    def top1_accuracy(self) -> torch.Tensor:
        """The batch entries' top-1 accuracy repeated over the alpha axis ([..., A]; NaN when not given)."""
        if self.accuracy is None:
            return self._nan.expand(self.batch_shape)
        return self.accuracy.to(self.cov.device)[..., None].expand(self.batch_shape)


# ----------------------------------------------------------------------------------------------------------
# Metrics of explicit bool sets [m, K]: one batch entry of the kernels above


def _stats(sets: torch.Tensor, labels: torch.Tensor | None, num_classes: int | None = None, alpha=None,
           **kw) -> SetStats:
    check_sets(sets)
    if num_classes is not None and sets.shape[1] != num_classes:
        raise ValueError(f"sets have {sets.shape[1]} classes but num_classes={num_classes}")
    if labels is None:
        labels = torch.zeros(sets.shape[0], dtype=torch.long, device=sets.device)
        covered = torch.zeros(sets.shape[0], dtype=torch.bool, device=sets.device)
    else:
        labels = check_labels(labels, sets.shape[0], sets.shape[1])
        covered = sets.gather(1, labels[:, None]).squeeze(1)
    alphas = () if alpha is None else (check_alpha(alpha),)
    return SetStats(covered[None], sets.sum(dim=1)[None], labels, sets.shape[1], alphas or (0.5,), **kw)


def coverage(sets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose true label is in the set.

    >>> coverage(torch.tensor([[True, False], [True, True]]), torch.tensor([1, 1]))
    tensor(0.5000)
    """
    return _stats(sets, labels).coverage()[0].float()


def average_size(sets: torch.Tensor) -> torch.Tensor:
    """Mean set size.

    >>> average_size(torch.tensor([[True, False], [True, True]]))
    tensor(1.5000)
    """
    return _stats(sets, None).average_size()[0].float()


def class_coverage(sets: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Coverage per true class, shape [K]; NaN where a class has no sample.

    >>> class_coverage(torch.tensor([[True, False], [False, True], [True, False]]), torch.tensor([0, 0, 1]), 2)
    tensor([0.5000, 0.0000])
    """
    return _stats(sets, labels, num_classes).class_coverage[0].float()


def class_size(sets: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean set size per true class, shape [K]; NaN where a class has no sample."""
    return _stats(sets, labels, num_classes).class_size[0].float()


def covgap(sets: torch.Tensor, labels: torch.Tensor, alpha: float, num_classes: int) -> torch.Tensor:
    """CovGap = 100 x mean over present classes of |class coverage - (1 - alpha)| (Ding et al. 2023).

    >>> covgap(torch.tensor([[True, False], [False, True]]), torch.tensor([0, 0]), 0.1, 2)
    tensor(40.)
    """
    return _stats(sets, labels, num_classes, alpha).covgap()[0].float()


def undercovered_ratio(
    sets: torch.Tensor, labels: torch.Tensor, alpha: float, num_classes: int, tolerance: float = 0.0
) -> torch.Tensor:
    """Fraction of present classes whose coverage is below 1 - alpha - tolerance (0 when no class is present).

    >>> undercovered_ratio(torch.tensor([[True, False], [False, True]]), torch.tensor([0, 1]), 0.1, 2)
    tensor(0.)
    """
    st = _stats(sets, labels, num_classes, alpha)
    return st.undercovered(tolerance)[0].nan_to_num(0.0).float()


def sscv(
    sets: torch.Tensor, labels: torch.Tensor, alpha: float, size_bins=DEFAULT_SIZE_BINS
) -> torch.Tensor:
    """Size-stratified coverage violation: max over non-empty size strata of |coverage - (1 - alpha)|.

    ``size_bins`` are the inclusive upper edges of the strata (default [0,1], [2,3], [4,10], [11,100], ...).

    >>> sscv(torch.tensor([[True, False], [True, True]]), torch.tensor([1, 1]), 0.1)
    tensor(0.9000)
    """
    alpha = check_alpha(alpha)
    return _stats(sets, labels, alpha=alpha, size_bins=size_bins).sscv()[0].float()


def shot_groups(train_counts) -> torch.Tensor:
    """Group id per class: 0 many-shot, 1 medium-shot, 2 few-shot.

    ImageNet-LT convention (>100, 20..100, <20 training images) when K > 10; for K <= 10, thirds of the
    classes ordered by training count (largest first), the first third rounded up.

    >>> shot_groups([500, 300, 200, 100, 60, 40, 20, 10, 5, 2]).tolist()
    [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    """
    counts = torch.as_tensor(train_counts, dtype=torch.long).flatten()
    num_classes = counts.shape[0]
    if num_classes == 0:
        raise ValueError("train_counts is empty")
    if (counts < 0).any():
        raise ValueError("train_counts must be >= 0")
    if num_classes > 10:
        return torch.where(counts > 100, 0, torch.where(counts >= 20, 1, 2))
    order = torch.argsort(counts, descending=True, stable=True)
    bounds = torch.tensor([-(-num_classes // 3), -(-2 * num_classes // 3)])  # ceil(K/3), ceil(2K/3)
    group_of_position = torch.bucketize(torch.arange(num_classes), bounds, right=True)
    groups = torch.empty(num_classes, dtype=torch.long)
    groups[order] = group_of_position
    return groups


def shot_group_sizes(sets: torch.Tensor, labels: torch.Tensor, train_counts) -> dict[str, torch.Tensor]:
    """Mean set size over test samples whose class is many-, medium- or few-shot (NaN for an empty group)."""
    check_sets(sets)
    groups = shot_groups(train_counts).to(sets.device)
    if groups.shape[0] != sets.shape[1]:
        raise ValueError(f"train_counts has {groups.shape[0]} classes but sets have {sets.shape[1]}")
    per_group = _stats(sets, labels, groups=groups).group_size[0].float()
    return dict(zip(SHOT_GROUPS, per_group))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy.

    >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
    tensor(0.5000)
    """
    check_matrix(logits, "logits")
    labels = check_labels(labels, logits.shape[0], logits.shape[1])
    return (logits.argmax(dim=1) == labels).float().mean()


# ----------------------------------------------------------------------------------------------------------
# Paired comparisons over calibration/test splits


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (modified Lentz), for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1.

    >>> round(betainc(2.0, 3.0, 0.4), 10)  # 1 - (1-x)^4 - 4x(1-x)^3
    0.5248
    """
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student-t distribution function P(T <= t) with ``df`` degrees of freedom.

    >>> round(t_cdf(1.0, 1), 10)  # Cauchy: 1/2 + atan(1)/pi
    0.75
    """
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=1024)
def t_quantile(p: float, df: float) -> float:
    """Quantile of the Student-t distribution: the t with ``t_cdf(t, df) = p``, by bisection on the CDF.

    Pure math (no SciPy in ``cact_ops``); agrees with ``scipy.stats.t.ppf`` to well under 1e-6 (see the tests).

    >>> round(t_quantile(0.975, 4), 4), round(t_quantile(0.975, 1), 4)
    (2.7764, 12.7062)
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in the open interval (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if p <= 0.5:
        return 0.0 if p == 0.5 else -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def paired_difference(values, control, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values - control`` over paired replicates (the same R calibration/test splits) and its
    Student-t interval mean +- t_{(1+confidence)/2, R-1} sd / sqrt(R): ``(mean, lo, hi)``.

    Pairing removes the split-to-split variation the two share. With R = 1 the interval is undefined (NaN
    bounds); a NaN value makes everything NaN. Identical inputs give (0, 0, 0).

    >>> [round(v, 4) for v in paired_difference([2.0, 3.0, 4.0], [1.0, 1.5, 2.0])]  # 1.5 -+ 4.3027 * 0.5 / sqrt(3)
    [1.5, 0.2579, 2.7421]
    >>> paired_difference([1.0, 2.0], [1.0, 2.0]), paired_difference([3.0], [1.0])
    ((0.0, 0.0, 0.0), (2.0, nan, nan))
    """
    check_alpha(1.0 - confidence, "1 - confidence")
    x, y = (v.detach().to(torch.float64).flatten() if isinstance(v, torch.Tensor)
            else torch.tensor(v, dtype=torch.float64).flatten() for v in (values, control))
    if x.shape != y.shape:
        raise ValueError(f"paired_difference needs as many control values as values, got {y.numel()} and {x.numel()}")
    d = x - y
    r = d.numel()
    if r == 0:
        raise ValueError("paired_difference needs at least one pair")
    mean = float(d.mean())
    if r == 1 or math.isnan(mean):
        return mean, float("nan"), float("nan")
    half = t_quantile(0.5 + confidence / 2.0, r - 1) * float(d.std(correction=1)) / math.sqrt(r)
    return mean, mean - half, mean + half


# ----------------------------------------------------------------------------------------------------------
# The registry of per-split summary metrics


@dataclass(frozen=True)
class SummaryMetric:
    """One column of the evaluation's per-split table (``name``) and summary (``<name>_mean``, optionally
    ``<name>_std`` and the paired ``<name>_diff_mean/_lo/_hi`` against the control), and of the report's tables.

    ``fn`` is batched: a :class:`SetStats` of R splits x A alphas -> float64 [R, A]. ``lower_is_better``: True or
    False ranks the report's column (the best value in bold when significantly best), None does not rank it.
    """

    name: str
    fn: Callable[[SetStats], torch.Tensor]
    header: str
    lower_is_better: bool | None
    fmt: str = "{:.3f}"  # a summary cell of the report
    std: bool = False  # the summary also has <name>_std (std over the splits)
    paired: bool = False  # the summary has <name>_diff_mean/_lo/_hi: (method - control) over the splits
    diff_fmt: str = "{:+.3f}"  # a cell of the report's paired table
    summary_column: str | None = None  # the summary's mean column; default <name>_mean

    @property
    def mean_column(self) -> str:
        return self.summary_column or f"{self.name}_mean"


# name -> SummaryMetric, in column order. Values of ScoreResult.metrics that are not summary metrics.
METRIC_REGISTRY: dict[str, SummaryMetric] = {}
_RESERVED = ("class_coverage", "class_size", "method", "score", "predictor", "alpha", "split", "n_splits",
             "inf_threshold_frac", "control")
# Order of the summary's paired columns (as published; a metric registered later with paired=True is appended).
_PAIRED_ORDER: list[str] = ["size", "covgap", "few_size", "coverage", "accuracy", "medium_size", "many_size"]


def register_metric(metric: SummaryMetric, replace: bool = False) -> SummaryMetric:
    """Add a summary metric: the engine computes it for every (score, predictor, split, alpha) and the
    evaluation stage and report show it. Returns ``metric``.

    >>> m = register_metric(SummaryMetric("empty", lambda st: (st.sizes == 0).double().mean(-1), "empty sets", True))
    >>> list(METRIC_REGISTRY)[-2:]
    ['few_size', 'empty']
    >>> unregister_metric("empty")
    """
    if not isinstance(metric, SummaryMetric):
        raise TypeError(f"register_metric needs a SummaryMetric, got {type(metric).__name__}")
    if not metric.name.isidentifier() or metric.name in _RESERVED:
        raise ValueError(f"metric name {metric.name!r} is not an identifier or is reserved ({', '.join(_RESERVED)})")
    if metric.name in METRIC_REGISTRY and not replace:
        raise ValueError(f"metric {metric.name!r} is already registered (replace=True to replace it)")
    METRIC_REGISTRY[metric.name] = metric
    if metric.paired and metric.name not in _PAIRED_ORDER:
        _PAIRED_ORDER.append(metric.name)
    return metric


def unregister_metric(name: str) -> None:
    """Remove a summary metric (``KeyError`` if it is not there)."""
    del METRIC_REGISTRY[name]
    if name in _PAIRED_ORDER and name not in _BUILTIN_PAIRED:
        _PAIRED_ORDER.remove(name)


def paired_metrics() -> tuple[str, ...]:
    """Names of the registered metrics compared with the control, in the summary's column order."""
    return tuple(n for n in _PAIRED_ORDER if n in METRIC_REGISTRY and METRIC_REGISTRY[n].paired)


def compute_metrics(stats: SetStats, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Every registered summary metric (or those in ``names``) of ``stats``, plus ``class_coverage`` and
    ``class_size`` [..., A, K]: the ``metrics`` of one (score, predictor) of the engine."""
    out = {name: METRIC_REGISTRY[name].fn(stats) for name in (METRIC_REGISTRY if names is None else names)}
    out["class_coverage"] = stats.class_coverage
    out["class_size"] = stats.class_size
    return out


def set_metrics(covered: torch.Tensor, sizes: torch.Tensor, labels: torch.Tensor, alphas: Sequence[float],
                num_classes: int, groups: torch.Tensor, size_bins=DEFAULT_SIZE_BINS,
                accuracy: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """All summary metrics from per-sample statistics, batched: :func:`compute_metrics` of a :class:`SetStats`.

    ``covered`` (bool) and ``sizes`` (int) are [..., A, m] (A = len(alphas)) over the test samples with labels
    ``labels`` [m]; ``groups`` [K] is :func:`shot_groups`. Returns float64 tensors [..., A] per registered metric
    (``accuracy`` NaN unless given, [...]) and ``class_coverage``, ``class_size`` [..., A, K].

    >>> m = set_metrics(torch.tensor([[True, False]]), torch.tensor([[1, 2]]), torch.tensor([0, 1]), [0.1], 2,
    ...                 torch.tensor([0, 2]))
    >>> m["coverage"].tolist(), m["covgap"].tolist(), m["few_size"].tolist()
    ([0.5], [50.0], [2.0])
    """
    return compute_metrics(SetStats(covered, sizes, labels, num_classes, alphas, groups, accuracy, size_bins))


def _group_size(i: int) -> Callable[[SetStats], torch.Tensor]:
    return lambda st: st.group_size[..., i]


for _m in (
    SummaryMetric("accuracy", SetStats.top1_accuracy, "accuracy", False, paired=True, summary_column="accuracy"),
    SummaryMetric("coverage", SetStats.coverage, "coverage", None, std=True, paired=True),
    SummaryMetric("size", SetStats.average_size, "size", True, "{:.2f}", std=True, paired=True),
    SummaryMetric("covgap", SetStats.covgap, "CovGap", True, "{:.2f}", std=True, paired=True, diff_fmt="{:+.2f}"),
    SummaryMetric("undercovered", SetStats.undercovered, "under-covered", True),
    SummaryMetric("sscv", SetStats.sscv, "SSCV", True),
    *(SummaryMetric(f"{g}_size", _group_size(i), f"{g}-shot size", True, "{:.2f}", paired=True)
      for i, g in enumerate(SHOT_GROUPS)),
):
    register_metric(_m)
del _m
_BUILTIN_PAIRED = tuple(_PAIRED_ORDER)
