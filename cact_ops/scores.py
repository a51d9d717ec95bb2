"""Non-conformity scores s(x, k): higher means less conforming (DESIGN.md section 1), and their registry.

The score functions (and calling a :class:`Score`) take class probabilities ``probs`` of shape [n, K] and return
scores of the same shape, so a threshold applies column-wise (standard or class-wise). From logits, as TorchCP's
scores take them, use :meth:`Score.from_logits` (softmax, then the score exactly as the evaluation engine
computes it): ``score_object("aps").from_logits(logits)``. ``logprob`` is the training-time *conformity* score
(higher = more conforming), used by the smooth operators and losses; it takes logits.

The functions (``lac``, ``aps``, ``raps``) are the definitions. The evaluation engine (:mod:`cact_ops.engine`)
uses them through :class:`Score` objects, registered by name in ``SCORE_REGISTRY`` (``SCORES`` / ``get_score``
give the plain functions): a score object gives the class-ordered scores, and where the score is monotone in
the probability rank, also the rank-ordered scores of the engine's fast path (a standard set is then a prefix
of the classes ranked by probability, so its size is a binary search). A score that is not monotone in rank
is added with ``register_score(Score(name, fn))`` and is evaluated through its class-ordered scores.
"""
from __future__ import annotations

from typing import Callable

import torch

