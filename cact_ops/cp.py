"""Hard split conformal prediction: the finite-sample quantile, calibration and set construction.

Standard CP uses one threshold q̂ = the ceil((n+1)(1-alpha))-th smallest calibration score, giving
P(Y in C(X)) >= 1 - alpha for exchangeable data. Class-wise (Mondrian) CP computes one q̂_k per class from the
calibration points of class k and gives P(Y in C(X) | Y = k) >= 1 - alpha. Class-conditioning is an argument
(``classwise=True``), not a separate code path for the user.

:func:`thresholds` is the batched form the evaluation engine uses: the thresholds of R calibration splits and
A alphas from one sort; :func:`classwise_quantile` is its one-split, one-alpha case.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

from ._checks import check_alpha, check_labels, check_matrix
from .ranking import _numpy_path

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
    q = thresholds(s[None], labels, [alpha], num_classes, classwise=True)[0][0, 0]
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    ok = torch.tensor([conformal_rank(int(c), alpha) <= int(c) for c in counts.tolist()])
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


def thresholds(cal_scores: torch.Tensor, cal_labels: torch.Tensor, alphas: Sequence[float], num_classes: int,
               classwise: bool):
    """Conformal thresholds for R calibration splits at once: [R, A] (standard) or [R, A, K] (class-wise), and
    the share of +inf thresholds per alpha ([A], float64). No warnings: the caller reports the +inf share.

    ``cal_scores`` [R, n_cal] are true-class scores with the same label sequence ``cal_labels`` [n_cal] in every
    row (the layout of :func:`cact_ops.engine.split_indices`). Ranks come from :func:`conformal_rank`; a rank
    above the number of (class) calibration points gives +inf (full sets).

    >>> q, inf = thresholds(torch.tensor([[0.3, 0.1, 0.2]], dtype=torch.float64), torch.tensor([0, 0, 1]),
    ...                     [0.4], 2, classwise=False)
    >>> q.tolist(), inf.tolist()
    ([[0.3]], [0.0])
    """
    r, n_cal = cal_scores.shape
    if _numpy_path(cal_scores) and n_cal:
        return _thresholds_numpy(cal_scores, cal_labels, alphas, num_classes, classwise)
    inf = torch.tensor(float("inf"), dtype=cal_scores.dtype, device=cal_scores.device)
    if not classwise:
        ranks = [conformal_rank(n_cal, a) for a in alphas]
        srt = cal_scores.sort(dim=1).values
        q = torch.stack([srt[:, k - 1] if k <= n_cal else inf.expand(r) for k in ranks], dim=1)
        return q, torch.tensor([float(k > n_cal) for k in ranks], dtype=torch.float64)
    counts = torch.bincount(cal_labels.cpu(), minlength=num_classes)
    starts = counts.cumsum(0) - counts
    vals, idx = cal_scores.sort(dim=1, stable=True)
    # Stable re-sort by class: scores ascending inside each class's block, blocks at fixed positions.
    by_class = vals.gather(1, cal_labels.to(idx.device)[idx].argsort(dim=1, stable=True))
    qs, fracs = [], []
    for a in alphas:
        ranks = torch.tensor([conformal_rank(int(c), a) for c in counts.tolist()])
        ok = ranks <= counts
        pos = (starts + ranks - 1).clamp(0, max(n_cal - 1, 0)).to(cal_scores.device)
        picked = by_class[:, pos] if n_cal else inf.expand(r, num_classes)
        qs.append(torch.where(ok.to(cal_scores.device), picked, inf))
        fracs.append(float((~ok).double().mean()))
    return torch.stack(qs, dim=1), torch.tensor(fracs, dtype=torch.float64)


def _thresholds_numpy(cal_scores: torch.Tensor, cal_labels: torch.Tensor, alphas: Sequence[float], num_classes: int,
                      classwise: bool):
    """:func:`thresholds` on the CPU through NumPy, the same numbers: a k-th smallest value does not depend on
    the algorithm that finds it. Standard: one ``np.partition`` at every rank needed (linear time, where the
    torch path sorts every row); class-wise: NumPy's sorts (a radix sort for the class keys)."""
    r, n_cal = cal_scores.shape
    x = cal_scores.detach().numpy()
    if not classwise:
        ranks = [conformal_rank(n_cal, a) for a in alphas]
        kth = sorted({k - 1 for k in ranks if k <= n_cal})
        part = np.partition(x, kth, axis=1) if kth else x
        q = np.full((r, len(ranks)), np.inf, dtype=x.dtype)
        for j, k in enumerate(ranks):
            if k <= n_cal:
                q[:, j] = part[:, k - 1]
        return torch.from_numpy(q), torch.tensor([float(k > n_cal) for k in ranks], dtype=torch.float64)
    lab = cal_labels.detach().cpu().numpy()
    counts_np = np.bincount(lab, minlength=num_classes)
    starts = counts_np.cumsum() - counts_np
    if n_cal > 1 and bool((lab[1:] >= lab[:-1]).all()):
        # Labels grouped by class (the engine's layout): sorting (label, score) pairs is sorting each class's
        # block; one sort of the scores offset per class block does it when the offsets keep blocks apart.
        by_class = _sort_blocks(x, lab, counts_np)
    else:
        idx = np.argsort(x, axis=1, kind="stable")
        keys = lab.astype(np.int16 if num_classes < 2**15 else np.int64)[idx]
        by_class = np.take_along_axis(x, np.take_along_axis(idx, np.argsort(keys, axis=1, kind="stable"), 1), 1)
    qs, fracs = [], []
    for a in alphas:
        ranks = np.array([conformal_rank(int(c), a) for c in counts_np.tolist()], dtype=np.int64)
        ok = ranks <= counts_np
        pos = np.clip(starts + ranks - 1, 0, max(n_cal - 1, 0))
        qs.append(np.where(ok, by_class[:, pos], np.array(np.inf, dtype=x.dtype)))
        fracs.append(float((~ok).mean()))
    return torch.from_numpy(np.stack(qs, axis=1).astype(x.dtype, copy=False)), torch.tensor(fracs, dtype=torch.float64)


def _sort_blocks(x: np.ndarray, lab: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each row of ``x`` [R, n] sorted inside each block of equal (grouped, ascending) labels ``lab`` [n]."""
    out = np.empty_like(x)
    nonempty = np.flatnonzero(counts)
    if len(nonempty) <= 64:  # few classes: one sort per block
        start = 0
        for k in nonempty:
            c = int(counts[k])
            out[:, start:start + c] = np.sort(x[:, start:start + c], axis=1)
            start += c
        return out
    # Many classes: argsort of the scores, then a stable radix sort of the class keys in that order.
    idx = np.argsort(x, axis=1)
    keys = lab.astype(np.int16 if int(lab.max()) < 2**15 else np.int64)[idx]
    return np.take_along_axis(x, np.take_along_axis(idx, np.argsort(keys, axis=1, kind="stable"), 1), 1)


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
