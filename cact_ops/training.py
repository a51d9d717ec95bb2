"""A plain PyTorch epoch loop for CE, ConfTr, ConfTr-class, CaCT-uniform and CaCT, with the dual step.

The Ray Train stage reuses :class:`EpochLoop` unchanged: it passes its own batch iterators, a ``comm`` that
sums statistics across workers, and a ``dual_update`` hook that asks the driver's coordinator for the step.
Users can run the same loop in their own code, without Ray (:func:`fit_in_process`).

The dual step (DESIGN.md section 1): a stratified calibration part of the validation data (``val_cal_fraction``)
gives a hard conformal threshold on the log-probability score; on the rest, h_i = S(x_i) - eta with the soft
size S at the same temperature T; per-class sums of P'(h_i), counts and sums of h_i feed
:meth:`cact_ops.alm.DualState.update`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

from .alm import DualState
from .cp import conformal_quantile
from . import methods
from .config import TrainConfig
from .losses import METHODS, CaCTLoss, CELoss, ConfTrLoss
from .scores import logprob
from .smooth import smooth_threshold, soft_size


class TrainingDiverged(ValueError):
    """Training produced NaN or inf: a property of the configuration (most often the learning rate), so a retry
    would fail the same way. Ray Train workers report it instead of raising, so it is not retried."""

    def __init__(self, cfg: TrainConfig, epoch: int, step: int, what: str):
        self.method, self.epoch, self.step = cfg.method, epoch, step
        super().__init__(f"{cfg.method}: {what} became NaN or inf at epoch {epoch + 1}, optimizer step {step} "
                         f"(lr={cfg.lr:g}, optimizer={cfg.optimizer}): training diverged; lower the learning rate "
                         f"(--lr) or check the data")


def calibration_weights(cfg: TrainConfig, train_counts) -> torch.Tensor | None:
    """Per-class weights of B_cal's scores: 1 / n_k with ``cal_weighting="balanced"`` (classes without training
    samples get weight 1; they never appear in B_cal), None with ``"none"``."""
    if cfg.cal_weighting == "none" or methods.get(cfg.method).loss == "ce":
        return None
    if train_counts is None:
        raise ValueError("TrainConfig.cal_weighting='balanced' needs the per-class training counts (train_counts); "
                         "pass them, or set cal_weighting='none'")
    counts = torch.as_tensor(train_counts, dtype=torch.float64)
    return torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.ones_like(counts))


def build_loss(cfg: TrainConfig, dual: DualState | None, generator: torch.Generator | None = None,
               train_counts=None) -> nn.Module:
    """The loss module of ``cfg.method`` (its registry entry's ``build_loss`` if it has one, else its loss
    family's); CaCT methods read lambda, rho from ``dual``."""
    m = methods.get(cfg.method)
    if m.loss == "ce" and m.build_loss is None:
        return CELoss()
    common = dict(alpha=cfg.alpha, temperature=cfg.temperature, regularization_strength=cfg.regularization_strength,
                  cal_fraction=cfg.cal_fraction, stratified=cfg.stratified_split, ce_weight=cfg.ce_weight,
                  generator=generator, cal_weights=calibration_weights(cfg, train_counts),
                  quantile_operator=cfg.quantile_operator)
    if m.build_loss is not None:
        return m.build_loss(cfg, dual=dual, **common)
    if m.loss == "conftr":
        return ConfTrLoss(lam=cfg.conftr_lambda, kappa=cfg.kappa, size_transform=cfg.size_transform,
                          coverage_weight=cfg.coverage_weight, classwise_tau=m.classwise_tau, **common)
    return CaCTLoss(dual, eta=cfg.eta, reduction=cfg.reduction, **common)


def build_optimizer(model: nn.Module, cfg: TrainConfig):
    """SGD (Nesterov-free, momentum) or AdamW, with a per-epoch LambdaLR: linear warm-up, then cosine/step."""
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def factor(epoch: int) -> float:
        if epoch < cfg.warmup_epochs:
            return (epoch + 1) / cfg.warmup_epochs
        if cfg.schedule == "cosine":
            span = max(cfg.epochs - cfg.warmup_epochs, 1)
            return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
        if cfg.schedule == "step":
            return 0.1 ** sum(epoch >= m for m in cfg.milestones)
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Vectorised pad-``pad`` random crop and (with ``flip``) random horizontal flip of an image batch [B, C, H, W]."""
    B, _, H, W = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None].expand(B, x.shape[1], H, W + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :].expand(B, x.shape[1], H, W)
    out = out.gather(3, cols)
    if not flip:
        return out
    flips = (torch.rand(B, generator=generator) < 0.5).to(x.device)
    return torch.where(flips[:, None, None, None], out.flip(3), out)


def augment(x: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """``TrainConfig.augment`` applied to an image batch [B, C, H, W]."""
    if kind == "crop_flip":
        return crop_flip(x, generator)
    if kind == "crop":
        return crop_flip(x, generator, pad=2, flip=False)
    if kind == "resized_crop_flip":
        return resized_crop_flip(x, generator)
    return x


def resized_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, scale=(0.08, 1.0),
                      ratio=(3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """Vectorised RandomResizedCrop + horizontal flip of an image batch [B, C, H, W] (the ImageNet-LT training
    augmentation, torchvision's defaults): per image an area fraction in ``scale`` and a log-uniform aspect
    ratio in ``ratio``, a uniform position, resized back to H x W bilinearly by one ``grid_sample`` on the
    batch's device. A box that does not fit is clamped to the image (torchvision retries ten times, then falls
    back to a centre crop: the distribution differs only in that corner).

    >>> g = torch.Generator().manual_seed(0)
    >>> resized_crop_flip(torch.rand(4, 3, 32, 32), g).shape
    torch.Size([4, 3, 32, 32])
    >>> x = torch.rand(2, 1, 8, 8)
    >>> torch.allclose(resized_crop_flip(x, g, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False), x, atol=1e-6)
    True
    """
    B, _, H, W = x.shape
    x = x if x.is_floating_point() else x.float()
    u = torch.rand(B, 4, generator=generator, dtype=torch.float64)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    # box width and height as fractions of the image's: w * h = area, (w W) / (h H) = exp(log_r) (pixels)
    w = torch.sqrt(area * torch.exp(log_r) * H / W).clamp(max=1.0)
    h = (area / w).clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)  # box centre in [-1, 1] coordinates, the box inside the image
    cy = (1 - h) * (2 * u[:, 3] - 1)
    sign = torch.ones(B, dtype=torch.float64)
    if flip:
        sign = torch.where(torch.rand(B, generator=generator) < 0.5, -1.0, 1.0).double()
    theta = torch.zeros(B, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
    grid = torch.nn.functional.affine_grid(theta.to(x.device, x.dtype), [B, x.shape[1], H, W], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def smooth_dual_threshold(cal_scores: torch.Tensor, cfg: TrainConfig, weights: torch.Tensor | None = None) -> float:
    """The dual step's threshold for the constraint: the training-time smooth quantile (torchsort at
    ``cfg.regularization_strength``, level alpha (1 + 1/n)) of the calibration rows' true-class conformity,
    weighted like training's when ``weights`` are given."""
    return float(smooth_threshold(cal_scores.float(), cfg.alpha, cfg.regularization_strength, weights,
                                  cfg.quantile_operator))


