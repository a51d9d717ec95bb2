"""Metrics of prediction sets, vectorised over samples (no Python loop over samples or classes).

Per-class quantities are NaN for classes absent from ``labels``; summaries average over present classes.
"""
from __future__ import annotations

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
