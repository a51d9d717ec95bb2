"""Plugins: Python modules that extend the registries when imported (``register_score``, ``register_metric``,
``methods.register``, ``stages.sources.register_source``). A pipeline's ``--plugins`` and
``python -m stages.evaluate --plugins`` load them by module name before anything reads a registry.

>>> load([])
{}
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import methods, metrics, scores


def _registered() -> dict[str, set[str]]:
    return {"score": set(scores.SCORE_REGISTRY), "metric": set(metrics.METRIC_REGISTRY),
            "method": set(methods.names())}


def load(modules) -> dict[str, dict[str, list[str]]]:
    """Import each module (the working folder is searched too, as ``python -m`` does) and return what each one
    registered: ``{module: {"score": [...], "metric": [...], "method": [...]}}`` (a module imported before
    registered nothing new). An import failure names the module and the folders searched."""
    if modules and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    added = {}
    for name in modules:
        before = _registered()
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"plugin {name!r} could not be imported ({e}); give a module importable from the "
                              f"working folder {os.getcwd()} or installed in this Python") from e
        after = _registered()
        added[name] = {kind: sorted(after[kind] - before[kind]) for kind in after}
    return added


class LoadPlugins(argparse.Action):
    """``--plugins MODULE [MODULE ...]``: the modules are loaded while the command line is parsed, so the flags
    checked after it (``--methods``, ``--scores``) accept what they registered. An import failure is a usage
    error naming the module."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            loaded = load(values)
        except ImportError as e:
            parser.error(f"{option_string}: {e}")
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), **loaded})


def describe(loaded: dict[str, dict[str, list[str]]]) -> str:
    """One line per plugin: what it registered.

    >>> describe({"my_plugin": {"score": ["sq"], "metric": [], "method": ["ce_ls"]}})
    'plugin my_plugin: score sq, method ce_ls'
    """
    lines = []
    for name, kinds in loaded.items():
        what = ", ".join(f"{kind} {', '.join(names)}" for kind, names in kinds.items() if names)
        lines.append(f"plugin {name}: {what or 'nothing new registered'}")
    return "\n".join(lines)
