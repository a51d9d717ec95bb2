"""The sweep stage's protocol and search spaces, without Ray (a real sweep runs end to end in
tests/pipelines/test_sweep_pipeline.py)."""
from __future__ import annotations

import dataclasses

import pytest

from cact_ops.training import TrainConfig
from stages import sweep, train


def test_sweep_rejects_unknown_search_keys():
    with pytest.raises(ValueError, match="not TrainConfig fields"):
        sweep.SweepConfig(search_space={"learning_rate": 0.1})


def test_run_methods_sweeps_fine_tunes_from_the_swept_backbone(monkeypatch, tmp_path):
    """Two-stage protocol: CE is swept first, the backbone is trained with CE's best config, and every conformal
    method is swept as the fine-tune it will be (init_from the backbone, fine-tune epochs and lr). No Ray needed:
    the sweep and the fit are replaced by recorders."""
    swept, fitted = [], []

    def fake_run(splits, config):
        swept.append(config.base)
        return sweep.SweepResult(method=config.base.method, results=None, best_config={"lr": 0.5},
                                 best_objective=1.0, path=tmp_path)

    def fake_fit_methods(splits, out, methods, loop, overrides, **kw):
        fitted.append((methods, dict(overrides)))
        return {"ce": train.TrainResult(method="ce", method_dir=tmp_path, model_path=tmp_path / "model.pt",
                                        history_path=tmp_path, metrics_path=tmp_path, final_metrics={})}

    monkeypatch.setattr(sweep, "run", fake_run)
    monkeypatch.setattr(train, "fit_methods", fake_fit_methods)
    loop = TrainConfig(epochs=30, lr=0.1, warmup_epochs=5, milestones=(20, 25))
    best, backbone = sweep.run_methods("splits", str(tmp_path), ("cact", "ce", "conftr"), loop, num_samples=3,
                                       finetune_epochs=4)
    assert backbone.model_path == tmp_path / "model.pt"  # handed to fit_methods, which then does not retrain CE
    assert [b.method for b in swept] == ["ce", "cact", "conftr"]  # CE first, whatever the order given
    ce, cact, conftr = swept
    assert ce.init_from is None and ce.loop.epochs == 30 and ce.loop.lr == 0.1
    assert fitted == [(("ce",), {"ce": {"lr": 0.5}})]  # the backbone is trained once, with CE's best config
    for b in (cact, conftr):
        assert b.init_from == str(tmp_path / "model.pt")
        assert (b.loop.epochs, b.loop.lr, b.loop.warmup_epochs, b.loop.milestones) == (4, 0.01, 0, ())
    assert best == {m: {"lr": 0.5} for m in ("ce", "cact", "conftr")}
    # from scratch: no backbone, every method swept for the full epochs
    swept.clear(), fitted.clear()
    _, backbone = sweep.run_methods("splits", str(tmp_path), ("cact",), loop, num_samples=3, finetune_epochs=4,
                                    from_scratch=True)
    assert fitted == [] and backbone is None and swept[0].init_from is None and swept[0].loop.epochs == 30
    # CE is swept with the backbone's config: CaCT-only knobs at their defaults (train.ce_config)
    swept.clear(), fitted.clear()
    sweep.run_methods("splits", str(tmp_path), ("ce",), dataclasses.replace(loop, eta_relative=0.9, eta=0.7),
                      num_samples=3)
    assert swept[0].loop == train.ce_config(loop)


def test_default_search_space_follows_the_starting_config():
    lo_hi = lambda d: (d.lower, d.upper)  # noqa: E731
    assert lo_hi(sweep.default_search_space("ce", TrainConfig(lr=0.1))["lr"]) == pytest.approx((0.01, 1.0))
    ft = train.finetune_config(TrainConfig(lr=0.1, eta_relative=None), "cact")  # searched around lr / 10
    space = sweep.default_search_space("cact", ft)
    assert lo_hi(space["lr"]) == pytest.approx((0.001, 0.1)) and "eta" in space and "eta_relative" not in space
    rel = sweep.default_search_space("cact", TrainConfig(eta_relative=0.9))
    assert "eta" not in rel and set(rel["eta_relative"].categories) <= {0.7, 0.8, 0.9, 1.0}
    assert set(rel["reduction"].categories) == {"sample", "class"}  # class weighting is a searched choice
    assert set(sweep.default_search_space("ce_finetune", ft)) == {"lr", "weight_decay"}


def _sweep_config(out, **kw):
    from ray import tune

    loop = TrainConfig(method="conftr", epochs=2, lr=0.05)
    base = train.TrainStageConfig(out=str(out), loop=loop, init_from=str(out / "train" / "ce" / "model.pt"))
    space = {"lr": tune.loguniform(0.005, 0.5), "temperature": tune.choice([0.1, 1.0])}
    return sweep.SweepConfig(base=base, search_space=space, **{"num_samples": 4, **kw})


def test_a_finished_sweep_is_reused_by_its_key_and_not_run_again(tmp_path):
    """Tune gives the trials of a rerun new ids, so without a key a pipeline rerun swept everything again. The
    key covers what decides the outcome (space, sampling, the base run, the splits) and nothing about where or
    how the run executes: a moved run folder or another CPU share still finds its sweep."""
    import json

    import polars as pl

    from stages import longtail

    splits = longtail.build(longtail.LongTailConfig(dataset="digits", out=str(tmp_path / "splits"), imbalance_factor=10))
    cfg = _sweep_config(tmp_path / "run")
    key = sweep.sweep_key(cfg, cfg.search_space, splits)
    assert key == sweep.sweep_key(_sweep_config(tmp_path / "run"), _sweep_config(tmp_path).search_space, splits)
    moved = _sweep_config(tmp_path / "elsewhere")
    moved = dataclasses.replace(moved, base=dataclasses.replace(moved.base, cpus_per_worker=0.25, verbose=False))
    assert sweep.sweep_key(moved, moved.search_space, splits) == key
    for other in (_sweep_config(tmp_path / "run", num_samples=5), _sweep_config(tmp_path / "run", seed=1)):
        assert sweep.sweep_key(other, other.search_space, splits) != key
    wider = _sweep_config(tmp_path / "run")
    from ray import tune

    wider.search_space["lr"] = tune.loguniform(0.005, 1.0)
    assert sweep.sweep_key(wider, wider.search_space, splits) != key
    # a finished sweep of this key: run() returns it without starting Ray or Tune
    out = tmp_path / "run" / "sweep" / "conftr"
    out.mkdir(parents=True)
    pl.DataFrame({"trial_id": ["a"], "val_objective": [1.5]}).write_parquet(out / "results.parquet")
    (out / "best.json").write_text(json.dumps({"best_config": {"lr": 0.1}, "val_objective": 1.5, "sweep_key": key}))
    done = sweep.run(splits, cfg)
    assert done.reused and done.best_config == {"lr": 0.1} and done.results.height == 1
    # a best.json of another key is not this sweep
    (out / "best.json").write_text(json.dumps({"best_config": {"lr": 0.1}, "val_objective": 1.5, "sweep_key": "x"}))
    assert sweep._finished(out, key, "conftr") is None
