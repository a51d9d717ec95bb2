"""Metrics of prediction sets, vectorised over samples (no Python loop over samples or classes).

Per-class quantities are NaN for classes absent from ``labels``; summaries average over present classes.
:func:`paired_difference` compares two methods over the same calibration/test splits (a Student-t interval,
with the t quantile computed here: ``cact_ops`` does not depend on SciPy).
"""
from __future__ import annotations

import functools
import math

import torch

from ._checks import check_alpha, check_labels, check_matrix, check_sets

# Size strata of Angelopoulos et al. (RAPS) for SSCV: [0,1], [2,3], [4,10], [11,100], [101,1000], [1001, inf).
DEFAULT_SIZE_BINS = (1, 3, 10, 100, 1000)


def _covered(sets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    check_sets(sets)
    labels = check_labels(labels, sets.shape[0], sets.shape[1])
    return sets.gather(1, labels[:, None]).squeeze(1)


def coverage(sets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose true label is in the set.

    >>> coverage(torch.tensor([[True, False], [True, True]]), torch.tensor([1, 1]))
    tensor(0.5000)
    """
    return _covered(sets, labels).float().mean()


def average_size(sets: torch.Tensor) -> torch.Tensor:
    """Mean set size.

    >>> average_size(torch.tensor([[True, False], [True, True]]))
    tensor(1.5000)
    """
    return check_sets(sets).sum(dim=1).float().mean()


def _per_class_mean(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float32)
    sums = torch.zeros(num_classes, dtype=torch.float32, device=values.device)
    sums.index_add_(0, labels, values.to(torch.float32))
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))


def class_coverage(sets: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Coverage per true class, shape [K]; NaN where a class has no sample.

    >>> class_coverage(torch.tensor([[True, False], [False, True], [True, False]]), torch.tensor([0, 0, 1]), 2)
    tensor([0.5000, 0.0000])
    """
    _check_k(sets, num_classes)
    return _per_class_mean(_covered(sets, labels), labels.long(), num_classes)


def class_size(sets: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean set size per true class, shape [K]; NaN where a class has no sample."""
    _check_k(sets, num_classes)
    check_labels(labels, sets.shape[0], num_classes)
    return _per_class_mean(sets.sum(dim=1), labels.long(), num_classes)


def _check_k(sets: torch.Tensor, num_classes: int) -> None:
    check_sets(sets)
    if sets.shape[1] != num_classes:
        raise ValueError(f"sets have {sets.shape[1]} classes but num_classes={num_classes}")


def covgap(sets: torch.Tensor, labels: torch.Tensor, alpha: float, num_classes: int) -> torch.Tensor:
    """CovGap = 100 x mean over present classes of |class coverage - (1 - alpha)| (Ding et al. 2023).

    >>> covgap(torch.tensor([[True, False], [False, True]]), torch.tensor([0, 0]), 0.1, 2)
    tensor(40.0000)
    """
    alpha = check_alpha(alpha)
    cov = class_coverage(sets, labels, num_classes)
    return 100.0 * (cov - (1 - alpha)).abs().nanmean()


def undercovered_ratio(
    sets: torch.Tensor, labels: torch.Tensor, alpha: float, num_classes: int, tolerance: float = 0.0
) -> torch.Tensor:
    """Fraction of present classes whose coverage is below 1 - alpha - tolerance.

    >>> undercovered_ratio(torch.tensor([[True, False], [False, True]]), torch.tensor([0, 1]), 0.1, 2)
    tensor(0.)
    """
    alpha = check_alpha(alpha)
    cov = class_coverage(sets, labels, num_classes)
    present = ~torch.isnan(cov)
    return ((cov < 1 - alpha - tolerance) & present).sum().float() / present.sum().clamp(min=1)


def sscv(
    sets: torch.Tensor, labels: torch.Tensor, alpha: float, size_bins=DEFAULT_SIZE_BINS
) -> torch.Tensor:
    """Size-stratified coverage violation: max over non-empty size strata of |coverage - (1 - alpha)|.

    ``size_bins`` are the inclusive upper edges of the strata (default [0,1], [2,3], [4,10], [11,100], ...).

    >>> sscv(torch.tensor([[True, False], [True, True]]), torch.tensor([1, 1]), 0.1)
    tensor(0.9000)
    """
    alpha = check_alpha(alpha)
    covered = _covered(sets, labels).float()
    sizes = sets.sum(dim=1)
    edges = torch.as_tensor(size_bins, device=sets.device, dtype=sizes.dtype)
    stratum = torch.bucketize(sizes, edges, right=False)  # size <= edge[i] -> stratum i
    n_strata = len(size_bins) + 1
    counts = torch.bincount(stratum, minlength=n_strata).float()
    hits = torch.zeros(n_strata, device=sets.device).index_add_(0, stratum, covered)
    present = counts > 0
    viol = (hits[present] / counts[present] - (1 - alpha)).abs()
    return viol.max() if viol.numel() else torch.tensor(float("nan"))


SHOT_GROUPS = ("many", "medium", "few")


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
    labels = check_labels(labels, sets.shape[0], sets.shape[1])
    per_group = _per_class_mean(sets.sum(dim=1), groups[labels], 3)
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