from ._checks import check_matrix, check_probs
from .ranking import rank_pool


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities of logits [n, K], as the evaluation engine and :meth:`Score.from_logits` compute them.

    With fewer than 16 classes on a CPU, written out: torch's CPU softmax runs a scalar loop over rows that short
    (10,000 x 10: 0.89 ms against 0.17 ms; at 10,000 x 16 both 0.15 ms; benchmarks/cpu_kernels.py).

    >>> softmax(torch.tensor([[0.0, 0.0], [2.0, 0.0]])).round(decimals=4)
    tensor([[0.5000, 0.5000],
            [0.8808, 0.1192]])
    """
    if logits.shape[1] >= 16 or logits.device.type != "cpu":
        return torch.softmax(logits, dim=1)
    e = (logits - logits.amax(dim=1, keepdim=True)).exp_()
    return e.div_(e.sum(dim=1, keepdim=True))


def lac(probs: torch.Tensor) -> torch.Tensor:
    """LAC / THR score s(x, k) = 1 - p_k (Sadinle et al. 2019).

    >>> lac(torch.tensor([[0.7, 0.2, 0.1]]))
    tensor([[0.3000, 0.8000, 0.9000]])
    """
    return _lac(check_probs(probs))


def _lac(probs: torch.Tensor) -> torch.Tensor:
    return 1.0 - probs


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


# ----------------------------------------------------------------------------------------------------------
# Score objects and the registry


class Score:
    """A hard non-conformity score as the evaluation engine uses it: a name and its function
    ``fn(probs, **params)`` (``fn(probs, u=u, **params)`` when ``randomized``), giving class-ordered scores.

    The base class is the general case: any score, in particular one that is not monotone in the probability
    rank, evaluated through its class-ordered scores (standard set sizes by one comparison pass per threshold).
    Subclasses with ``rank_monotone = True`` also give :meth:`rank_scores`, non-decreasing along each row of the
    classes ranked by probability, which the engine uses for standard set sizes (a binary search per row).

    >>> toy = Score("toy", lambda p: 1.0 - p ** 2)
    >>> toy(torch.tensor([[0.5, 0.5]]))
    tensor([[0.7500, 0.7500]])
    """

    rank_monotone = False  # rank_scores() exists and each of its rows is non-decreasing
    from_ranks = False  # class_scores() scatter rank_scores() back (needs RankedPool.order)
    elementwise = False  # class_scores(p)[i, k] depends on p[i, k] alone (the engine may score a subset of entries)

    def __init__(self, name: str, fn: Callable[..., torch.Tensor], randomized: bool = False):
        self.name, self.fn, self.randomized = name, fn, randomized

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def __call__(self, probs: torch.Tensor, u=None, **params) -> torch.Tensor:
        """The score function itself (validated input): class-ordered scores [n, K] of probabilities (of
        logits: :meth:`from_logits`)."""
        return self.fn(probs, u=u, **params) if self.randomized else self.fn(probs, **params)

    def class_scores(self, probs: torch.Tensor, u: torch.Tensor | None = None, ranked=None,
                     s_rank: torch.Tensor | None = None, **params) -> torch.Tensor:
        """Class-ordered scores [n, K] (column k = class k) of softmax probabilities. ``ranked`` (a
        :class:`cact_ops.ranking.RankedPool`) and ``s_rank`` (this score's :meth:`rank_scores`) are given by
        the engine when it has them, for scores that derive the class order from the rank order."""
        return self(probs, u, **params)

    def rank_scores(self, ranked, u: torch.Tensor | None = None, **params) -> torch.Tensor:
        """Rank-ordered scores [n, K] (column r = the class with the r-th largest probability), rows
        non-decreasing. Only for ``rank_monotone`` scores."""
        raise NotImplementedError(f"score {self.name!r} is not monotone in rank: use class_scores")

    def from_logits(self, logits: torch.Tensor, u=None, generator: torch.Generator | None = None,
                    **params) -> torch.Tensor:
        """Class-ordered scores [n, K] of ``logits`` (TorchCP's convention): softmax over classes, then the score
        computed as the evaluation engine computes it, so the numbers equal the engine's bit for bit for the same
        rows, U and dtype (APS/RAPS from one sort of each row, :mod:`cact_ops.ranking`; tied probabilities share
        their group's score there, where :func:`aps` breaks ties by class index).

        For randomized scores ``u`` is U per row: None draws one U ~ Unif(0, 1) per row from ``generator``,
        ``1.0`` gives the non-randomised score, a tensor [n] (or [n, 1]) is used as is; deterministic scores
        ignore it. Hard scores for calibration and prediction: no gradient flows (training uses
        :func:`logprob` and :mod:`cact_ops.smooth`).

        >>> score_object("aps").from_logits(torch.tensor([[2.0, 1.0, 0.0]]), u=1.0)
        tensor([[0.6652, 0.9100, 1.0000]])
        >>> score_object("lac").from_logits(torch.zeros(1, 2))
        tensor([[0.5000, 0.5000]])
        """
        probs = softmax(check_matrix(logits, "logits").detach())
        n = probs.shape[0]
        if self.randomized:
            u = _uniform(probs, u, generator).expand(n, 1).reshape(n)
        if not self.from_ranks:
            return self.class_scores(probs, u, **params)
        # rank_pool also ranks each row's label (the engine's true-class rank); the class order does not read it.
        ranked = rank_pool(probs, torch.zeros(n, dtype=torch.long, device=probs.device), need_order=True)
        return self.class_scores(probs, u, ranked=ranked, **params)


class LAC(Score):
    """LAC through :func:`lac`: 1 - p is decreasing in p, so 1 - (sorted probabilities) is rank-ordered."""

    rank_monotone = True
    elementwise = True

    def __init__(self):
        super().__init__("lac", lac)

    def class_scores(self, probs, u=None, ranked=None, s_rank=None, **params):
        return _lac(probs)  # the engine's own softmax: no validation pass

    def rank_scores(self, ranked, u=None, **params):
        return _lac(ranked.desc)  # tied probabilities already share their score


class APS(Score):
    """APS through :func:`aps`; the engine computes it in rank order from one sort of each row.

    Rank order: the exclusive cumulative mass of the higher ranks + U p (the exclusive sum, not cumsum - p, so
    each row is non-decreasing exactly, also in floating point). A tied class gets the score of its tie group's
    first rank (:meth:`cact_ops.ranking.RankedPool.share_ties`), so the score depends on the probabilities only,
    as :func:`aps` defines it, whatever order the sort put ties in. Class order: the rank-ordered scores
    scattered back.
    """

    rank_monotone = True
    from_ranks = True

    def __init__(self, name: str = "aps", fn=aps):
        super().__init__(name, fn, randomized=True)

    def _penalty(self, s: torch.Tensor, **params) -> None:
        """In-place addition of a rank penalty to the rank-ordered scores ``s`` (none for APS)."""

    def rank_scores(self, ranked, u=None, **params):
        d = ranked.desc
        u = torch.ones(d.shape[0], dtype=d.dtype, device=d.device) if u is None else u.to(d.device, d.dtype)
        s = torch.empty_like(d)
        s[:, 0] = 0
        torch.cumsum(d[:, :-1], dim=1, out=s[:, 1:])  # exclusive cumulative mass: sum of strictly higher ranks
        s.addcmul_(u[:, None], d)
        self._penalty(s, **params)
        ranked.share_ties(s)
        return s

    def class_scores(self, probs, u=None, ranked=None, s_rank=None, **params):
        if ranked is None:
            return super().class_scores(probs, u, **params)
        return ranked.to_class_order(self.rank_scores(ranked, u, **params) if s_rank is None else s_rank)


class RAPS(APS):
    """RAPS through :func:`raps`: APS + lam * max(0, rank - k_reg), rank 1-based (non-decreasing in rank)."""

    def __init__(self):
        super().__init__("raps", raps)

    def _penalty(self, s, lam: float = 0.01, k_reg: int = 5, **params):
        if lam < 0 or k_reg < 0:
            raise ValueError(f"lam and k_reg must be >= 0, got {lam}, {k_reg}")
        rank = torch.arange(1, s.shape[1] + 1, device=s.device, dtype=s.dtype)
        s += lam * (rank - k_reg).clamp(min=0)


# name -> Score; SCORES is its view of plain functions (name -> fn), kept in step by register/unregister.
SCORE_REGISTRY: dict[str, Score] = {}
SCORES: dict[str, Callable[..., torch.Tensor]] = {}


def register_score(score: Score, replace: bool = False) -> Score:
    """Add a score to the registry (and its function to ``SCORES``); the engine and the evaluation stage
    (``--scores``) then accept its name. Returns ``score``.

    >>> _ = register_score(Score("sq", lambda p: 1.0 - p ** 2)); sorted(SCORES)
    ['aps', 'lac', 'raps', 'sq']
    >>> unregister_score("sq")
    """
    if not isinstance(score, Score):
        raise TypeError(f"register_score needs a Score, got {type(score).__name__}")
    if not score.name or not score.name.isidentifier():
        raise ValueError(f"a score name must be a non-empty identifier, got {score.name!r}")
    if score.name in SCORE_REGISTRY and not replace:
        raise ValueError(f"score {score.name!r} is already registered (replace=True to replace it)")
    SCORE_REGISTRY[score.name] = score
    SCORES[score.name] = score.fn
    return score


def unregister_score(name: str) -> None:
    """Remove a score from the registry (``KeyError`` if it is not there)."""
    del SCORE_REGISTRY[name]
    del SCORES[name]


def score_object(name) -> Score:
    """The registered :class:`Score` called ``name`` (a Score is returned as is)."""
    if isinstance(name, Score):
        return name
    try:
        return SCORE_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown score {name!r}; known scores: {sorted(SCORE_REGISTRY)}") from None


for _score in (LAC(), APS(), RAPS()):
    register_score(_score)
del _score


def get_score(name: str):
    """Look a hard non-conformity score function up by name ("lac", "aps", "raps", or a registered one)."""
    try:
        return SCORES[name]
    except KeyError:
        raise ValueError(f"unknown score {name!r}; known scores: {sorted(SCORES)}") from None
