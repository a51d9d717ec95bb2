"""TrainConfig: every knob of one training run, written once. The pipelines generate a flag per field (its
comment is the flag's help), ``CHOICES`` / ``RANGES`` check the values, and ``_conformal`` marks the fields the
CE backbone never reads. Imported as :class:`cact_ops.training.TrainConfig` too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Callable, ClassVar

from ._checks import is_count, is_real
from .alm import DualConfig
from . import methods
from .losses import check_method
from .smooth import QUANTILE_OPERATORS


def _conformal(default):
    """A field read only by the conformal losses and the dual step: the CE backbone keeps it at its default."""
    return field(default=default, metadata={"conformal": True})


@dataclass
class TrainConfig:
    """Every knob of one training run. The paper's names: alpha, T (temperature), eta, lambda, rho.

    The comment above or beside a field is its documentation (the pipelines' --help shows it)."""

    method: str = "cact"  # a name of cact_ops.methods: ce, ce_finetune, conftr, conftr_class, cact_uniform, cact
    epochs: int = 20
    batch_size: int = 128  # global mini-batch size (split across Ray Train workers)
    optimizer: str = "sgd"
    lr: float = 0.05  # learning rate (fine-tunes from a backbone use a tenth of it)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # per-epoch learning-rate schedule after the warm-up
    warmup_epochs: int = 0  # epochs of linear learning-rate warm-up
    milestones: tuple[int, ...] = ()  # epochs where the step schedule multiplies the lr by 0.1
    grad_clip: float = 5.0  # max gradient norm; 0 disables clipping
    amp: bool = True  # bf16 autocast on CUDA (on CPU too with amp_cpu)
    # bf16 autocast and channels-last convolutions on CPU as well: about 2x faster CIFAR ResNet steps on a CPU with
    # avx512_bf16 or AMX (benchmarks/cpu_amp.py), slower where bf16 is emulated, so CPU runs stay fp32 by default
    amp_cpu: bool = False
    # crop_flip: pad-4 random crop + horizontal flip (CIFAR); crop: pad-2 random crop without flip (digits, whose
    # mirror images are other symbols); resized_crop_flip: RandomResizedCrop + flip (ImageNet-LT)
    augment: str = "none"

    # Conformal training (ConfTr and CaCT)
    alpha: float = 0.1  # miscoverage level of the training-time threshold (evaluation has its own alphas)
    temperature: float = 1.0  # T of the soft sets
    # epsilon of torchsort's soft sort. torchsort's l2 soft sort equals the hard sort whenever neighbouring
    # values are further apart than the strength, so 0.1 (ConfTr's value, in other units) leaves the quantile
    # hard on log-prob scores and its gradient on two samples; 1.0 smooths it (tests/cact_ops/test_cact_longtail)
    regularization_strength: float = _conformal(1.0)
    # the smooth quantile's operator: torchsort's l2 or kl soft sort, or sigmoid (a smoothed CDF, no sort; its
    # width is regularization_strength in score units): cact_ops.smooth.soft_quantile
    quantile_operator: str = _conformal("l2")
    cal_fraction: float = _conformal(0.5)  # fraction of each (global) mini-batch used as B_cal
    # How B_cal's scores are weighted in the smooth threshold: "balanced" weighs class k by 1 / n_k (its training
    # count) so that the long-tailed batch stands for the balanced population that calibrates at test time and in
    # the dual step; "none" is ConfTr's plain batch quantile (docs/DESIGN.md section 4)
    cal_weighting: str = _conformal("balanced")
    stratified_split: bool = _conformal(False)  # B_cal / B_pred split stratified by class
    ce_weight: float = _conformal(1.0)  # weight of CE beside the conformal penalty (0: DeepMind's ConfTr without CE)

    # ConfTr
    conftr_lambda: float = _conformal(1.0)  # the global weight of ConfTr's size penalty
    kappa: float = _conformal(1.0)  # ConfTr's target size: the penalty is max(0, size - kappa)
    size_transform: str = _conformal("none")  # log: ConfTr's log(size) penalty
    coverage_weight: float = _conformal(0.0)  # weight of ConfTr's coverage (classification) loss

    # CaCT (augmented Lagrangian)

    # target soft size per class. A confident correct sample has a soft size of about sigmoid(-tau / T), which
    # depends on the hard threshold tau: eta = 1 was unattainable on the synthetic long-tail test (1.2 worked),
    # while on MNIST-LT soft sizes sit near 0.6 (docs/DESIGN.md section 4, docs/RESULTS.md).
    eta: float = _conformal(1.2)
    # eta relative to the starting model instead (the default; None uses the absolute eta): eta = eta_relative x
    # the mean soft size of the initial model (the CE backbone when fine-tuning) on the dual-step data, measured
    # once before the first epoch. 0.9 asks every class for sets 10% smaller than the backbone's average, whatever
    # the accuracy, alpha and T, so classes with larger sets (the tail) bind. An absolute eta = 1.2 never bound on
    # an accurate backbone (the digits demo trained five copies of one model). CaCT only.
    eta_relative: float | None = _conformal(0.9)
    # class: every class's constraint weighs the same (the K constraints of CaCT); sample: class k weighs pi_k
    reduction: str = _conformal("class")
    lambda_init: float = _conformal(DualConfig.lambda_init)  # starting multipliers lambda_k
    lambda_min: float = _conformal(DualConfig.lambda_min)  # floor of the multipliers
    lambda_max: float = _conformal(DualConfig.lambda_max)  # cap of the multipliers (CALS's 1e6)
    rho_init: float = _conformal(DualConfig.rho_init)  # starting penalty parameters rho_k
    rho_max: float = _conformal(DualConfig.rho_max)  # cap of rho_k
    # dual steps between rho checks (0: rho fixed). CALS checks every 10 epochs of 100+; a 10-epoch fine-tune
    # needs ~2, or the schedule never acts
    rho_step: int = _conformal(2)
    gamma: float = _conformal(DualConfig.gamma)  # rho's growth factor when a constraint did not shrink enough
    tau_rho: float = _conformal(DualConfig.tau_rho)  # required relative decrease of a constraint between checks
    dual_source: str = _conformal("val")  # where the multipliers are estimated (the paper's open question 2)
    val_cal_fraction: float = 0.2  # f_val: calibration part of the dual-step data
    # a dual step every N optimizer steps; 0: once per epoch, at its end
    dual_every_steps: int = _conformal(0)
    seed: int = 0

    # The accepted values of the string fields.
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "optimizer": ("sgd", "adamw"), "schedule": ("cosine", "step", "constant"),
        "augment": ("none", "crop_flip", "crop", "resized_crop_flip"), "size_transform": ("none", "log"), "reduction": ("class", "sample"),
        "dual_source": ("val", "train"), "cal_weighting": ("balanced", "none"), "quantile_operator": QUANTILE_OPERATORS}
    # The accepted values of the numeric fields: (in words, test).
    RANGES: ClassVar[dict[str, tuple[str, Callable]]] = {
        "epochs": ("an integer >= 1", lambda v: is_count(v) and v >= 1),
        "batch_size": ("an integer >= 2", lambda v: is_count(v) and v >= 2),
        "lr": ("a finite number > 0", lambda v: is_real(v) and v > 0),
        "momentum": ("a number in [0, 1)", lambda v: is_real(v) and 0 <= v < 1),
        "weight_decay": ("a finite number >= 0", lambda v: is_real(v) and v >= 0),
        "warmup_epochs": ("an integer >= 0", is_count),
        "milestones": ("epochs (integers >= 0)", lambda v: all(is_count(m) for m in v)),
        "grad_clip": ("a finite number >= 0 (0: no clipping)", lambda v: is_real(v) and v >= 0),
        "alpha": ("a number in the open interval (0, 1)", lambda v: is_real(v) and 0 < v < 1),
        "temperature": ("a finite number > 0", lambda v: is_real(v) and v > 0),
        "regularization_strength": ("a finite number > 0", lambda v: is_real(v) and v > 0),
        "cal_fraction": ("a number in the open interval (0, 1)", lambda v: is_real(v) and 0 < v < 1),
        "ce_weight": ("a finite number >= 0", lambda v: is_real(v) and v >= 0),
        "conftr_lambda": ("a finite number >= 0", lambda v: is_real(v) and v >= 0),
        "kappa": ("a finite number >= 0", lambda v: is_real(v) and v >= 0),
        "coverage_weight": ("a finite number >= 0", lambda v: is_real(v) and v >= 0),
        "eta": ("a finite number > 0", lambda v: is_real(v) and v > 0),
        "eta_relative": ("a finite number > 0, or None (the absolute eta)",
                         lambda v: v is None or (is_real(v) and v > 0)),
        "lambda_max": ("a finite number > 0", lambda v: is_real(v) and v > 0),
        "rho_step": ("an integer >= 0 (0: rho fixed)", is_count),
        "val_cal_fraction": ("a number in the open interval (0, 1)", lambda v: is_real(v) and 0 < v < 1),
        "dual_every_steps": ("an integer >= 0 (0: once per epoch)", is_count),
        "seed": ("an integer >= 0", is_count),
    }

    def __post_init__(self):
        self.milestones = tuple(self.milestones)
        check_method(self.method)
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name, (accepted, ok) in self.RANGES.items():
            if not ok(getattr(self, name)):
                raise ValueError(f"TrainConfig.{name} must be {accepted}, got {getattr(self, name)!r}")
        self.dual_config  # noqa: B018 - DualConfig checks the multipliers' and rho's bounds

    @classmethod
    def conformal_fields(cls) -> tuple[str, ...]:
        """The fields CE never reads (the CE backbone keeps them at their defaults)."""
        return tuple(f.name for f in fields(cls) if f.metadata.get("conformal"))

    @property
    def dual_config(self) -> DualConfig:
        names = {f.name for f in fields(DualConfig)} - {"uniform"}
        return DualConfig(uniform=methods.get(self.method).uniform, **{n: getattr(self, n) for n in names})

    def to_dict(self) -> dict:
        return asdict(self)
