"""Training losses: cross-entropy, ConfTr (Stutz et al., ICLR 2022) and CaCT (Marani et al., arXiv 2601.09522).

Every loss is an ``nn.Module`` called as ``loss_fn(logits, labels)`` and returns ``(loss, diagnostics)``, so a
training loop treats them alike. The conformal losses split each mini-batch into a calibration part B_cal
(fraction ``cal_fraction``) and a prediction part B_pred, compute a smooth threshold tau on B_cal from the
log-probability conformity score, and penalise the soft set size S(x) on B_pred:

    ConfTr:  L = CE + lambda * mean_{B_pred} max(0, S(x) - kappa)         (one global lambda)
    CaCT:    L = CE + (1/|B_pred|) sum_{B_pred} P(S(x_i) - eta; rho_{y_i}, lambda_{y_i})   (PHR, per class)

lambda_k and rho_k of CaCT live in a :class:`cact_ops.alm.DualState` that the dual step updates once per epoch;
inside an epoch they are constants (no gradient flows through them).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import methods as _methods
from ._checks import check_alpha, check_labels, check_matrix
from .alm import DualState, phr
from .scores import logprob
from .smooth import smooth_threshold_level, soft_quantile, soft_sets


def split_batch(
    labels: torch.Tensor,
    cal_fraction: float = 0.5,
    stratified: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random indices of the calibration and prediction parts of a batch.

    ``stratified`` puts round(cal_fraction * n_k) samples of each class k into calibration (vectorised: one
    sort by (label, random key), then each sample's rank inside its class).

    >>> cal, pred = split_batch(torch.tensor([0, 0, 1, 1]), 0.5, stratified=True, generator=torch.Generator().manual_seed(0))
    >>> sorted(torch.tensor([0, 0, 1, 1])[cal].tolist())
    [0, 1]
    """
    if not 0.0 < cal_fraction < 1.0:
        raise ValueError(f"cal_fraction must lie in (0, 1), got {cal_fraction}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor, got {getattr(labels, 'shape', type(labels))}")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.numel() and labels.min() < 0:
        raise ValueError("labels must be >= 0")
    n = labels.shape[0]
    if n < 2:
        raise ValueError(f"a conformal loss needs a batch of at least 2 samples, got {n}")
    keys = torch.rand(n, generator=generator).to(labels.device)
    if not stratified:
        perm = keys.argsort()
        n_cal = min(max(int(round(cal_fraction * n)), 1), n - 1)
        return perm[:n_cal], perm[n_cal:]
    order = keys.argsort()
    order = order[labels[order].argsort(stable=True)]  # grouped by class, random inside each class
    sorted_labels = labels[order]
    counts = torch.bincount(sorted_labels)
    starts = counts.cumsum(0) - counts
    rank_in_class = torch.arange(n, device=labels.device) - starts[sorted_labels]
    in_cal = rank_in_class < torch.round(cal_fraction * counts.to(torch.float32)).long()[sorted_labels]
    if in_cal.all() or not in_cal.any():  # tiny batches: keep both parts non-empty
        in_cal = torch.arange(n, device=labels.device) < max(1, min(n - 1, int(round(cal_fraction * n))))
    return order[in_cal], order[~in_cal]


