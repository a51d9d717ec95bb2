"""The Ray Train stage: distributed exactness, fault tolerance, driver restart, determinism, bad input.

Every Ray Train fit costs ~15-25 s here, so the fits are few and each test asserts several things.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import polars as pl
import pytest
import torch

from cact_ops.models import build_model
from cact_ops.training import TrainConfig, fit_in_process
from stages import longtail, train
from stages.payload import read_split_tensors

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits_splits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "splits"
    return longtail.build(longtail.LongTailConfig(dataset="digits", out=str(out), imbalance_factor=10))


def _dual_history(result: train.TrainResult) -> list:
    return json.loads((result.method_dir / "dual.json").read_text())["history"]


def test_two_workers_give_the_statistics_and_multipliers_of_one(ray_cluster, digits_splits, tmp_path):
    # lr = 0 and a model without BatchNorm: the model is fixed, so the dual step sees the same model whatever
    # the sharding, and the per-class sums from two workers must add up to those of one process.
    cfg = TrainConfig(method="cact", epochs=2, batch_size=64, lr=0.0, weight_decay=0.0, lambda_max=50.0, seed=3)
    r = train.fit(digits_splits, train.TrainStageConfig(out=str(tmp_path / "two"), loop=cfg, num_workers=2,
                                                        model_family="linear", verbose=False))
    torch.manual_seed(cfg.seed)
    spec = train.model_spec(train.TrainStageConfig(model_family="linear"), digits_splits)
    model = build_model(spec["family"], spec["num_classes"], **spec["kwargs"])
    local = fit_in_process(model, cfg, read_split_tensors(digits_splits, "train"),
                           read_split_tensors(digits_splits, "val"))
    ray_hist = _dual_history(r)
    assert len(ray_hist) == len(local.dual.history) == 2
    for a, b in zip(ray_hist, local.dual.history):
        # float32 forward passes on different batch shapes differ in the last bits only
        assert torch.allclose(torch.tensor(a["lam"]), torch.tensor(b["lam"]), rtol=1e-5, atol=1e-9)
        assert torch.allclose(torch.tensor(a["constraint"]), torch.tensor(b["constraint"]), rtol=1e-5, atol=1e-7)
        assert a["counts"] == b["counts"]  # every validation row counted exactly once across the two workers
    val_counts = digits_splits.manifest["counts"]["val"]
    assert ray_hist[0]["counts"] == [n - round(cfg.val_cal_fraction * n) for n in val_counts]
    # outputs: model rebuilds and history has one row per epoch x class
    hist = pl.read_parquet(r.history_path)
    assert hist.height == 2 * digits_splits.num_classes
    assert set(hist.columns) >= {"method", "epoch", "class", "lambda", "rho", "constraint", "val_coverage", "val_size"}
    model2, blob = train.load_model(r.model_path)
    assert blob["model_spec"]["family"] == "linear"


def test_killed_worker_resumes_and_matches_an_unbroken_run(ray_cluster, digits_splits, tmp_path):
    # eta_relative: eta is measured once on the starting model; the restarted run must take it from the
    # checkpoint, not measure it again on the trained model
    cfg = TrainConfig(method="cact", epochs=3, batch_size=64, lr=0.05, lambda_max=10.0, rho_step=2, seed=7,
                      eta_relative=0.9)
    unbroken = train.fit(digits_splits, train.TrainStageConfig(out=str(tmp_path / "a"), loop=cfg, verbose=False))
    broken = train.fit(digits_splits, train.TrainStageConfig(out=str(tmp_path / "b"), loop=cfg, fail_at_epoch=1,
                                                             max_failures=1, verbose=False))
    assert (tmp_path / "b" / "ray_storage").rglob(".fault_injected").__next__()  # the worker really died
    assert broken.resumed_from_epoch == 1  # restarted from the epoch-0 checkpoint, not from scratch
    # same seed, same data order: the replayed run reaches exactly the same multipliers (determinism on CPU)
    assert _dual_history(broken) == _dual_history(unbroken)
    assert broken.final_metrics["eta"] == unbroken.final_metrics["eta"] != TrainConfig.eta
    a, b = pl.read_parquet(unbroken.history_path), pl.read_parquet(broken.history_path)
    assert a.equals(b)
    # a rerun of a finished run reuses it instead of training again (no duplicated rows)
    again = train.fit(digits_splits, train.TrainStageConfig(out=str(tmp_path / "a"), loop=cfg, verbose=False))
    assert again.reused and pl.read_parquet(again.history_path).height == a.height


def _registered_checkpoints(storage: Path) -> int:
    """Checkpoints Ray Train's controller has committed (its checkpoint_manager_snapshot.json), 0 if none yet."""
    n = 0
    for snap in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            n += len(json.loads(snap.read_text()).get("checkpoint_results", []))
        except (OSError, ValueError):  # being written
            pass
    return n


