"""Split conformal predictors on logits, in TorchCP's shape: ``calibrate`` once, then ``predict`` or ``evaluate``.

:class:`SplitPredictor` gives standard split CP (one threshold q̂, P(Y in C(X)) >= 1 - alpha) and, with
``classwise=True``, class-wise (Mondrian) CP (one q̂_k per class, P(Y in C(X) | Y = k) >= 1 - alpha);
:class:`ClasswisePredictor` is that second case under TorchCP's name. They are an object layer over the functions
the evaluation engine (:func:`cact_ops.engine.evaluate_pool`) uses, not a second implementation: scores from
:meth:`cact_ops.scores.Score.from_logits`, thresholds from :func:`cact_ops.cp.thresholds`, sets from
:func:`cact_ops.cp.predict_sets`, metrics from the registry of :mod:`cact_ops.metrics`. On the same
calibration/test split with the same U, ``evaluate`` gives the engine's numbers bit for bit.

>>> _ = torch.manual_seed(0)
>>> logits = 3 * torch.randn(2000, 4); labels = torch.distributions.Categorical(logits=logits).sample()
>>> predictor = SplitPredictor("aps", alpha=0.1, seed=0).calibrate(logits[:1000], labels[:1000])
>>> predictor.predict(logits[1000:]).shape
torch.Size([1000, 4])
>>> m = predictor.evaluate(logits[1000:], labels[1000:])
>>> round(m["coverage"], 3), round(m["size"], 2), m["class_coverage"].shape
(0.918, 1.54, torch.Size([4]))
"""
from __future__ import annotations

import warnings
from typing import Mapping

import torch

from ._checks import check_alpha, check_labels, check_matrix
from .cp import conformal_rank, predict_sets, thresholds
from .metrics import METRIC_REGISTRY, SHOT_GROUPS, SetStats, compute_metrics, shot_groups
from .scores import SCORE_REGISTRY, Score

# Summary metrics that need the classes' training counts (shot groups): left out of evaluate() without them.
_SHOT_METRICS = tuple(f"{g}_size" for g in SHOT_GROUPS)


def _score_arg(score) -> Score:
    if isinstance(score, Score):
        return score
    if isinstance(score, str) and score in SCORE_REGISTRY:
        return SCORE_REGISTRY[score]
    raise ValueError(f"score must be a registered score name ({', '.join(sorted(SCORE_REGISTRY))}) or a "
                     f"cact_ops.scores.Score, got {score!r}")


