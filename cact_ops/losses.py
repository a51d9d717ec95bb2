"""Training losses: cross-entropy, ConfTr (Stutz et al., ICLR 2022) and CaCT (Marani et al., arXiv 2601.09522).

Every loss is an ``nn.Module`` called as ``loss_fn(logits, labels)`` and returns ``(loss, diagnostics)``, so a
training loop treats them alike; with ``return_diagnostics=False`` it returns the scalar loss alone, a drop-in
criterion like ``nn.CrossEntropyLoss`` (TorchCP's losses return the scalar). The conformal losses split each mini-batch into a calibration part B_cal
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

from . import distributed as _dist
from . import methods as _methods
from ._checks import check_alpha, check_labels, check_matrix
from .alm import DualState, phr
from .scores import logprob
from .smooth import QUANTILE_OPERATORS, smooth_threshold, soft_sets


def split_batch(
    labels: torch.Tensor,
    cal_fraction: float = 0.5,
    stratified: bool = False,
    generator: torch.Generator | None = None,
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random indices of the calibration and prediction parts of a batch.

    ``keys`` (one uniform random number per sample) replace the draw from ``generator``: the distributed losses
    pass rank 0's keys so that every rank splits the global batch the same way. ``stratified`` puts round(cal_fraction * n_k) samples of each class k into calibration (vectorised: one
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
    keys = (torch.rand(n, generator=generator) if keys is None else keys).to(labels.device)
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


def _result(loss_fn: nn.Module, loss: torch.Tensor, diagnostics: dict):
    """What a loss's call returns: ``(loss, diagnostics)``, or the scalar alone (``return_diagnostics=False``)."""
    return (loss, diagnostics) if loss_fn.return_diagnostics else loss


class CELoss(nn.Module):
    """Plain cross-entropy with the same ``(loss, diagnostics)`` interface as the conformal losses (the scalar
    alone with ``return_diagnostics=False``); under ``torch.distributed`` the mean over the global batch (ranks'
    slices may differ in size), like theirs."""

    def __init__(self, label_smoothing: float = 0.0, distributed: bool = True, return_diagnostics: bool = True):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.distributed = distributed
        self.return_diagnostics = return_diagnostics

    def forward(self, logits: torch.Tensor, labels: torch.Tensor):
        check_matrix(logits, "logits")
        labels = check_labels(labels, logits.shape[0], logits.shape[1])
        if self.distributed and _dist.world()[1] > 1:
            total = _dist.gather_cat(torch.stack([
                F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing, reduction="sum"),
                logits.new_tensor(float(labels.shape[0]))])[None]).sum(0)
            ce = total[0] / total[1].detach().clamp(min=1)
        else:
            ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return _result(self, ce, {"ce": ce.detach(), "penalty": torch.zeros((), device=logits.device)})


