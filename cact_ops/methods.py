"""The training methods, one registry entry each: which loss a method trains with, whether it has a dual step,
and how the two-stage protocol treats it. Code asks the entry (``get(name).uses_dual``) instead of testing the
method's name, so a new method is one :func:`register` call; a new loss is a ``build_loss`` on its entry.

Ray workers get the entries of the methods they train from the driver (:func:`adopt`), so a method registered
in the driver's process (a pipeline's ``--plugins`` module, a user's script) trains on a cluster as is.

>>> [m.name for m in all_methods()][:2]
['ce', 'ce_finetune']
>>> get("cact_uniform").uses_dual, get("ce_finetune").finetune_only
(True, True)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Method:
    """One training method.

    ``loss``: which loss family trains it (``ce``, ``conftr`` or ``cact``); ``uses_dual``: it has per-class (or
    uniform) multipliers updated by the dual step; ``classwise_tau``: ConfTr-class's per-class smooth thresholds;
    ``uniform``: CaCT-uniform's one shared multiplier; ``finetune_only``: the method only exists as the second
    stage of the two-stage protocol (the CE fine-tune control); ``control``: the method every other one is
    compared against in paired statistics; ``backbone``: the method the two-stage protocol trains first and
    fine-tunes every other one from.

    ``build_loss(cfg, dual=..., **common)`` replaces the family's loss module (``cfg``: the TrainConfig;
    ``dual``: the DualState of a ``cact`` method, else None; ``common``: the conformal losses' shared keyword
    arguments, see :func:`cact_ops.training.build_loss`); the training loop treats the result as its family's
    loss (a ``ce`` method's diagnostics hold ``ce`` and ``penalty``, a conformal one's also ``soft_size``).
    ``search_space(loop)`` gives the Tune domains of the method's own knobs, added to the family's.
    """

    name: str
    loss: str
    description: str
    uses_dual: bool = False
    classwise_tau: bool = False
    uniform: bool = False
    finetune_only: bool = False
    control: bool = False
    backbone: bool = False
    build_loss: Callable[..., Any] | None = None
    search_space: Callable[..., dict] | None = None

    def __post_init__(self):
        if self.loss not in ("ce", "conftr", "cact"):
            raise ValueError(f"Method.loss must be one of ('ce', 'conftr', 'cact'), got {self.loss!r}")
        if self.uses_dual != (self.loss == "cact"):
            raise ValueError(f"Method {self.name!r}: uses_dual must be True exactly for the cact loss")


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method (its name must be new). The order of registration is the order of tables and plots."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a registered method (``KeyError`` if it is not there)."""
    del _REGISTRY[name]


def adopt(method: Method) -> Method:
    """Register ``method`` in this process under its name, replacing an entry of that name: the driver's entry is
    the truth, and a Ray worker that trained an earlier plugin's method of the same name must not keep it."""
    if not isinstance(method, Method):
        raise TypeError(f"adopt needs a Method, got {type(method).__name__}")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_REGISTRY)}") from None


def all_methods() -> list[Method]:
    return list(_REGISTRY.values())


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def control() -> str:
    """The control every method is compared against (the CE fine-tune)."""
    return next(m.name for m in _REGISTRY.values() if m.control)


def backbone() -> str:
    """The method the two-stage protocol trains first (the CE backbone)."""
    return next(m.name for m in _REGISTRY.values() if m.backbone)


def order_key(name: str) -> tuple[int, str]:
    """Sort key: registered methods in registry order, unknown names after them alphabetically."""
    keys = list(_REGISTRY)
    return (keys.index(name) if name in keys else len(keys), name)


register(Method("ce", "ce", "cross-entropy backbone (+ post-hoc CP)", backbone=True))
register(Method("ce_finetune", "ce", "CE fine-tuned from the backbone with the conformal methods' protocol: "
                                       "the control (is it the loss or the extra epochs?)",
                finetune_only=True, control=True))
register(Method("conftr", "conftr", "ConfTr: one global size penalty (Stutz et al., ICLR 2022)"))
register(Method("conftr_class", "conftr", "ConfTr with class-wise smooth thresholds", classwise_tau=True))
register(Method("cact_uniform", "cact", "CaCT-uniform: one shared multiplier from the marginal constraint",
                uses_dual=True, uniform=True))
register(Method("cact", "cact", "CaCT: one multiplier per class (Marani et al., arXiv 2601.09522)",
                uses_dual=True))