class SplitPredictor:
    """Split conformal prediction from logits: ``calibrate(logits, labels)`` sets the threshold ``q_hat``,
    ``predict(logits)`` gives bool sets [n, K], ``evaluate(logits, labels)`` their metrics.

    Parameters
    ----------
    score : str or Score
        ``"aps"``, ``"lac"``, ``"raps"`` (or any name in :data:`cact_ops.scores.SCORE_REGISTRY`), or a
        :class:`cact_ops.scores.Score`.
    alpha : float
        Miscoverage level in (0, 1): sets cover with probability >= 1 - alpha.
    classwise : bool
        One threshold per class from that class's calibration points (Mondrian CP): coverage >= 1 - alpha for
        every class. Classes with fewer than ceil(1/alpha) - 1 calibration points get q̂_k = +inf (full sets)
        with a warning.
    randomized : bool
        For randomized scores (APS, RAPS): draw U ~ Unif(0, 1) per row (exact coverage); False uses U = 1.
    seed, generator : int or torch.Generator, optional
        Where U comes from (one of them; neither: torch's global generator). Each ``calibrate``/``predict`` call
        draws fresh U's; pass ``u=`` to a call to give them yourself.
    score_params : mapping, optional
        Keyword arguments of the score, e.g. ``{"lam": 0.001, "k_reg": 1}`` for RAPS (default 0.01, 5, as in
        the engine).

    >>> logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [2.0, 1.0], [1.0, 2.0]] * 5)
    >>> labels = torch.tensor([0, 1, 1, 0] * 5)
    >>> SplitPredictor("lac", alpha=0.4).calibrate(logits, labels).predict(logits[:3])
    tensor([[ True, False],
            [False,  True],
            [ True,  True]])
    """

    def __init__(self, score: str | Score = "aps", alpha: float = 0.1, *, classwise: bool = False,
                 randomized: bool = True, seed: int | None = None, generator: torch.Generator | None = None,
                 score_params: Mapping | None = None):
        self.score = _score_arg(score)
        self.alpha = check_alpha(alpha)
        if seed is not None and generator is not None:
            raise ValueError("give seed or generator, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if score_params is not None and not isinstance(score_params, Mapping):
            raise ValueError(f"score_params must be a mapping of the score's keyword arguments, got "
                             f"{type(score_params).__name__}")
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else generator
        self.classwise = bool(classwise)
        self.randomized = bool(randomized)
        self.score_params = dict(score_params or {})
        self.q_hat: torch.Tensor | None = None  # scalar, or [K] when classwise; set by calibrate()
        self.num_classes: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(score={self.score.name!r}, alpha={self.alpha}, classwise={self.classwise})"

    def scores(self, logits: torch.Tensor, u=None) -> torch.Tensor:
        """Class-ordered non-conformity scores [n, K] of ``logits`` (``u``: U per row, see
        :meth:`cact_ops.scores.Score.from_logits`; default drawn from this predictor's generator)."""
        check_matrix(logits, "logits")
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # softmax and the cumulative sums of APS need more than 8-11 mantissa bits
        if u is None and not self.randomized:
            u = 1.0
        return self.score.from_logits(logits, u=u, generator=self.generator, **self.score_params)

    def calibrate(self, logits: torch.Tensor, labels: torch.Tensor, u=None) -> "SplitPredictor":
        """Set ``q_hat`` from calibration logits [n, K] and labels [n]: the ceil((n+1)(1-alpha))-th smallest
        true-class score (per class when ``classwise``). Returns ``self``, so calls chain."""
        n, num_classes = check_matrix(logits, "logits").shape
        if n == 0:
            raise ValueError("empty calibration set: logits has 0 rows")
        labels = check_labels(labels, n, num_classes).to(logits.device)
        true = self.scores(logits, u).gather(1, labels[:, None]).squeeze(1)
        q, _ = thresholds(true[None], labels, [self.alpha], num_classes, self.classwise)
        self.q_hat, self.num_classes = q[0, 0], num_classes
        self._warn_infinite(labels)
        return self

    def _warn_infinite(self, labels: torch.Tensor) -> None:
        inf = torch.isinf(self.q_hat).flatten().nonzero().flatten().tolist()
        if not inf:
            return
        if not self.classwise:
            warnings.warn(f"calibration set too small for alpha={self.alpha}: rank "
                          f"{conformal_rank(labels.shape[0], self.alpha)} > n={labels.shape[0]}; q_hat is +inf "
                          f"(full sets)", stacklevel=3)
            return
        counts = torch.bincount(labels.cpu(), minlength=self.num_classes)
        warnings.warn(f"class-wise calibration: {len(inf)} classes have too few calibration points for "
                      f"alpha={self.alpha} (of them {int((counts[inf] == 0).sum())} have none): q_hat is +inf, full "
                      f"sets for classes {inf[:20]}{'...' if len(inf) > 20 else ''}", stacklevel=3)

    def _check_calibrated(self, logits: torch.Tensor) -> None:
        if self.q_hat is None:
            raise RuntimeError(f"{type(self).__name__} is not calibrated: call calibrate(logits, labels) first")
        k = check_matrix(logits, "logits").shape[1]
        if k != self.num_classes:
            raise ValueError(f"logits have {k} classes but the predictor was calibrated on {self.num_classes}")

    def predict(self, logits: torch.Tensor, u=None) -> torch.Tensor:
        """Prediction sets C(x) = {k : s(x, k) <= q̂ (q̂_k)} of ``logits`` [n, K] as a bool mask [n, K]."""
        self._check_calibrated(logits)
        return predict_sets(self.scores(logits, u), self.q_hat)

    def evaluate(self, logits: torch.Tensor, labels: torch.Tensor, u=None, train_counts=None) -> dict:
        """Metrics of the sets of test ``logits`` [m, K] with ``labels`` [m], as the engine reports them for one
        split: every summary metric of :data:`cact_ops.metrics.METRIC_REGISTRY` as a float (``coverage``,
        ``size``, ``covgap`` (in %), ``undercovered``, ``sscv``, ``accuracy``; the shot-group sizes
        ``many_size``, ``medium_size``, ``few_size`` only with the classes' ``train_counts``), and
        ``class_coverage``, ``class_size`` as float64 tensors [K] (NaN for a class with no test row)."""
        self._check_calibrated(logits)
        m, num_classes = logits.shape
        if m == 0:
            raise ValueError("empty test set: logits has 0 rows")
        labels = check_labels(labels, m, num_classes).to(logits.device)
        groups = None
        if train_counts is not None:
            groups = shot_groups(train_counts)
            if groups.numel() != num_classes:
                raise ValueError(f"train_counts has {groups.numel()} classes but logits have {num_classes}")
        sets = self.predict(logits, u)
        accuracy = (logits.argmax(dim=1) == labels).to(torch.float64).mean()
        stats = SetStats(sets.gather(1, labels[:, None]).T, sets.sum(dim=1)[None], labels, num_classes,
                         [self.alpha], groups, accuracy)
        names = [k for k in METRIC_REGISTRY if groups is not None or k not in _SHOT_METRICS]
        values = compute_metrics(stats, names)
        out = {k: float(values[k][0]) for k in names}
        out["class_coverage"], out["class_size"] = values["class_coverage"][0], values["class_size"][0]
        return out


class ClasswisePredictor(SplitPredictor):
    """Class-wise (Mondrian) split CP: ``SplitPredictor(..., classwise=True)`` under TorchCP's name. ``q_hat`` has
    one threshold per class, and coverage >= 1 - alpha holds for every class.

    >>> logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [2.0, 1.0], [1.0, 2.0]] * 5)
    >>> ClasswisePredictor("lac", alpha=0.4).calibrate(logits, torch.tensor([0, 1, 1, 0] * 5)).q_hat
    tensor([0.7311, 0.7311])
    """

    def __init__(self, score: str | Score = "aps", alpha: float = 0.1, **kwargs):
        super().__init__(score, alpha, classwise=True, **kwargs)


__all__ = ["SplitPredictor", "ClasswisePredictor"]