class _ConformalLoss(nn.Module):
    """Shared part of ConfTr and CaCT: split the batch, smooth threshold on B_cal, soft sets on B_pred.

    Under ``torch.distributed`` (Ray Train, any DDP loop) the batch is the *global* batch: rank 0's random keys
    split the union of the ranks' batches, the smooth threshold comes from the B_cal scores of every rank
    (gathered with gradient), and every mean (CE, penalty) is taken over the global batch, so the loss, its
    gradient and ``diag["tau"]`` are those of one process holding the whole batch, whatever the worker count
    (``distributed=False`` keeps every rank on its own slice). ``cal_weights`` ([K]) weight each calibration
    score by its class, e.g. 1 / (training count) so that a long-tailed B_cal stands for the balanced population
    that calibrates at deployment (docs/DESIGN.md). ``return_diagnostics=False``: the call returns the scalar
    loss alone.
    """

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
        cal_weights: torch.Tensor | None = None,
        distributed: bool = True,
        quantile_operator: str = "l2",
        return_diagnostics: bool = True,
    ):
        super().__init__()
        self.alpha = check_alpha(alpha)
        if quantile_operator not in QUANTILE_OPERATORS:
            raise ValueError(f"quantile_operator must be one of {QUANTILE_OPERATORS}, got {quantile_operator!r}")
        self.quantile_operator = quantile_operator
        if temperature <= 0:
            raise ValueError(f"temperature T must be > 0, got {temperature}")
        if regularization_strength <= 0:
            raise ValueError(f"regularization_strength must be > 0, got {regularization_strength}")
        if not 0.0 < cal_fraction < 1.0:
            raise ValueError(f"cal_fraction must lie in (0, 1), got {cal_fraction}")
        if cal_weights is not None:
            cal_weights = torch.as_tensor(cal_weights, dtype=torch.float64)
            if cal_weights.dim() != 1 or not torch.isfinite(cal_weights).all() or (cal_weights <= 0).any():
                raise ValueError("cal_weights must be a 1-D tensor of finite weights > 0, one per class")
        self.temperature = temperature
        self.regularization_strength = regularization_strength
        self.cal_fraction = cal_fraction
        self.stratified = stratified
        self.classwise_tau = classwise_tau
        self.ce_weight = ce_weight
        self.generator = generator
        self.cal_weights = cal_weights
        self.distributed = distributed
        self.return_diagnostics = return_diagnostics

    def _tau(self, true_scores: torch.Tensor, labels_cal: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Smooth lower quantile of true-class conformity scores: scalar, or [K] when ``classwise_tau``."""
        weights = None if self.cal_weights is None else self.cal_weights.to(true_scores.device)[labels_cal]
        tau = smooth_threshold(true_scores, self.alpha, self.regularization_strength, weights,
                               self.quantile_operator)
        if not self.classwise_tau:
            return tau
        # ConfTr-class: one threshold per class from its own calibration points; classes with fewer than 2
        # calibration points in this batch fall back to the global tau. A loop over classes present, not samples.
        taus = tau.expand(num_classes).clone()
        counts = torch.bincount(labels_cal, minlength=num_classes)
        for k in (counts >= 2).nonzero().flatten().tolist():
            s_k = true_scores[labels_cal == k]
            taus[k] = smooth_threshold(s_k, self.alpha, self.regularization_strength,
                                       operator=self.quantile_operator)
        return taus

    def _global_batch(self, labels: torch.Tensor, num_classes: int):
        """Split the global batch: (this rank's cal mask [n], global labels, per-rank sizes, rank, world)."""
        rank, world = _dist.world() if self.distributed else (0, 1)
        n = labels.shape[0]
        name = type(self).__name__
        if world == 1:
            sizes = torch.tensor([n])
            all_labels = labels
        else:
            info = _dist.all_gather_ints([n, num_classes])
            if (info[:, 1] != num_classes).any():
                raise ValueError(f"{name}: the ranks disagree on the number of classes (logits.shape[1] by rank: "
                                 f"{info[:, 1].tolist()}); every rank must train the same model")
            sizes = info[:, 0]
            all_labels = _dist.gather_cat(labels, sizes)
        total = int(sizes.sum())
        if total < 2:
            raise ValueError(f"{name}: the batch has {total} sample(s) over {world} rank(s) (per rank: "
                             f"{sizes.tolist()}); B_cal and B_pred need at least 2 in all: raise batch_size")
        keys = torch.rand(total, generator=self.generator)
        if world > 1:
            keys = _dist.broadcast(keys)  # rank 0's keys: every rank splits the global batch alike
        cal, _ = split_batch(all_labels, self.cal_fraction, self.stratified, keys=keys)
        is_cal = torch.zeros(total, dtype=torch.bool, device=labels.device)
        is_cal[cal] = True
        offset = int(sizes[:rank].sum())
        return is_cal[offset: offset + n], all_labels, is_cal, sizes, world

    def conformal_forward(self, logits: torch.Tensor, labels: torch.Tensor):
        """CE and the soft sets of this rank's B_pred under the global threshold.

        Returns (ce, C [m, K], pred labels, tau, world, global_sum) where ``global_sum(t)`` sums a tensor over
        the ranks with gradient (identity in one process) and ce is already the global mean.
        """
        check_matrix(logits, "logits")
        K = logits.shape[1]
        labels = check_labels(labels, logits.shape[0], K)
        mine, all_labels, is_cal, sizes, world = self._global_batch(labels, K)
        conf = logprob(logits.float())
        true = conf.gather(1, labels[:, None]).squeeze(1)
        cal_sizes = torch.stack([is_cal[int(sizes[:r].sum()): int(sizes[:r + 1].sum())].sum() for r in range(world)])
        true_cal = _dist.gather_cat(true[mine], cal_sizes) if world > 1 else true[mine]
        tau = self._tau(true_cal, all_labels[is_cal], K)
        pred = (~mine).nonzero().flatten()
        sets = soft_sets(conf[pred], tau, self.temperature)

        def global_sum(t: torch.Tensor) -> torch.Tensor:
            return _dist.gather_cat(t[None]).sum(0) if world > 1 else t

        ce = global_sum(F.cross_entropy(logits, labels, reduction="sum")) / int(sizes.sum())
        return ce, sets, labels[pred], tau, global_sum

    @staticmethod
    def _class_sums(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Sum of ``values`` per class ([K], keeps the gradient)."""
        return torch.zeros(num_classes, dtype=values.dtype, device=values.device).index_add(0, labels, values)

    def _diagnostics(self, size, per_sample, y, K, global_sum) -> dict:
        """Per-class sums (this rank's B_pred; a loop all-reduces them per epoch) and batch means (global)."""
        counts = torch.bincount(y, minlength=K).to(size.dtype)
        size_sums = self._class_sums(size.detach(), y, K)
        with torch.no_grad():
            n = global_sum(counts.sum()).clamp(min=1)
            mean_size = global_sum(size_sums.sum()) / n
        return {
            "soft_size": mean_size,
            "class_soft_size": self._class_means(size_sums, counts),
            "class_penalty": self._class_means(self._class_sums(per_sample.detach(), y, K), counts),
            "class_size_sums": size_sums,
            "class_counts": counts,
        }

    @staticmethod
    def _class_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """sums / counts per class, NaN where a class is absent (diagnostics)."""
        return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))


class ConfTrLoss(_ConformalLoss):
    """ConfTr: CE + lambda * mean_{B_pred} max(0, S(x) - kappa) with one global lambda.

    Options of DeepMind's variant: ``size_transform="log"`` takes log(size loss + 1e-8); ``coverage_weight``
    adds a coverage loss mean_i sum_k L[y_i, k] * (C_k(x_i) if k != y_i else 1 - C_k(x_i)) with loss matrix L
    (identity by default, i.e. only the true class's 1 - C_{y_i}(x_i)). ``classwise_tau=True`` gives
    ConfTr-class (one smooth threshold per class).

    >>> torch.manual_seed(0) and None
    >>> loss, diag = ConfTrLoss(alpha=0.1)(torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    >>> sorted(diag)[:4]
    ['ce', 'class_counts', 'class_penalty', 'class_size_sums']
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
        ce, sets, y, tau, global_sum = self.conformal_forward(logits, labels)
        K = logits.shape[1]
        size = sets.sum(dim=1)
        per_sample = (size - self.kappa).clamp(min=0)
        onehot = F.one_hot(y, K).to(sets.dtype)
        L = self.loss_matrix if self.loss_matrix is not None else torch.eye(K, device=sets.device)
        # Coverage loss: miss the true class, or include a wrong class, each weighted by L[y, k].
        miss = (onehot * (1 - sets) + (1 - onehot) * sets) * L.to(sets.dtype)[y]
        # Global means over B_pred: [sum of size excess, sum of coverage loss, count], summed over ranks.
        totals = global_sum(torch.stack([per_sample.sum(), miss.sum(), per_sample.new_tensor(float(y.shape[0]))]))
        n_pred = totals[2].detach().clamp(min=1)
        size_loss, coverage_loss = totals[0] / n_pred, totals[1] / n_pred
        if self.size_transform == "log":
            size_loss = torch.log(size_loss + 1e-8)
        loss = self.ce_weight * ce + self.lam * size_loss + self.coverage_weight * coverage_loss
        return _result(self, loss, {
            "ce": ce.detach(),
            "penalty": (self.lam * size_loss).detach(),
            "coverage_loss": coverage_loss.detach(),
            "tau": tau.detach(),
            **self._diagnostics(size, self.lam * per_sample, y, K, global_sum),
        })


class CaCTLoss(_ConformalLoss):
    """CaCT: CE + PHR penalty of h_i = S(x_i) - eta with the multipliers of class y_i.

    ``reduction="class"`` (the default) averages the penalty per class, then sums over the classes present with
    weight 1/(classes present): the batch estimate of sum_k P_k(E[S | Y = k]) / K, each class's constraint
    weighing the same, as the K class-conditional constraints ask. ``"sample"`` averages over B_pred, which
    weights class k by its batch frequency pi_k (64x head vs tail on CIFAR-10-LT IF=100).

    >>> from cact_ops.alm import DualState
    >>> torch.manual_seed(0) and None
    >>> loss, diag = CaCTLoss(DualState(3), alpha=0.1)(torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    >>> bool(torch.isfinite(loss))
    True
    """

    def __init__(self, dual: DualState, alpha: float = 0.1, eta: float = 1.0, reduction: str = "class", **kwargs):
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
        ce, sets, y, tau, global_sum = self.conformal_forward(logits, labels)
        size = sets.sum(dim=1)
        h = size - self.eta
        lam = self.dual.lam.to(device=h.device, dtype=h.dtype)[y]
        rho = self.dual.rho.to(device=h.device, dtype=h.dtype)[y]
        per_sample = phr(h, rho, lam)
        # [per-class penalty sums, per-class counts], summed over ranks (gradient through the sums only).
        counts = torch.bincount(y, minlength=K).to(h.dtype)
        totals = global_sum(torch.cat([self._class_sums(per_sample, y, K), counts]))
        sums, counts_all = totals[:K], totals[K:].detach()
        if self.reduction == "sample":
            penalty = sums.sum() / counts_all.sum().clamp(min=1)
        else:
            present = counts_all > 0
            penalty = (sums[present] / counts_all[present]).sum() / present.sum().clamp(min=1)
        loss = self.ce_weight * ce + penalty
        return _result(self, loss, {
            "ce": ce.detach(),
            "penalty": penalty.detach(),
            "tau": tau.detach(),
            **self._diagnostics(size, per_sample, y, K, global_sum),
        })

    @torch.no_grad()
    def dual_step(self, logits: torch.Tensor, labels: torch.Tensor, cal_fraction: float = 0.2, seed: int = 0,
                  epoch: int | None = None) -> torch.Tensor:
        """CaCT's dual (outer) step in one call, from validation logits: call it once per epoch in a training loop
        of your own. A stratified ``cal_fraction`` of the rows (the same rows every call for a given ``seed``)
        gives the smooth threshold tau, with this loss's alpha, quantile operator and strength; on the other rows
        h_i = S(x_i) - eta with the soft size S at this loss's temperature T; then
        lambda_k <- clamp(mean_{i in class k} P'(h_i; rho_k, lambda_k)) and the rho schedule, in ``self.dual``
        (:meth:`cact_ops.alm.DualState.update`; ``epoch`` goes to its history). Returns the mean h per class
        (NaN: no row of that class): > 0 where class k's sets are still larger than eta.

        No gradient flows; pass logits computed under ``torch.no_grad()`` to save the graph. The protocol is that
        of :class:`cact_ops.training.EpochLoop`'s dual step on validation data, for in-memory logits (EpochLoop
        also spreads it over batches and Ray workers, and draws its calibration rows with its own seed).

        >>> from cact_ops.alm import DualState
        >>> loss_fn = CaCTLoss(DualState(2), eta=0.5)
        >>> h = loss_fn.dual_step(torch.tensor([[2.0, 0.0], [0.0, 2.0]] * 10), torch.tensor([0, 1] * 10))
        >>> bool((loss_fn.dual.lam > 1e-6).all())   # sets larger than eta = 0.5: both multipliers grow
        True
        """
        K = check_matrix(logits, "logits").shape[1]
        if K != self.dual.num_classes:
            raise ValueError(f"logits have {K} classes but the DualState has {self.dual.num_classes}")
        labels = check_labels(labels, logits.shape[0], K)
        conf = logprob(logits.float())
        cal, rest = split_batch(labels, cal_fraction, stratified=True, generator=torch.Generator().manual_seed(seed))
        true = conf[cal].gather(1, labels[cal, None]).squeeze(1)
        tau = smooth_threshold(true, self.alpha, self.regularization_strength, operator=self.quantile_operator)
        h = soft_sets(conf[rest], tau, self.temperature).sum(1).double() - self.eta
        sums, counts, h_sums = self.dual.statistics(h, labels[rest])
        self.dual.update(sums, counts, h_sums / counts.clamp(min=1), epoch=epoch)
        return torch.where(counts > 0, h_sums / counts.clamp(min=1), torch.full_like(h_sums, float("nan")))


# The methods' registry lives in cact_ops.methods; these names stay for the public API.
METHODS = _methods.names()


def check_method(method: str) -> str:
    return _methods.get(method).name
