"""A pipeline with --sweep runs end to end on 2 CPUs: Ray Tune sweeps CE, the best config is trained, and
inference and evaluation follow (the two-stage protocol of sweeping the fine-tunes from that backbone is
checked without Ray in tests/stages/test_sweep.py). Four trials on 2 CPUs run three at a time, so the fourth
starts only if finished trials hand their CPUs back (a sweep used to hang there, and a pipeline's inference
after it)."""
from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path

import polars as pl
import pytest

pytestmark = pytest.mark.ray

SCRIPT = Path(__file__).resolve().parents[2] / "pipelines" / "digits_lt.py"


def test_a_pipeline_with_sweeps_runs_end_to_end_and_hands_the_cluster_back(ray_cluster, tmp_path, monkeypatch,
                                                                           capsys):
    out = tmp_path / "run"
    # --num-workers 1: every trial a Ray Train worker group reporting through TuneReportCallback (the digits
    # default, local mode, is checked below)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--out", str(out), "--methods", "ce", "--sweep", "4",
                                      "--epochs", "2", "--finetune-epochs", "2", "--n-splits", "3", "--alpha", "0.1",
                                      "--num-workers", "1"])
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    runpy.run_path(str(SCRIPT), run_name="__main__")
    printed = capsys.readouterr().out
    for method in ("ce",):
        df = pl.read_parquet(out / "sweep" / method / "results.parquet")
        assert df.height == 4 and (df["status"] == "ok").all()
        assert (df["epochs_run"] >= 1).all()  # every trial ran (one stopped by a time budget before it started: 0)
        # the best is the lowest validation objective among the trials that ran every epoch (ASHA stops some
        # after 1), and it is what best.json records and the final training used
        full = df.filter(pl.col("epochs_run") == 2)
        best = json.loads((out / "sweep" / method / "best.json").read_text())
        assert full.height >= 1 and best["val_objective"] == full["val_objective"].min()
        assert "validation" in best["metric"] and f"sweep {method}: best" in printed
        trained = json.loads((out / "train" / method / "config.json").read_text())["loop"]
        assert all(trained[k] == v for k, v in best["best_config"].items()), (trained, best)
    assert json.loads((out / "config.json").read_text())["sweep_best"]["ce"] == best["best_config"]
    summary = pl.read_parquet(out / "eval" / "summary.parquet")
    assert set(summary["method"]) == {"ce"} and summary["coverage_mean"].is_finite().all()
    # In Ray Train's local mode each trial trains in its own Tune trial process and reports every epoch to Tune
    from cact_ops.training import TrainConfig
    from stages import sweep, train

    local = sweep.run(out / "splits", sweep.SweepConfig(
        base=train.TrainStageConfig(out=str(tmp_path / "local"), loop=TrainConfig(method="ce", epochs=2),
                                    num_workers=0), num_samples=3, search_space={"lr": 0.05, "weight_decay": 1e-4}))
    assert local.results.height == 3 and (local.results["status"] == "ok").all()
    assert local.results["epochs_run"].max() == 2 and local.results["val_objective"].is_finite().all()
    # Nothing of the sweeps holds the cluster afterwards: their placement groups are gone.
    from ray.util import placement_group_table

    deadline = time.time() + 60
    while time.time() < deadline:
        live = [v for v in placement_group_table().values() if v["state"] != "REMOVED"]
        if not live:
            break
        time.sleep(1)
    assert not live, f"placement groups left after the run: {live}"
