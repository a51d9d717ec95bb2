"""cact_ops.plugins and the method registry's extension hooks: a plugin module registers through the public
registries, a registered method's build_loss is the loss training builds, and a Ray worker adopts the driver's
entry."""
from __future__ import annotations

import argparse
import math
import pickle

import pytest
import torch

from cact_ops import methods, plugins
from cact_ops.losses import CELoss
from cact_ops.training import TrainConfig, build_loss, fit_in_process


def test_loading_a_plugin_says_what_it_registered(toy_plugin):
    loaded = plugins.load([toy_plugin])
    assert loaded == {toy_plugin: {"score": ["class_offset"], "metric": ["singletons"], "method": ["ce_smoothed"]}}
    assert plugins.describe(loaded) == \
        "plugin tests.toy_plugin: score class_offset, metric singletons, method ce_smoothed"
    assert plugins.load([toy_plugin]) == {toy_plugin: {"score": [], "metric": [], "method": []}}  # imported once


def test_a_missing_plugin_is_a_usage_error_naming_it(capsys):
    with pytest.raises(ImportError, match="plugin 'no_such_plugin_module' could not be imported"):
        plugins.load(["no_such_plugin_module"])
    p = argparse.ArgumentParser()
    p.add_argument("--plugins", nargs="+", action=plugins.LoadPlugins)
    with pytest.raises(SystemExit):
        p.parse_args(["--plugins", "no_such_plugin_module"])
    assert "--plugins: plugin 'no_such_plugin_module'" in capsys.readouterr().err


def test_a_registered_method_trains_with_its_own_loss(toy_plugin):
    plugins.load([toy_plugin])
    cfg = TrainConfig(method="ce_smoothed", epochs=2, batch_size=16, lr=0.1)
    loss = build_loss(cfg, None)
    assert isinstance(loss, CELoss) and loss.label_smoothing == 0.1
    # The label-smoothed CE never falls below the entropy of its smoothed target (0.95 / 0.05 for 2 classes:
    # 0.199 nats); plain CE on separable data goes well below it. So the loop trained with the plugin's loss.
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = torch.randn(64, 2, generator=g) + 6 * y[:, None].float()
    floor = -(0.95 * math.log(0.95) + 0.05 * math.log(0.05))
    final = {}
    for method in ("ce", "ce_smoothed"):
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 2)
        loop = fit_in_process(model, TrainConfig(method=method, epochs=60, batch_size=16, lr=0.5), (x, y), (x, y))
        final[method] = loop.metrics[-1]["train_ce"]
    assert final["ce"] < floor - 0.05 and final["ce_smoothed"] >= floor - 1e-6


def test_a_worker_adopts_the_drivers_entry_in_place_of_its_own():
    entry = methods.Method("toy_adopted", "ce", "a method only the driver registered",
                           build_loss=lambda cfg, dual=None, **common: CELoss(label_smoothing=0.2))
    try:
        methods.adopt(entry)
        assert methods.get("toy_adopted") is entry and "toy_adopted" in methods.names()
        other = methods.Method("toy_adopted", "ce", "the driver's newer entry")
        methods.adopt(other)  # a worker that trained the older entry takes the newer one
        assert methods.get("toy_adopted") is other
        assert pickle.loads(pickle.dumps(other)) == other  # entries without functions pickle plainly too
    finally:
        methods.unregister("toy_adopted")
    with pytest.raises(KeyError):
        methods.unregister("toy_adopted")
    with pytest.raises(TypeError, match="adopt needs a Method"):
        methods.adopt("cact")
