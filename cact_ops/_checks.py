"""Input validation shared by every ``cact_ops`` function: one clear ``ValueError`` naming the argument."""
from __future__ import annotations

import math
import numbers

import torch


def is_real(v) -> bool:
    """A finite real number, not a bool.

    >>> is_real(0.5), is_real(float("nan")), is_real(True)
    (True, False, False)
    """
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def is_count(v) -> bool:
    """An integer >= 0, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """Return ``alpha`` as a float if it lies in the open interval (0, 1)."""
    a = float(alpha)
    if not 0.0 < a < 1.0:
        raise ValueError(f"{name} must lie in the open interval (0, 1), got {alpha!r}")
    return a


def check_matrix(x: torch.Tensor, name: str, *, finite: bool = True) -> torch.Tensor:
    """``x`` must be a floating-point tensor of shape [n, K] with K >= 2 (and finite unless told otherwise)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [n, K], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes (columns), got shape {tuple(x.shape)}")
    if finite and x.numel() and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or inf values in {bad} of {x.shape[0]} rows")
    return x


def check_probs(probs: torch.Tensor, name: str = "probs") -> torch.Tensor:
    """Probabilities: finite [n, K], entries in [0, 1], rows summing to 1 (within float tolerance)."""
    check_matrix(probs, name)
    if probs.numel():
        if (probs < 0).any() or (probs > 1).any():
            raise ValueError(f"{name} must lie in [0, 1]; pass softmax(logits), not logits")
        tol = 1e-3 if probs.dtype in (torch.float16, torch.bfloat16) else 1e-4
        if ((probs.sum(dim=1) - 1).abs() > tol * probs.shape[1]).any():
            raise ValueError(f"{name} rows must sum to 1; pass softmax(logits), not logits")
    return probs


def check_labels(labels: torch.Tensor, n: int, num_classes: int, name: str = "labels") -> torch.Tensor:
    """Integer labels of shape [n] with values in [0, num_classes)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}), got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels.long()


def check_sets(sets: torch.Tensor, name: str = "sets") -> torch.Tensor:
    """Prediction sets: bool [m, K]."""
    if not isinstance(sets, torch.Tensor) or sets.dim() != 2 or sets.dtype != torch.bool:
        shape = tuple(sets.shape) if isinstance(sets, torch.Tensor) else type(sets).__name__
        dtype = sets.dtype if isinstance(sets, torch.Tensor) else None
        raise ValueError(f"{name} must be a bool tensor of shape [m, K], got {shape} with dtype {dtype}")
    return sets
