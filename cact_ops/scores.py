"""Non-conformity scores s(x, k): higher means less conforming (DESIGN.md section 1).

All scores take class probabilities ``probs`` of shape [n, K] and return scores of the same shape, so a
threshold applies column-wise (standard or class-wise). ``logprob`` is the training-time *conformity* score
(higher = more conforming), used by the smooth operators and losses.
"""
from __future__ import annotations

import torch

from ._checks import check_matrix, check_probs


def lac(probs: torch.Tensor) -> torch.Tensor:
    """LAC / THR score s(x, k) = 1 - p_k (Sadinle et al. 2019).

    >>> lac(torch.tensor([[0.7, 0.2, 0.1]]))
    tensor([[0.3000, 0.8000, 0.9000]])
    """
    return 1.0 - check_probs(probs)


def _uniform(probs: torch.Tensor, u, generator: torch.Generator | None) -> torch.Tensor:
    """U for APS/RAPS: a tensor broadcastable to [n, 1]; one draw per sample when ``u`` is None."""
    if u is None:
        return torch.rand(probs.shape[0], 1, generator=generator, dtype=probs.dtype).to(probs.device)
    u = torch.as_tensor(u, dtype=probs.dtype, device=probs.device)
    n = probs.shape[0]
    if u.dim() > 2 or (u.dim() >= 1 and u.shape[0] != n) or (u.dim() == 2 and u.shape[1] != 1):
        raise ValueError(f"u must be a scalar or have shape [{n}] or [{n}, 1], got shape {tuple(u.shape)}")
    if u.dim() == 1:
        u = u[:, None]
    if not ((u >= 0) & (u <= 1)).all():  # also rejects NaN
        raise ValueError("u must lie in [0, 1] (1.0 = non-randomised APS)")
    return u


def _aps_parts(probs: torch.Tensor):
    """Exclusive cumulative mass above each class and its 1-based rank, both in original class order.

    Ties are broken by class index (stable sort), so tied classes get reproducible scores on every device.
    """
    sorted_p, order = probs.sort(dim=1, descending=True, stable=True)
    above_sorted = sorted_p.cumsum(dim=1) - sorted_p  # mass of strictly higher-ranked classes
    ranks_sorted = torch.arange(1, probs.shape[1] + 1, device=probs.device, dtype=probs.dtype).expand_as(probs)
    above = torch.empty_like(probs).scatter_(1, order, above_sorted)
    rank = torch.empty_like(probs).scatter_(1, order, ranks_sorted)
    return above, rank


def aps(probs: torch.Tensor, u=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """APS score s(x, k) = sum_{j ranked above k} p_j + U * p_k (Romano et al. 2020).

    ``u=None`` draws U ~ Unif(0, 1) once per sample (randomised APS, from ``generator``); ``u=1.0`` gives the
    non-randomised score; a tensor of shape [n] or [n, 1] is used as is.

    >>> aps(torch.tensor([[0.7, 0.2, 0.1]]), u=1.0)
    tensor([[0.7000, 0.9000, 1.0000]])
    """
    check_probs(probs)
    above, _ = _aps_parts(probs)
    return above + _uniform(probs, u, generator) * probs


def raps(
    probs: torch.Tensor,
    lam: float = 0.01,
    k_reg: int = 5,
    u=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RAPS score = APS + lam * max(0, rank(k) - k_reg), rank 1-based (Angelopoulos et al. 2021).

    Defaults lam=0.01, k_reg=5; the CLIP-Conformal setting is lam=0.001, k_reg=1.

    >>> raps(torch.tensor([[0.7, 0.2, 0.1]]), lam=0.5, k_reg=1, u=1.0)
    tensor([[0.7000, 1.4000, 2.0000]])
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if k_reg < 0:
        raise ValueError(f"k_reg must be >= 0, got {k_reg}")
    check_probs(probs)
    above, rank = _aps_parts(probs)
    return above + _uniform(probs, u, generator) * probs + lam * (rank - k_reg).clamp(min=0)


def logprob(logits: torch.Tensor) -> torch.Tensor:
    """Training-time conformity score E(x, k) = log softmax(logits)_k (higher = more conforming).

    >>> logprob(torch.zeros(1, 2)).exp()
    tensor([[0.5000, 0.5000]])
    """
    return torch.log_softmax(check_matrix(logits, "logits"), dim=1)


SCORES = {"lac": lac, "aps": aps, "raps": raps}


def get_score(name: str):
    """Look a hard non-conformity score up by name ("lac", "aps", "raps")."""
    try:
        return SCORES[name]
    except KeyError:
        raise ValueError(f"unknown score {name!r}; known scores: {sorted(SCORES)}") from None