def val_cal_mask(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Deterministic stratified mask of the dual step's calibration part: round(fraction * n_k) per class."""
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu().long()
    keys = torch.rand(labels.shape[0], generator=g)
    order = keys.argsort()
    order = order[labels[order].argsort(stable=True)]
    counts = torch.bincount(labels)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(labels.shape[0]) - starts[labels[order]]
    mask = torch.zeros(labels.shape[0], dtype=torch.bool)
    mask[order] = rank < torch.round(fraction * counts.float()).long()[labels[order]]
    return mask


class LocalComm:
    """Single-process stand-in for the distributed collectives the loop needs."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        return t


@dataclass
class ValStats:
    """Per-class validation statistics, summed over every worker (sums and counts, never means of means)."""

    grad_sums: torch.Tensor  # sum of P'(h_i) per class
    counts: torch.Tensor  # samples per class (non-calibration part)
    h_sums: torch.Tensor  # sum of h_i = S(x_i) - eta per class
    covered: torch.Tensor  # hard-set coverage count per class
    size_sums: torch.Tensor  # hard-set size sum per class
    correct: torch.Tensor  # top-1 correct count per class
    tau: float  # hard split-CP threshold on the log-prob conformity score (the reported coverage and size)
    eta: float = 0.0  # the size target the constraint values h = S - eta refer to
    n_cal: int = 0  # calibration rows the threshold tau came from (all workers)
    tau_soft: float = float("nan")  # the smooth threshold the constraint h was measured under

    @property
    def h_means(self) -> torch.Tensor:
        return self.h_sums / self.counts.clamp(min=1)

    def summary(self) -> dict:
        n = float(self.counts.sum().clamp(min=1))
        return {"val_accuracy": float(self.correct.sum()) / n, "val_coverage": float(self.covered.sum()) / n,
                "val_size": float(self.size_sums.sum()) / n, "val_constraint": float(self.h_sums.sum()) / n,
                "val_soft_size": float(self.h_sums.sum()) / n + self.eta,
                "val_tau": self.tau, "val_tau_soft": self.tau_soft, "val_n": int(n), "val_n_cal": int(self.n_cal)}


def val_objective(metrics: dict, alpha: float, num_classes: int) -> float:
    """Validation set size plus 10·K per unit of coverage shortfall (lower is better): what sweeps minimise, so
    that a config cannot win by under-covering.

    The shortfall counts only below 1 - alpha minus three standard deviations of split-CP coverage with
    ``val_n_cal`` calibration and ``val_n`` test rows, sqrt(alpha (1 - alpha) (1/n_cal + 1/n)): split CP covers
    1 - alpha on average whatever the model, so a smaller miss is sampling noise, and 10·K times that noise
    (0.02 coverage on 20 classes = 4 classes of penalty) would rank trials by noise instead of size. Without
    the counts the shortfall counts from 1 - alpha.

    >>> val_objective({"val_size": 1.4, "val_coverage": 0.92}, 0.1, 10)
    1.4
    >>> val_objective({"val_size": 1.4, "val_coverage": 0.88, "val_n": 800, "val_n_cal": 200}, 0.1, 10)  # noise
    1.4
    >>> round(val_objective({"val_size": 1.4, "val_coverage": 0.80, "val_n": 800, "val_n_cal": 200}, 0.1, 10), 3)
    4.285
    """
    n, n_cal = metrics.get("val_n"), metrics.get("val_n_cal")
    tol = 3 * math.sqrt(alpha * (1 - alpha) * (1 / n_cal + 1 / n)) if n and n_cal else 0.0
    shortfall = max(0.0, (1 - alpha) - tol - metrics["val_coverage"])
    return metrics["val_size"] + 10 * num_classes * shortfall


class EpochLoop:
    """Owns model, loss, optimizer, schedule and dual state; runs one epoch at a time.

    ``comm`` sums tensors across workers (``LocalComm`` in-process); ``dual_update(dual, grad_sums, counts,
    h_means, step, epoch)`` applies dual step number ``step`` in place (default: ``dual.update``; the Ray stage
    routes it through the driver's coordinator). ``train_counts`` (per-class training counts) weight the
    calibration scores when ``cfg.cal_weighting == "balanced"``.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, num_classes: int, device: torch.device | str = "cpu",
                 comm=None, dual_update: Callable | None = None, train_counts=None):
        self.cfg = cfg
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.model = model.to(self.device)
        # bf16 autocast where it pays (cfg.amp: CUDA; cfg.amp_cpu: CPU as well, with channels-last memory, which
        # oneDNN's bf16 convolutions need to be fast)
        self.amp = cfg.amp and (self.device.type == "cuda" or (cfg.amp_cpu and self.device.type == "cpu"))
        self.channels_last = self.amp and self.device.type == "cpu"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.comm = comm or LocalComm()
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)  # augmentation and in-process shuffles
        # The B_cal/B_pred split has a generator of its own: every rank draws the same keys whatever its share of
        # the batch (rank 0's are used), so the split of the global batch does not depend on the worker count.
        self.split_generator = torch.Generator().manual_seed(cfg.seed + 2)
        self.dual = DualState(num_classes, cfg.dual_config) if methods.get(cfg.method).uses_dual else None
        self.loss_fn = build_loss(cfg, self.dual, self.split_generator, train_counts)
        self.train_counts = train_counts
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg)
        self.dual_update = dual_update or (lambda dual, s, c, h, step, epoch: dual.update(s, c, h, epoch=epoch))
        self.eta = cfg.eta  # the size target in use (resolve_eta replaces it when cfg.eta_relative is set)
        self.epoch = 0  # epochs completed
        self.global_step = 0  # optimizer steps taken
        self.history: list[dict] = []  # one row per (epoch, class)
        self.metrics: list[dict] = []  # one row per epoch
        self._train_class_soft = torch.full((num_classes,), float("nan"), dtype=torch.float64)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits, under bf16 autocast when ``self.amp``."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.model(x)

    # -- one epoch -------------------------------------------------------------------------------------------
    def train_epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    validate: Callable[[], "ValStats"] | None = None) -> dict:
        """One pass over ``batches`` of (x, y); returns sample-weighted means of the loss parts.

        With ``cfg.dual_every_steps = N > 0`` (CaCT methods) ``validate()`` is called after every N-th optimizer
        step and its statistics drive a dual step there; otherwise the dual step waits for :meth:`end_epoch`.
        """
        self.model.train()
        cfg, dev, K = self.cfg, self.device, self.num_classes
        # Fixed keys, so every worker all-reduces a tensor of the same length, even one that saw no batch.
        conformal = methods.get(cfg.method).loss != "ce"
        keys = ("loss", "ce", "penalty") + (("soft_size",) if conformal else ())
        sums: dict[str, float] = dict.fromkeys(keys, 0.0)
        class_size, class_count = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
        n_seen = 0
        every = cfg.dual_every_steps if self.dual is not None and validate is not None else 0
        for x, y in batches:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True).long()
            if y.shape[0] < 2 and self.comm.world_size == 1:
                continue  # a conformal loss needs both a calibration and a prediction part (ranks pool theirs)
            if cfg.augment != "none" and x.dim() == 4:
                x = augment(x, cfg.augment, self.generator)
            logits = self._forward(x)
            if not bool(torch.isfinite(logits).all()):
                raise TrainingDiverged(cfg, self.epoch, self.global_step, "the model's logits")
            loss, diag = self.loss_fn(logits.float(), y)
            if not bool(torch.isfinite(loss)):
                raise TrainingDiverged(cfg, self.epoch, self.global_step, "the loss")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.global_step += 1
            b = y.shape[0]
            n_seen += b
            for k, v in (("loss", loss.detach()), ("ce", diag["ce"]), ("penalty", diag["penalty"]),
                         ("soft_size", diag.get("soft_size"))):
                if k in sums and v is not None:
                    sums[k] += float(v) * b
            if "class_size_sums" in diag:
                class_size += diag["class_size_sums"].detach().double().cpu()
                class_count += diag["class_counts"].detach().double().cpu()
            if every and self.global_step % every == 0:
                self.dual_step(validate())
                self.model.train()
        totals = self.comm.all_reduce_sum(torch.cat([torch.tensor([n_seen, *sums.values()], dtype=torch.float64),
                                                     class_size, class_count]))
        n = max(float(totals[0]), 1.0)
        size_k, count_k = totals[1 + len(sums):1 + len(sums) + K], totals[1 + len(sums) + K:]
        self._train_class_soft = torch.where(count_k > 0, size_k / count_k.clamp(min=1),
                                             torch.full_like(size_k, float("nan")))
        return {f"train_{k}": float(v) / n for k, v in zip(sums, totals[1:1 + len(sums)])}

    @torch.no_grad()
    def validation_statistics(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> ValStats:
        """Thresholds from the calibration rows, then per-class statistics on the other rows.

        ``batches`` yield (x, y, is_cal) for this worker's part of the dual-step data; the calibration scores
        are gathered from every worker so all of them use the same thresholds. The constraint h = S - eta is
        measured as the penalty trains it: soft sets at T under the *smooth* threshold (the training-time
        quantile operator and level) of the calibration rows (weighted like training's B_cal when they come from
        the long-tailed training split, ``dual_source="train"``); the reported hard coverage and size use the
        finite-sample split-CP threshold.
        """
        self.model.eval()
        cfg, dev, K = self.cfg, self.device, self.num_classes
        cal_scores, cal_labels, rest_conf, rest_y = [], [], [], []
        for x, y, is_cal in batches:
            x, y, is_cal = x.to(dev), y.to(dev).long(), is_cal.to(dev).bool()
            logits = self._forward(x)
            if not torch.isfinite(logits).all():  # weights blown up by the last optimizer steps
                raise TrainingDiverged(cfg, self.epoch, self.global_step, "the model's validation logits")
            conf = logprob(logits.float())
            cal_scores.append(conf[is_cal].gather(1, y[is_cal, None]).squeeze(1).cpu())
            cal_labels.append(y[is_cal].cpu())
            rest_conf.append(conf[~is_cal].cpu())
            rest_y.append(y[~is_cal].cpu())
        cal = self.comm.all_gather_cat(torch.cat(cal_scores) if cal_scores else torch.empty(0))
        if cal.numel() == 0:
            raise ValueError("the dual step has no calibration rows: is the validation split empty?")
        # Conformity E is "higher = better": the hard set {k: E >= tau} uses tau = -q̂ of the score -E.
        tau = -float(conformal_quantile(-cal.double(), cfg.alpha))
        weights = None
        if cfg.dual_source == "train":  # long-tailed calibration rows: weighted as training weighs B_cal
            class_w = calibration_weights(cfg, self.train_counts) if self.dual is not None else None
            if class_w is not None:
                labels = self.comm.all_gather_cat(torch.cat(cal_labels) if cal_labels else torch.empty(0).long())
                weights = class_w[labels.long()]
        tau_soft = smooth_dual_threshold(cal, cfg, weights)
        conf = torch.cat(rest_conf) if rest_conf else torch.empty(0, K)
        y = torch.cat(rest_y).long() if rest_y else torch.empty(0, dtype=torch.long)
        h = soft_size(conf.double(), tau_soft, cfg.temperature) - self.eta
        stat_dual = self.dual or DualState(K)  # methods without a dual still report the constraint
        grad_sums, counts, h_sums = stat_dual.statistics(h, y)
        hard = conf >= tau
        z = torch.zeros(K, dtype=torch.float64)
        covered = z.clone().index_add_(0, y, hard.gather(1, y[:, None]).squeeze(1).double())
        size_sums = z.clone().index_add_(0, y, hard.sum(1).double())
        correct = z.clone().index_add_(0, y, (conf.argmax(1) == y).double()) if conf.numel() else z.clone()
        packed = self.comm.all_reduce_sum(torch.stack([grad_sums, counts, h_sums, covered, size_sums, correct]))
        return ValStats(*packed.unbind(0), tau=tau, eta=self.eta, n_cal=int(cal.numel()), tau_soft=tau_soft)

    def resolve_eta(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
        """With ``cfg.eta_relative`` (CaCT methods, before the first epoch): eta = eta_relative x the current
        model's mean soft size on the dual-step ``batches`` (same protocol as the dual step, all workers).
        Otherwise, or once training has started, the eta in use is kept. Returns it."""
        if self.cfg.eta_relative is None or self.dual is None or self.epoch > 0 or self.global_step > 0:
            return self.eta
        self.eta = 0.0  # so that the statistics' h is the soft size itself
        soft = self.validation_statistics(batches).summary()["val_soft_size"]
        self.eta = self.cfg.eta_relative * soft
        self.loss_fn.eta = self.eta
        return self.eta

    def dual_step(self, stats: "ValStats") -> None:
        """Apply the next dual step (number ``dual.steps``) from ``stats``."""
        self.dual_update(self.dual, stats.grad_sums, stats.counts, stats.h_means, self.dual.steps, self.epoch)

    def end_epoch(self, train_metrics: dict, stats: ValStats) -> dict:
        """Dual step (CaCT methods, when not every N steps), lr schedule, and the epoch's history rows (with the
        training and validation soft size per class side by side). Returns the epoch metrics."""
        epoch = self.epoch
        if self.dual is not None and not self.cfg.dual_every_steps:
            self.dual_step(stats)
        self.scheduler.step()
        self.epoch += 1
        K = self.num_classes
        if self.dual is not None:
            lam, rho = self.dual.lam.tolist(), self.dual.rho.tolist()
        else:
            g = self.cfg.conftr_lambda if methods.get(self.cfg.method).loss == "conftr" else 0.0
            lam, rho = [g] * K, [0.0] * K
        cnt = stats.counts.clamp(min=1)
        cov, size, c = (stats.covered / cnt).tolist(), (stats.size_sums / cnt).tolist(), stats.h_means.tolist()
        train_soft = self._train_class_soft.tolist()
        for k in range(K):
            present = stats.counts[k] > 0
            nan = float("nan")
            self.history.append({"method": self.cfg.method, "epoch": epoch, "class": k, "lambda": lam[k],
                                 "rho": rho[k], "constraint": c[k] if present else nan,
                                 "val_coverage": cov[k] if present else nan,
                                 "val_size": size[k] if present else nan,
                                 "val_soft_size": c[k] + stats.eta if present else nan,
                                 "train_soft_size": train_soft[k],
                                 "dual_steps": self.dual.steps if self.dual is not None else 0})
        metrics = {"epoch": epoch, **train_metrics, **stats.summary(), "eta": self.eta, "lambda_max": max(lam),
                   "lambda_min": min(lam), "rho_max": max(rho), "lr": self.optimizer.param_groups[0]["lr"],
                   "dual_steps": self.dual.steps if self.dual is not None else 0}
        metrics["val_objective"] = val_objective(metrics, self.cfg.alpha, K)
        self.metrics.append(metrics)
        return metrics

    # -- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume exactly; loads with ``torch.load(weights_only=True)``."""
        return {"model": self.unwrapped_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch,
                "dual": self.dual.state_dict() if self.dual is not None else None,
                "generator": self.generator.get_state(), "split_generator": self.split_generator.get_state(),
                "global_step": self.global_step, "torch_rng": torch.get_rng_state(),
                "history": list(self.history), "metrics": list(self.metrics), "config": self.cfg.to_dict(),
                "eta": self.eta}

    @property
    def unwrapped_model(self) -> nn.Module:
        """The model without a DistributedDataParallel wrapper (checkpoints hold its keys)."""
        return getattr(self.model, "module", self.model)

    def load_state_dict(self, state: dict) -> None:
        self.unwrapped_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        if self.dual is not None and state.get("dual") is not None:
            self.dual.load_state_dict(state["dual"])
        self.generator.set_state(state["generator"])
        if "split_generator" in state:
            self.split_generator.set_state(state["split_generator"])
        self.global_step = int(state.get("global_step", 0))
        torch.set_rng_state(state["torch_rng"])
        self.history = list(state["history"])
        self.metrics = list(state["metrics"])
        self.eta = float(state.get("eta", self.cfg.eta))
        if hasattr(self.loss_fn, "eta"):
            self.loss_fn.eta = self.eta


def iterate_tensors(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
                    generator: torch.Generator | None = None, extra: torch.Tensor | None = None):
    """Mini-batches of in-memory tensors (optionally with an extra per-row tensor such as ``is_cal``)."""
    idx = torch.randperm(y.shape[0], generator=generator) if shuffle else torch.arange(y.shape[0])
    for start in range(0, y.shape[0], batch_size):
        b = idx[start:start + batch_size]
        yield (x[b], y[b]) if extra is None else (x[b], y[b], extra[b])


def fit_in_process(model: nn.Module, cfg: TrainConfig, train: tuple[torch.Tensor, torch.Tensor],
                   val: tuple[torch.Tensor, torch.Tensor], device: str = "cpu", verbose: bool = False) -> EpochLoop:
    """Train ``model`` on in-memory tensors with the full CaCT protocol, no Ray. Returns the loop (model,
    dual state, history, metrics).

    ``val`` is the dual-step data (D_val); with ``cfg.dual_source == "train"`` the multipliers are estimated
    on the training set instead.
    """
    torch.manual_seed(cfg.seed)
    num_classes = int(max(train[1].max(), val[1].max())) + 1
    if hasattr(model, "fc") and isinstance(model.fc, nn.Linear):
        num_classes = max(num_classes, model.fc.out_features)
    loop = EpochLoop(model, cfg, num_classes, device, train_counts=torch.bincount(train[1], minlength=num_classes))
    dual_x, dual_y = train if cfg.dual_source == "train" else val
    is_cal = val_cal_mask(dual_y, cfg.val_cal_fraction, cfg.seed)

    def validate() -> ValStats:
        return loop.validation_statistics(iterate_tensors(dual_x, dual_y, 512, False, extra=is_cal))

    loop.resolve_eta(iterate_tensors(dual_x, dual_y, 512, False, extra=is_cal))
    for _ in range(cfg.epochs):
        tm = loop.train_epoch(iterate_tensors(*train, cfg.batch_size, True, loop.generator), validate)
        m = loop.end_epoch(tm, validate())
        if verbose:
            print(format_epoch(cfg.method, m))
    return loop


def format_epoch(method: str, m: dict) -> str:
    """One progress line per epoch: loss, val coverage and size, max/min lambda."""
    return (f"[{method}] epoch {m['epoch']:3d}  loss {m.get('train_loss', float('nan')):.4f}  "
            f"val acc {m['val_accuracy']:.3f}  cov {m['val_coverage']:.3f}  size {m['val_size']:.2f}  "
            f"lambda [{m['lambda_min']:.3g}, {m['lambda_max']:.3g}]")


__all__ = ["TrainConfig", "TrainingDiverged", "EpochLoop", "ValStats", "LocalComm", "build_loss", "build_optimizer", "crop_flip",
           "resized_crop_flip", "augment",
           "val_cal_mask", "iterate_tensors", "fit_in_process", "format_epoch", "val_objective", "METHODS"]
