"""Hard split conformal prediction: the finite-sample quantile, calibration and set construction.

Standard CP uses one threshold q̂ = the ceil((n+1)(1-alpha))-th smallest calibration score, giving
P(Y in C(X)) >= 1 - alpha for exchangeable data. Class-wise (Mondrian) CP computes one q̂_k per class from the
calibration points of class k and gives P(Y in C(X) | Y = k) >= 1 - alpha. Class-conditioning is an argument
(``classwise=True``), not a separate code path for the user.
"""
from __future__ import annotations

import math
import warnings

import torch

from ._checks import check_alpha, check_labels, check_matrix

# (n+1)(1-alpha) is often an integer in exact arithmetic (n=99, alpha=0.1) but not in floating point;
# without this slack ceil() would pick the next rank and over-cover.
_RANK_EPS = 1e-9


def conformal_rank(n: int, alpha: float) -> int:
    """1-based rank ceil((n+1)(1-alpha)) of the conformal quantile among n calibration scores.

    >>> conformal_rank(99, 0.1)
    90
    """
    return math.ceil((n + 1) * (1 - check_alpha(alpha)) - _RANK_EPS)


def conformal_quantile(true_class_scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """The ceil((n+1)(1-alpha))-th smallest score; ``+inf`` (with a warning) when that rank exceeds n.

    >>> conformal_quantile(torch.arange(1.0, 10.0), 0.2)
    tensor(8.)
    """
    s = true_class_scores
    if not isinstance(s, torch.Tensor) or s.dim() != 1:
        raise ValueError(f"true_class_scores must be a 1-D tensor, got {getattr(s, 'shape', type(s))}")
    n = s.shape[0]
    if n == 0:
        raise ValueError("empty calibration set: true_class_scores has no elements")
    if torch.isnan(s).any():
        raise ValueError("true_class_scores contains NaN")
    k = conformal_rank(n, alpha)
    if k > n:
        warnings.warn(
            f"calibration set too small for alpha={alpha}: rank {k} > n={n}; threshold is +inf (full sets)",
            stacklevel=2,
        )
        return torch.tensor(float("inf"), dtype=s.dtype, device=s.device)
    return s.kthvalue(k).values


def true_class_scores(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pick s(x_i, y_i) from an [n, K] score matrix."""
    return scores.gather(1, labels[:, None]).squeeze(1)


def classwise_quantile(s: torch.Tensor, labels: torch.Tensor, num_classes: int, alpha: float) -> torch.Tensor:
    """Per-class conformal quantiles, vectorised: sort by (label, score) and index each class's rank.

    Classes with no calibration point, or too few for ``alpha``, get ``+inf`` with one warning.

    >>> classwise_quantile(torch.tensor([0.1, 0.9, 0.3, 0.2, 0.5]), torch.tensor([0, 0, 0, 1, 1]), 2, alpha=0.5)
    tensor([0.3000, 0.5000])
    """
    if not isinstance(s, torch.Tensor) or s.dim() != 1:
        raise ValueError(f"s must be a 1-D tensor of true-class scores, got {getattr(s, 'shape', type(s))}")
    if s.shape[0] == 0:
        raise ValueError("empty calibration set: s has no elements")
    if torch.isnan(s).any():
        raise ValueError("s contains NaN")
    labels = check_labels(labels, s.shape[0], num_classes)
    alpha = check_alpha(alpha)
    # Sort scores, then stable-sort by label: the result is grouped by class and ascending inside each class.
    by_score = s.argsort(stable=True)
    by_label = labels[by_score].argsort(stable=True)
    sorted_s = s[by_score][by_label]
    counts = torch.bincount(labels, minlength=num_classes)
    starts = counts.cumsum(0) - counts
    ranks = torch.ceil((counts + 1).to(torch.float64) * (1 - alpha) - _RANK_EPS).long()
    ok = ranks <= counts
    idx = (starts + ranks - 1).clamp(min=0, max=max(s.shape[0] - 1, 0))
    q = torch.full((num_classes,), float("inf"), dtype=s.dtype, device=s.device)
    if s.shape[0]:
        q = torch.where(ok, sorted_s[idx], q)
    if not ok.all():
        missing = (~ok).nonzero().flatten().tolist()
        empty = [k for k in missing if counts[k] == 0]
        warnings.warn(
            f"class-wise calibration: {len(missing)} classes have too few calibration points for "
            f"alpha={alpha} (of them {len(empty)} have none): threshold +inf, full sets for "
            f"classes {missing[:20]}{'...' if len(missing) > 20 else ''}",
            stacklevel=3,
        )
    return q


def calibrate(
    cal_scores: torch.Tensor,
    cal_labels: torch.Tensor,
    alpha: float,
    classwise: bool = False,
) -> torch.Tensor:
    """Conformal threshold from calibration data: a scalar, or one per class ([K]) when ``classwise``.

    >>> scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    >>> calibrate(scores, torch.tensor([0, 1, 0, 1]), alpha=0.4)
    tensor(0.3000)
    """
    check_matrix(cal_scores, "cal_scores", finite=False)
    if torch.isnan(cal_scores).any():
        raise ValueError("cal_scores contains NaN")
    n, num_classes = cal_scores.shape
    if n == 0:
        raise ValueError("empty calibration set: cal_scores has 0 rows")
    labels = check_labels(cal_labels, n, num_classes, "cal_labels")
    alpha = check_alpha(alpha)
    s = true_class_scores(cal_scores, labels)
    if classwise:
        return classwise_quantile(s, labels, num_classes, alpha)
    return conformal_quantile(s, alpha)


def predict_sets(scores: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Prediction sets C(x) = {k : s(x, k) <= q̂_k} as a bool [m, K] mask (q̂ scalar or per class).

    >>> predict_sets(torch.tensor([[0.1, 0.5], [0.4, 0.2]]), torch.tensor(0.3))
    tensor([[ True, False],
            [False,  True]])
    """
    check_matrix(scores, "scores", finite=False)
    if torch.isnan(scores).any():
        raise ValueError("scores contains NaN")
    threshold = torch.as_tensor(threshold, dtype=scores.dtype, device=scores.device)
    if torch.isnan(threshold).any():
        raise ValueError("threshold contains NaN")
    if threshold.dim() == 1 and threshold.shape[0] != scores.shape[1]:
        raise ValueError(
            f"threshold has {threshold.shape[0]} entries but scores have {scores.shape[1]} classes"
        )
    if threshold.dim() > 1:
        raise ValueError(f"threshold must be a scalar or shape [K], got shape {tuple(threshold.shape)}")
    return scores <= threshold
