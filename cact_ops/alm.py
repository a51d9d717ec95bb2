"""Augmented-Lagrangian machinery of CaCT: the PHR penalty and the per-class dual state.

CaCT replaces ConfTr's single size constraint by K class-conditional constraints
g_k(theta) = E[S(X) | Y = k] - eta <= 0, with one multiplier lambda_k and penalty rho_k per class (CALS, Liu
et al. CVPR 2023). Per sample h_i = S(x_i) - eta.

    P(h; rho, lambda)  = ((max(0, lambda + rho h))^2 - lambda^2) / (2 rho)      (PHR)
    P'(h; rho, lambda) = max(0, lambda + rho h)

Outer step once per epoch on validation data: lambda_k <- clamp(mean_{i in V_k} P'(h_i), lambda_min, lambda_max);
every rho_step steps, rho_k <- min(gamma rho_k, rho_max) where c_k > tau_rho * max(c_k_prev, 0).
The update takes per-class *sums and counts*, so statistics from several workers combine exactly.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch


def phr(h: torch.Tensor, rho: torch.Tensor | float, lam: torch.Tensor | float) -> torch.Tensor:
    """PHR penalty P(h; rho, lambda) = ((max(0, lambda + rho h))^2 - lambda^2) / (2 rho), elementwise.

    >>> phr(torch.tensor([-1.0, 0.0, 2.0]), rho=1.0, lam=0.5)
    tensor([-0.1250,  0.0000,  3.0000])
    """
    return ((lam + rho * h).clamp(min=0) ** 2 - lam**2) / (2 * rho)


def phr_grad(h: torch.Tensor, rho: torch.Tensor | float, lam: torch.Tensor | float) -> torch.Tensor:
    """Derivative of the PHR penalty in h: P'(h; rho, lambda) = max(0, lambda + rho h).

    >>> phr_grad(torch.tensor([-1.0, 0.0, 2.0]), rho=1.0, lam=0.5)
    tensor([0.0000, 0.5000, 2.5000])
    """
    return (lam + rho * h).clamp(min=0)


@dataclass(frozen=True)
class DualConfig:
    """Hyper-parameters of the dual (outer) step; defaults follow CALS (DESIGN.md section 1)."""

    lambda_init: float = 1e-6
    lambda_min: float = 1e-6
    lambda_max: float = 1e6  # CALS default; a tighter cap (e.g. 10) keeps early epochs tame
    rho_init: float = 1.0
    rho_max: float = 10.0
    rho_step: int = 10  # check the rho schedule every rho_step dual steps; 0 disables it
    gamma: float = 1.2  # rho growth factor
    tau_rho: float = 0.9  # required relative decrease of the constraint between checks
    uniform: bool = False  # CaCT-uniform: one shared lambda and rho from the marginal constraint

    def __post_init__(self):
        if not 0 < self.lambda_min <= self.lambda_init <= self.lambda_max:
            raise ValueError(
                "need 0 < lambda_min <= lambda_init <= lambda_max, got "
                f"lambda_min={self.lambda_min}, lambda_init={self.lambda_init}, lambda_max={self.lambda_max}"
            )
        if not 0 < self.rho_init <= self.rho_max:
            raise ValueError(f"need 0 < rho_init <= rho_max, got rho_init={self.rho_init}, rho_max={self.rho_max}")
        if self.rho_step < 0:
            raise ValueError(f"rho_step must be >= 0 (0 = off), got {self.rho_step}")
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")


class DualState:
    """Per-class multipliers lambda_k and penalties rho_k, their update, and a history of every step.

    In ``uniform`` mode one shared lambda and rho are updated from the pooled (marginal) statistics and
    stored repeated K times, so losses read ``lam[y]`` the same way in both modes.

    From validation logits the whole step is one call of the loss that reads this state,
    :meth:`cact_ops.losses.CaCTLoss.dual_step` (``loss_fn.dual_step(logits_val, y_val)``): h = S - eta needs the
    loss's alpha, temperature T, eta and quantile operator, so the step lives there; :meth:`statistics` and
    :meth:`update` are its two halves, for statistics summed over several workers.

    >>> d = DualState(2, DualConfig(rho_step=0))
    >>> sums, counts, h_sums = d.statistics(torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0, 1, 0]))
    >>> d.update(sums, counts, h_sums / counts.clamp(min=1))
    >>> d.lam
    tensor([1.2500e+00, 1.0000e-06], dtype=torch.float64)
    """

    def __init__(self, num_classes: int, config: DualConfig | None = None, **overrides):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.config = DualConfig(**{**asdict(config or DualConfig()), **overrides})
        c = self.config
        self.lam = torch.full((num_classes,), c.lambda_init, dtype=torch.float64)
        self.rho = torch.full((num_classes,), c.rho_init, dtype=torch.float64)
        self.steps = 0
        # Constraint value at the last rho check (NaN = not yet known), per class.
        self.c_prev = torch.full((num_classes,), float("nan"), dtype=torch.float64)
        self.history: list[dict] = []

    @property
    def uniform(self) -> bool:
        return self.config.uniform

    def statistics(self, h: torch.Tensor, labels: torch.Tensor):
        """Per-class sums of P'(h_i; rho_{y_i}, lambda_{y_i}), counts, and sums of h_i on one data shard.

        Returns float64 tensors [K] that can be summed across workers before :meth:`update`.
        """
        if h.shape != labels.shape or h.dim() != 1:
            raise ValueError(f"h and labels must both have shape [n], got {tuple(h.shape)} and {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        if torch.isnan(h).any():
            # A NaN here would turn lambda into NaN through the clamp and silently poison every later step.
            raise ValueError("h contains NaN (did training diverge?)")
        h = h.detach().to(torch.float64).cpu()
        labels = labels.detach().long().cpu()
        grads = phr_grad(h, self.rho[labels], self.lam[labels])
        K = self.num_classes
        sums = torch.zeros(K, dtype=torch.float64).index_add_(0, labels, grads)
        counts = torch.bincount(labels, minlength=K).to(torch.float64)
        h_sums = torch.zeros(K, dtype=torch.float64).index_add_(0, labels, h)
        return sums, counts, h_sums

    def update(self, class_sums, class_counts, class_h_means, epoch: int | None = None) -> None:
        """One dual step from per-class sums of P'(h_i), sample counts and mean constraint values c_k.

        Classes with no sample keep their lambda and rho. ``epoch`` is recorded in the history.
        """
        K = self.num_classes
        sums, counts, c = (torch.as_tensor(t, dtype=torch.float64).flatten().cpu() for t in
                           (class_sums, class_counts, class_h_means))
        for name, t in (("class_sums", sums), ("class_counts", counts), ("class_h_means", c)):
            if t.shape[0] != K:
                raise ValueError(f"{name} must have {K} entries, got {t.shape[0]}")
        if (counts < 0).any():
            raise ValueError("class_counts must be >= 0")
        for name, t in (("class_sums", sums), ("class_counts", counts)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN or inf")
        if torch.isnan(c[counts > 0]).any():
            raise ValueError("class_h_means contains NaN for a class with samples")
        cfg = self.config
        if cfg.uniform:
            total = counts.sum()
            present = total > 0
            # Pool every class into the marginal constraint: c = sum_k n_k c_k / N.
            pooled_c = torch.where(counts > 0, c * counts, torch.zeros_like(c)).sum() / total.clamp(min=1)
            sums = sums.sum().expand(K)
            counts = total.expand(K)
            c = pooled_c.expand(K)
            has = torch.full((K,), bool(present))
        else:
            has = counts > 0
        new_lam = (sums / counts.clamp(min=1)).clamp(cfg.lambda_min, cfg.lambda_max)
        self.lam = torch.where(has, new_lam, self.lam)
        self.steps += 1
        c = torch.where(has, c, torch.full_like(c, float("nan")))
        rho_checked = False
        if cfg.rho_step and self.steps % cfg.rho_step == 0:
            rho_checked = True
            prev = torch.nan_to_num(self.c_prev, nan=float("inf")).clamp(min=0)
            grow = has & (c > cfg.tau_rho * prev)
            self.rho = torch.where(grow, (self.rho * cfg.gamma).clamp(max=cfg.rho_max), self.rho)
            self.c_prev = torch.where(has, c, self.c_prev)
        elif self.steps == 1 or torch.isnan(self.c_prev).any():
            # First sighting of a class: remember its constraint so the first check has a reference.
            self.c_prev = torch.where(torch.isnan(self.c_prev) & has, c, self.c_prev)
        self.history.append(
            {
                "step": self.steps,
                "epoch": epoch if epoch is not None else self.steps - 1,
                "lam": self.lam.tolist(),
                "rho": self.rho.tolist(),
                "constraint": c.tolist(),
                "counts": counts.tolist(),
                "rho_checked": rho_checked,
            }
        )

    def state_dict(self) -> dict:
        """Plain tensors, numbers and lists only, so it loads with ``torch.load(weights_only=True)``."""
        return {
            "num_classes": self.num_classes,
            "config": asdict(self.config),
            "lam": self.lam.clone(),
            "rho": self.rho.clone(),
            "steps": self.steps,
            "c_prev": self.c_prev.clone(),
            "history": copy.deepcopy(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_classes"]) != self.num_classes:
            raise ValueError(f"state has {state['num_classes']} classes, this DualState has {self.num_classes}")
        self.config = DualConfig(**state["config"])
        self.lam = torch.as_tensor(state["lam"], dtype=torch.float64).clone()
        self.rho = torch.as_tensor(state["rho"], dtype=torch.float64).clone()
        self.steps = int(state["steps"])
        self.c_prev = torch.as_tensor(state["c_prev"], dtype=torch.float64).clone()
        self.history = copy.deepcopy(list(state["history"]))

    @classmethod
    def from_state_dict(cls, state: dict) -> "DualState":
        d = cls(int(state["num_classes"]), DualConfig(**state["config"]))
        d.load_state_dict(state)
        return d