class CELoss(nn.Module):
    """Plain cross-entropy with the same ``(loss, diagnostics)`` interface as the conformal losses."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor):
        check_matrix(logits, "logits")
        labels = check_labels(labels, logits.shape[0], logits.shape[1])
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return ce, {"ce": ce.detach(), "penalty": torch.zeros((), device=logits.device)}


class _ConformalLoss(nn.Module):
    """Shared part of ConfTr and CaCT: split the batch, smooth threshold on B_cal, soft sets on B_pred."""

    def __init__(
        self,
        alpha: float = 0.1,
        temperature: float = 1.0,
        regularization_strength: float = 0.1,
        cal_fraction: float = 0.5,
        stratified: bool = False,
        classwise_tau: bool = False,
        ce_weight: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.alpha = check_alpha(alpha)
        if temperature <= 0:
            raise ValueError(f"temperature T must be > 0, got {temperature}")
        if regularization_strength <= 0:
            raise ValueError(f"regularization_strength must be > 0, got {regularization_strength}")
        self.temperature = temperature
        self.regularization_strength = regularization_strength
        self.cal_fraction = cal_fraction
        self.stratified = stratified
        self.classwise_tau = classwise_tau
        self.ce_weight = ce_weight
        self.generator = generator

    def _tau(self, conf_cal: torch.Tensor, labels_cal: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Smooth lower quantile of true-class conformity scores: scalar, or [K] when ``classwise_tau``."""
        true_scores = conf_cal.gather(1, labels_cal[:, None]).squeeze(1)
        tau = soft_quantile(true_scores, smooth_threshold_level(self.alpha, true_scores.shape[0]),
                            self.regularization_strength)
        if not self.classwise_tau:
            return tau
        # ConfTr-class: one threshold per class from its own calibration points; classes with fewer than 2
        # calibration points in this batch fall back to the global tau. A loop over classes present, not samples.
        taus = tau.expand(num_classes).clone()
        counts = torch.bincount(labels_cal, minlength=num_classes)
        for k in (counts >= 2).nonzero().flatten().tolist():
            s_k = true_scores[labels_cal == k]
            taus[k] = soft_quantile(s_k, smooth_threshold_level(self.alpha, s_k.shape[0]),
                                    self.regularization_strength)
        return taus

    def conformal_forward(self, logits: torch.Tensor, labels: torch.Tensor):
        """CE on the whole batch, and the soft sets of B_pred: returns (ce, C [m, K], pred labels, tau)."""
        check_matrix(logits, "logits")
        labels = check_labels(labels, logits.shape[0], logits.shape[1])
        ce = F.cross_entropy(logits, labels)
        conf = logprob(logits.float())
        cal, pred = split_batch(labels, self.cal_fraction, self.stratified, self.generator)
        tau = self._tau(conf[cal], labels[cal], logits.shape[1])
        sets = soft_sets(conf[pred], tau, self.temperature)
        return ce, sets, labels[pred], tau

    @staticmethod
    def _class_means(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Mean of ``values`` per class (NaN where a class is absent), detached, for diagnostics."""
        v = values.detach().float()
        counts = torch.bincount(labels, minlength=num_classes).float()
        sums = torch.zeros(num_classes, device=v.device).index_add_(0, labels, v)
        return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))


class ConfTrLoss(_ConformalLoss):
    """ConfTr: CE + lambda * mean_{B_pred} max(0, S(x) - kappa) with one global lambda.

    Options of DeepMind's variant: ``size_transform="log"`` takes log(size loss + 1e-8); ``coverage_weight``
    adds a coverage loss mean_i sum_k L[y_i, k] * (C_k(x_i) if k != y_i else 1 - C_k(x_i)) with loss matrix L
    (identity by default, i.e. only the true class's 1 - C_{y_i}(x_i)). ``classwise_tau=True`` gives
    ConfTr-class (one smooth threshold per class).

    >>> torch.manual_seed(0) and None
    >>> loss, diag = ConfTrLoss(alpha=0.1)(torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    >>> sorted(diag)
    ['ce', 'class_penalty', 'class_soft_size', 'coverage_loss', 'penalty', 'soft_size', 'tau']
    """

    def __init__(
        self,
        alpha: float = 0.1,
        lam: float = 1.0,
        kappa: float = 1.0,
        size_transform: str = "none",
        coverage_weight: float = 0.0,
        loss_matrix: torch.Tensor | None = None,
        **kwargs,
    ):
        super().__init__(alpha=alpha, **kwargs)
        if size_transform not in ("none", "log"):
            raise ValueError(f"size_transform must be 'none' or 'log', got {size_transform!r}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam = lam
        self.kappa = kappa
        self.size_transform = size_transform
        self.coverage_weight = coverage_weight
        self.register_buffer("loss_matrix", loss_matrix if loss_matrix is None else torch.as_tensor(loss_matrix))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor):
        ce, sets, y, tau = self.conformal_forward(logits, labels)
        K = logits.shape[1]
        size = sets.sum(dim=1)
        per_sample = (size - self.kappa).clamp(min=0)
        size_loss = per_sample.mean()
        if self.size_transform == "log":
            size_loss = torch.log(size_loss + 1e-8)
        onehot = F.one_hot(y, K).to(sets.dtype)
        L = self.loss_matrix if self.loss_matrix is not None else torch.eye(K, device=sets.device)
        # Coverage loss: miss the true class, or include a wrong class, each weighted by L[y, k].
        miss = (onehot * (1 - sets) + (1 - onehot) * sets) * L.to(sets.dtype)[y]
        coverage_loss = miss.sum(dim=1).mean()
        loss = self.ce_weight * ce + self.lam * size_loss + self.coverage_weight * coverage_loss
        return loss, {
            "ce": ce.detach(),
            "penalty": (self.lam * size_loss).detach(),
            "coverage_loss": coverage_loss.detach(),
            "soft_size": size.detach().mean(),
            "tau": tau.detach(),
            "class_soft_size": self._class_means(size, y, K),
            "class_penalty": self._class_means(self.lam * per_sample, y, K),
        }


class CaCTLoss(_ConformalLoss):
    """CaCT: CE + PHR penalty of h_i = S(x_i) - eta with the multipliers of class y_i.

    ``reduction="sample"`` averages the penalty over B_pred (DESIGN.md); ``"class"`` averages per class first,
    then over the classes present, so every class weighs the same whatever its batch frequency.

    >>> from cact_ops.alm import DualState
    >>> torch.manual_seed(0) and None
    >>> loss, diag = CaCTLoss(DualState(3), alpha=0.1)(torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    >>> bool(torch.isfinite(loss))
    True
    """

    def __init__(self, dual: DualState, alpha: float = 0.1, eta: float = 1.0, reduction: str = "sample", **kwargs):
        super().__init__(alpha=alpha, **kwargs)
        if not isinstance(dual, DualState):
            raise ValueError(f"dual must be a cact_ops.alm.DualState, got {type(dual).__name__}")
        if reduction not in ("sample", "class"):
            raise ValueError(f"reduction must be 'sample' or 'class', got {reduction!r}")
        self.dual = dual
        self.eta = eta
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor):
        K = check_matrix(logits, "logits").shape[1]
        if K != self.dual.num_classes:
            raise ValueError(f"logits have {K} classes but the DualState has {self.dual.num_classes}")
        ce, sets, y, tau = self.conformal_forward(logits, labels)
        size = sets.sum(dim=1)
        h = size - self.eta
        lam = self.dual.lam.to(device=h.device, dtype=h.dtype)[y]
        rho = self.dual.rho.to(device=h.device, dtype=h.dtype)[y]
        per_sample = phr(h, rho, lam)
        if self.reduction == "sample":
            penalty = per_sample.mean()
        else:
            counts = torch.bincount(y, minlength=K).to(h.dtype)
            sums = torch.zeros(K, dtype=h.dtype, device=h.device).index_add(0, y, per_sample)
            present = counts > 0
            penalty = (sums[present] / counts[present]).mean()
        loss = self.ce_weight * ce + penalty
        return loss, {
            "ce": ce.detach(),
            "penalty": penalty.detach(),
            "soft_size": size.detach().mean(),
            "tau": tau.detach(),
            "class_soft_size": self._class_means(size, y, K),
            "class_penalty": self._class_means(per_sample, y, K),
        }


# The methods' registry lives in cact_ops.methods; these names stay for the public API.
METHODS = _methods.names()


def check_method(method: str) -> str:
    return _methods.get(method).name
