"""Smooth conformal operators for training (ConfTr, Stutz et al. ICLR 2022): a differentiable quantile and
soft prediction sets. Everything here works on *conformity* scores E(x, k) (higher = more conforming), so the
threshold is a lower quantile and C_k(x) = sigmoid((E(x, k) - tau) / T).
"""
from __future__ import annotations

import torch

try:
    import torchsort
except ImportError:  # a CE-only job (a backbone on a bare GPU machine) needs no soft sort: fail where one is used
    torchsort = None


def _interpolate(sorted_values: torch.Tensor, q: torch.Tensor | float) -> torch.Tensor:
    """Linear interpolation at position q * (n - 1) of ascending rows ([..., n]), as torch.quantile does."""
    n = sorted_values.shape[-1]
    pos = torch.as_tensor(q, dtype=sorted_values.dtype, device=sorted_values.device) * (n - 1)
    lo = pos.floor().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    w = pos - lo
    v_lo = sorted_values.gather(-1, lo.long().expand(*sorted_values.shape[:-1], 1)).squeeze(-1)
    v_hi = sorted_values.gather(-1, hi.long().expand(*sorted_values.shape[:-1], 1)).squeeze(-1)
    return v_lo + w * (v_hi - v_lo)


QUANTILE_OPERATORS = ("l2", "kl", "sigmoid")


def _sigmoid_quantile(rows: torch.Tensor, q: float, eps: float, weights: torch.Tensor | None) -> torch.Tensor:
    """The q-quantile of the sigmoid-smoothed CDF, F(t) = sum_i w_i sigmoid((t - s_i) / eps) / sum_i w_i = q: no
    sort. t is found by bisection without gradient; one Newton step with the gradient then gives the implicit
    function's derivative, dt/ds_i = w_i sigmoid'_i / sum_j w_j sigmoid'_j (the value stays t)."""
    w = torch.ones_like(rows) if weights is None else weights.to(rows)[None].expand_as(rows)
    with torch.no_grad():
        lo = rows.min(-1).values - 30 * eps
        hi = rows.max(-1).values + 30 * eps
        for _ in range(60):
            mid = (lo + hi) / 2
            below = (w * torch.sigmoid((mid[:, None] - rows) / eps)).sum(-1) / w.sum(-1) < q
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        t = (lo + hi) / 2
        z = torch.sigmoid((t[:, None] - rows) / eps)
        slope = (w * z * (1 - z)).sum(-1) / (w.sum(-1) * eps)
    cdf = (w * torch.sigmoid((t[:, None] - rows) / eps)).sum(-1) / w.sum(-1)
    return t - (cdf - q) / slope.clamp(min=1e-12)


def soft_quantile(values: torch.Tensor, q: float, regularization_strength: float = 0.1,
                  weights: torch.Tensor | None = None, operator: str = "l2") -> torch.Tensor:
    """Differentiable q-quantile: torchsort's soft sort, then linear interpolation at position q * (n - 1).

    ``operator``: torchsort's ``"l2"`` (default) or ``"kl"`` soft sort (computed in float64: its float32
    gradients can be NaN), or ``"sigmoid"``, which sorts nothing: the quantile of the CDF smoothed by a sigmoid
    of width ``regularization_strength`` (in score units).

    ``values`` is [n] (returns a scalar) or [B, n] (returns [B]). As ``regularization_strength`` goes to 0 the
    result equals ``torch.quantile(values, q)``; gradients flow to every value near the quantile.

    ``weights`` ([n], positive; 1-D ``values`` only) make it a weighted quantile, e.g. importance weights that
    let a long-tailed calibration batch stand for a balanced population: the j-th sorted value sits at the
    middle of its weight, P_j = (W_<j + w_j / 2 - w_0 / 2) / (W - w_0 / 2 - w_last / 2) (W_<j: the weight of the
    values below it, W: the total), which is j / (n - 1) for equal weights, so equal weights give exactly the
    unweighted quantile.

    >>> v = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0])
    >>> round(float(soft_quantile(v, 0.5, regularization_strength=1e-3)), 3)
    3.0
    >>> round(float(soft_quantile(v, 0.5, 1e-3, weights=torch.ones(5))), 3)
    3.0
    >>> round(float(soft_quantile(v, 0.5, 1e-3, weights=torch.tensor([1.0, 1.0, 1.0, 9.0, 1.0]))), 3)  # 5 weighs 9
    4.2
    """
    if not isinstance(values, torch.Tensor) or values.dim() not in (1, 2) or values.shape[-1] == 0:
        raise ValueError(f"values must be a non-empty tensor of shape [n] or [B, n], got {getattr(values, 'shape', values)}")
    if not values.is_floating_point():
        raise ValueError(f"values must be floating point, got {values.dtype}")
    if not 0.0 <= float(q) <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    if regularization_strength <= 0:
        raise ValueError(f"regularization_strength must be > 0, got {regularization_strength}")
    if not torch.isfinite(values).all():
        raise ValueError("values contain NaN or inf")
    if operator not in QUANTILE_OPERATORS:
        raise ValueError(f"operator must be one of {QUANTILE_OPERATORS}, got {operator!r}")
    rows = values if values.dim() == 2 else values[None]
    if operator == "sigmoid":
        out = _sigmoid_quantile(rows, float(q), regularization_strength, weights)
        return out if values.dim() == 2 else out[0]
    if torchsort is None:
        raise ImportError(f"the smooth quantile's {operator!r} operator needs torchsort, which is not installed: "
                          "see ../shared/ENVIRONMENT.md (a source build against the installed torch)")
    # torchsort wants 2-D [batch, n]; its "l2" regularisation keeps float32 gradients finite ("kl" can NaN).
    if operator == "kl":
        sorted_rows = torchsort.soft_sort(rows.double(), regularization="kl",
                                          regularization_strength=regularization_strength).to(rows.dtype)
    else:
        sorted_rows = torchsort.soft_sort(rows, regularization="l2", regularization_strength=regularization_strength)
    if weights is not None:
        return _weighted_position(sorted_rows[0], values, weights, float(q))
    out = _interpolate(sorted_rows, q)
    return out if values.dim() == 2 else out[0]


