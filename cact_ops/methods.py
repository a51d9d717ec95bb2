"""The training methods, one registry entry each: which loss a method trains with, whether it has a dual step,
and how the two-stage protocol treats it. Code asks the entry (``get(name).uses_dual``) instead of testing the
method's name, so a new method is one :func:`register` call.

>>> [m.name for m in all_methods()][:2]
['ce', 'ce_finetune']
>>> get("cact_uniform").uses_dual, get("ce_finetune").finetune_only
(True, True)
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One training method.

    ``loss``: which loss family trains it (``ce``, ``conftr`` or ``cact``); ``uses_dual``: it has per-class (or
    uniform) multipliers updated by the dual step; ``classwise_tau``: ConfTr-class's per-class smooth thresholds;
    ``uniform``: CaCT-uniform's one shared multiplier; ``finetune_only``: the method only exists as the second
    stage of the two-stage protocol (the CE fine-tune control); ``control``: the method every other one is
    compared against in paired statistics.
    """

    name: str
    loss: str
    description: str
    uses_dual: bool = False
    classwise_tau: bool = False
    uniform: bool = False
    finetune_only: bool = False
    control: bool = False

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


def order_key(name: str) -> tuple[int, str]:
    """Sort key: registered methods in registry order, unknown names after them alphabetically."""
    keys = list(_REGISTRY)
    return (keys.index(name) if name in keys else len(keys), name)


register(Method("ce", "ce", "cross-entropy backbone (+ post-hoc CP)"))
register(Method("ce_finetune", "ce", "CE fine-tuned from the backbone with the conformal methods' protocol: "
                                       "the control (is it the loss or the extra epochs?)",
                finetune_only=True, control=True))
register(Method("conftr", "conftr", "ConfTr: one global size penalty (Stutz et al., ICLR 2022)"))
register(Method("conftr_class", "conftr", "ConfTr with class-wise smooth thresholds", classwise_tau=True))
register(Method("cact_uniform", "cact", "CaCT-uniform: one shared multiplier from the marginal constraint",
                uses_dual=True, uniform=True))
register(Method("cact", "cact", "CaCT: one multiplier per class (Marani et al., arXiv 2601.09522)",
                uses_dual=True))
