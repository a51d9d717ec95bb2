"""The sweep stage: one tiny Ray Tune run (each trial a Ray Train run) on digits-LT."""
from __future__ import annotations

import json
import time

import polars as pl
import pytest
from ray import tune

from cact_ops.training import TrainConfig
from stages import longtail, sweep, train

pytestmark = pytest.mark.ray


def test_sweep_ranks_trials_on_validation_and_writes_results(ray_cluster, tmp_path):
    splits = longtail.build(longtail.LongTailConfig(dataset="digits", out=str(tmp_path / "splits"),
                                                    imbalance_factor=10))
    base = train.TrainStageConfig(out=str(tmp_path / "run"), loop=TrainConfig(method="cact", epochs=2,
                                                                              batch_size=64), verbose=False)
    res = sweep.run(splits, sweep.SweepConfig(base=base, num_samples=1,
                                              search_space={"lr": tune.grid_search([0.02, 0.05])}))
    df = pl.read_parquet(res.path)
    assert df.height == 2 and set(df["config.lr"]) == {0.02, 0.05}
    assert (df["status"] == "ok").all()
    # the best trial is the one with the lowest validation objective, and it is what best.json records
    assert res.best_objective == df["val_objective"].min()
    best = json.loads((res.path.parent / "best.json").read_text())
    assert best["best_config"] == res.best_config and res.best_config["lr"] in (0.02, 0.05)
    assert "validation" in best["metric"]
    # Finished trials leave no placement group behind (Ray Train's cleaner removes them through the state
    # API): otherwise their CPUs stay reserved and the next fit on this cluster waits forever.
    from ray.util import placement_group_table

    deadline = time.time() + 90
    while time.time() < deadline:
        live = [v for v in placement_group_table().values() if v["state"] != "REMOVED"]
        if not live:
            break
        time.sleep(1)
    assert not live, f"placement groups left after the sweep: {live}"


def test_sweep_rejects_unknown_search_keys():
    with pytest.raises(ValueError, match="not TrainConfig fields"):
        sweep.SweepConfig(search_space={"learning_rate": 0.1})