def _weighted_position(sorted_values: torch.Tensor, values: torch.Tensor, weights: torch.Tensor,
                       q: float) -> torch.Tensor:
    """Interpolate ``sorted_values`` at the position where the cumulative weight reaches q (see soft_quantile)."""
    if values.dim() != 1 or weights.shape != values.shape:
        raise ValueError(f"weights must have the shape of 1-D values {tuple(values.shape)}, got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights <= 0).any():
        raise ValueError("weights must be finite and > 0")
    n = values.shape[0]
    if n == 1:
        return sorted_values[0]
    # The hard order carries the weights (on the CPU: a few numbers); the soft-sorted values carry the gradient.
    w = weights.detach().to("cpu", torch.float64)[values.detach().argsort().cpu()]
    before = torch.cat([w.new_zeros(1), w.cumsum(0)[:-1]])
    positions = (before + (w - w[0]) / 2) / (w.sum() - (w[0] + w[-1]) / 2)
    j = int(torch.searchsorted(positions, torch.tensor([q], dtype=torch.float64), right=True).clamp(1, n - 1)) - 1
    frac = float(((q - positions[j]) / (positions[j + 1] - positions[j])).clamp(0, 1))
    return sorted_values[j] + frac * (sorted_values[j + 1] - sorted_values[j])


def soft_sets(conformity: torch.Tensor, tau: torch.Tensor | float, temperature: float = 1.0) -> torch.Tensor:
    """Soft set membership C_k(x) = sigmoid((E(x, k) - tau) / T), shape [m, K].

    ``tau`` is a scalar (one threshold) or [K] (class-wise thresholds, one per column).

    >>> soft_sets(torch.tensor([[0.0, -2.0]]), tau=-1.0, temperature=1e-3).round()
    tensor([[1., 0.]])
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if conformity.dim() != 2:
        raise ValueError(f"conformity must have shape [m, K], got {tuple(conformity.shape)}")
    if torch.isnan(conformity).any():
        raise ValueError("conformity contains NaN")
    tau = torch.as_tensor(tau, dtype=conformity.dtype, device=conformity.device)
    if tau.dim() > 1 or (tau.dim() == 1 and tau.shape[0] != conformity.shape[1]):
        raise ValueError(f"tau must be a scalar or shape [{conformity.shape[1]}], got shape {tuple(tau.shape)}")
    if torch.isnan(tau).any():
        raise ValueError("tau contains NaN")
    return torch.sigmoid((conformity - tau) / temperature)


def soft_size(conformity: torch.Tensor, tau: torch.Tensor | float, temperature: float = 1.0) -> torch.Tensor:
    """Soft set size S(x) = sum_k C_k(x), shape [m].

    >>> soft_size(torch.tensor([[0.0, -2.0, -0.5]]), tau=-1.0, temperature=1e-3)
    tensor([2.])
    """
    return soft_sets(conformity, tau, temperature).sum(dim=1)


def smooth_threshold_level(alpha: float, n_cal: int) -> float:
    """ConfTr's quantile level q = alpha * (1 + 1/n_cal) for the lower quantile of conformity scores."""
    return min(1.0, alpha * (1.0 + 1.0 / max(n_cal, 1)))


def smooth_threshold(true_scores: torch.Tensor, alpha: float, regularization_strength: float,
                     weights: torch.Tensor | None = None, operator: str = "l2") -> torch.Tensor:
    """ConfTr's smooth threshold tau: the soft lower quantile of true-class conformity scores at level
    alpha (1 + 1/n), optionally weighted (see :func:`soft_quantile`). Training and the dual step both use it.

    >>> round(float(smooth_threshold(torch.arange(10.0), 0.1, 1e-3)), 2)   # position 0.11 x 9
    0.99
    """
    q = smooth_threshold_level(alpha, true_scores.shape[-1])
    return soft_quantile(true_scores, q, regularization_strength, weights=weights, operator=operator)