def test_rerun_after_driver_kill_resumes(ray_cluster, digits_splits, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "stages.train", str(digits_splits.root), "--out", str(out), "--method", "ce",
           "--epochs", "40", "--batch-size", "64"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        # Kill only once Ray Train's controller has *registered* a checkpoint (its snapshot file lists it): it
        # polls the workers' reports every 2 s, so a checkpoint folder on disk may not be resumable yet (under
        # load, counting folders raced the poll and the rerun started from epoch 0).
        deadline = time.time() + 120
        while time.time() < deadline and not _registered_checkpoints(out / "ray_storage"):
            time.sleep(0.2)
        assert proc.poll() is None, "the driver finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; its Ray Train run dies with it
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (out / "train" / "ce" / "model.pt").exists()
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout[rerun.stdout.index("{"):])
    assert summary["resumed_from_epoch"] >= 1  # continued from a checkpoint instead of starting over
    assert pl.read_parquet(out / "train" / "ce" / "metrics.parquet")["epoch"].to_list() == list(range(40))


def test_bad_input_is_refused_before_training(ray_cluster, digits_splits, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'bogus'.*cact"):
        TrainConfig(method="bogus")
    with pytest.raises(ValueError, match="num_workers=64"):
        train.fit(digits_splits, train.TrainStageConfig(out=str(tmp_path / "w"), num_workers=64,
                                                        cpus_per_worker=1.0))
    with pytest.raises(ValueError, match="GPU"):
        train.fit(digits_splits, train.TrainStageConfig(out=str(tmp_path / "g"), use_gpu=True))
    (tmp_path / "nomanifest").mkdir()
    with pytest.raises(Exception, match="manifest"):
        train.fit(tmp_path / "nomanifest", train.TrainStageConfig(out=str(tmp_path / "m")))
    # a backbone whose class count differs from the split folder's
    other = build_model("small_cnn", 3, in_channels=1)
    path = tmp_path / "three.pt"
    torch.save({"model_spec": {"family": "small_cnn", "num_classes": 3, "kwargs": {"in_channels": 1}},
                "model": other.state_dict()}, path)
    with pytest.raises(ValueError, match="3 classes.*10"):
        train.fit(digits_splits, train.TrainStageConfig(out=str(tmp_path / "c"), init_from=str(path)))
    assert not (tmp_path / "c" / "train").exists()


def test_orphaned_placement_groups_are_released_and_others_kept(ray_cluster):
    """A group whose creator actor died (a killed Ray Train controller) is removed; the driver's own groups and
    those of live actors are not."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    @ray.remote(num_cpus=0)
    class Creator:
        def make(self):
            pg = placement_group([{"CPU": 0.01}])
            ray.get(pg.ready(), timeout=60)
            return pg.id.hex()

    dead, alive = Creator.remote(), Creator.remote()
    dead_pg, alive_pg = ray.get(dead.make.remote()), ray.get(alive.make.remote())
    own = placement_group([{"CPU": 0.01}])
    ray.get(own.ready(), timeout=60)
    ray.kill(dead)
    deadline = time.time() + 30
    removed = 0
    while time.time() < deadline and placement_group_table()[dead_pg]["state"] != "REMOVED":
        removed += train.release_orphaned_placement_groups()
        time.sleep(0.2)
    table = placement_group_table()
    assert removed >= 1 and table[dead_pg]["state"] == "REMOVED"
    assert table[alive_pg]["state"] == "CREATED" and table[own.id.hex()]["state"] == "CREATED"
    remove_placement_group(own)
    ray.kill(alive)


def test_a_run_saved_before_a_field_was_added_is_still_the_same_run():
    """config.json written by an older version lacks fields added since (at their defaults): still reused."""
    cfg = train.TrainStageConfig(out="runs/x", loop=TrainConfig(method="cact", epochs=3))
    saved = json.loads(json.dumps(train._jsonable(cfg.to_dict())))
    del saved["loop"]["eta_relative"], saved["materialize_bytes"]
    assert train._with_defaults(saved) == train._jsonable(cfg.to_dict())
    changed = {**saved, "loop": {**saved["loop"], "epochs": 4}}
    assert train._with_defaults(changed) != train._jsonable(cfg.to_dict())


def test_changing_a_conformal_knob_keeps_the_ce_backbone(tmp_path):
    """The CE backbone's run name ignores the fields only the conformal losses and the dual step read, so a rerun
    with another --eta (or lambda_max, rho...) reuses the backbone instead of training it again."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(train.CONFORMAL_ONLY) <= fields
    splits, spec = types.SimpleNamespace(root=tmp_path), {"family": "linear"}

    def ce_name(**changes):
        loop = train.ce_config(dataclasses.replace(TrainConfig(epochs=3), **changes))
        return train._run_name(train.TrainStageConfig(out=str(tmp_path), loop=loop), splits, spec)

    base = ce_name()
    assert base.startswith("ce-")
    for changes in ({"eta": 0.7}, {"eta_relative": 0.9}, {"lambda_max": 10.0}, {"rho_init": 10.0},
                    {"conftr_lambda": 0.1}, {"dual_source": "train"}, {"method": "cact_uniform"}):
        assert ce_name(**changes) == base, changes
    for changes in ({"lr": 0.2}, {"alpha": 0.05}, {"temperature": 0.5}, {"val_cal_fraction": 0.3}, {"seed": 1}):
        assert ce_name(**changes) != base, changes
