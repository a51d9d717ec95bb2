"""The Ray Train stage: distributed exactness, fault tolerance, driver restart, determinism, bad input.

Every Ray Train fit costs ~15-25 s here, so the fits are few and each test asserts several things.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import types

import polars as pl
import pytest
import torch

from cact_ops.models import build_model
from cact_ops.training import TrainConfig, fit_in_process
from stages import longtail, ray_cleanup, train, train_run, train_worker
from stages.payload import read_split_tensors

pytestmark = pytest.mark.ray



@pytest.fixture(scope="module")
def digits_splits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "splits"
    return longtail.build(longtail.LongTailConfig(dataset="digits", out=str(out), imbalance_factor=10))


@contextlib.contextmanager
def _one_torch_thread():
    """This process's torch on one thread, as a Ray Train worker of 1 CPU runs it: local-mode fits here then sum
    floats in the worker's order, and equal its runs bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _dual_history(result: train.TrainResult) -> list:
    return json.loads((result.method_dir / "dual.json").read_text())["history"]


def _one_process(splits, stage: train.TrainStageConfig, epoch_batches):
    """What one worker computes for ``stage``: the worker's own code path (EpochLoop, the dual-step batches) run
    in this process without Ray, on ``epoch_batches(table, epoch)`` (the train batches of each epoch)."""
    from cact_ops.training import EpochLoop, val_cal_mask
    from stages.payload import decode_labels

    cfg = stage.loop
    torch.manual_seed(cfg.seed)
    spec = train.model_spec(stage, splits)
    model = train_worker.build_stage_model(spec, stage.init_from, stage.finetune)
    loop = EpochLoop(model, cfg, spec["num_classes"], train_counts=splits.train_counts)
    val, table = splits.read_table("val"), splits.read_table("train")
    is_cal = val_cal_mask(decode_labels(val), cfg.val_cal_fraction, cfg.seed)

    def val_batches():
        return train_worker._val_batches(val, splits.payload, None, is_cal, 0, 1, stage.val_batch_size)

    loop.resolve_eta(val_batches())
    for epoch in range(cfg.epochs):
        tm = loop.train_epoch(epoch_batches(table, epoch), lambda: loop.validation_statistics(val_batches()))
        loop.end_epoch(tm, loop.validation_statistics(val_batches()))
    return loop


def _one_process_global_order(splits, stage: train.TrainStageConfig):
    """``data_order="global"``: the seeded global batch order the workers share."""
    return _one_process(splits, stage, lambda table, epoch: train_worker._global_order_batches(
        table, splits.payload, None, stage.loop, epoch, 0, 1))


def _one_process_in_file_order(splits, stage: train.TrainStageConfig):
    """``data_order="shard"`` without a shuffle buffer: batches of the train rows in file order, decoded here."""
    from stages.payload import decode, decode_labels

    def batches(table, epoch):
        b = stage.loop.batch_size
        parts = (table.slice(s, b) for s in range(0, table.num_rows, b))
        return ((decode(t, splits.payload), decode_labels(t)) for t in parts)

    return _one_process(splits, stage, batches)


# Two workers on two nodes (STRICT_SPREAD) train the model of one process: tests/pipelines/test_two_nodes.py.
TWO_WORKER_LOOP = TrainConfig(method="cact", epochs=3, batch_size=64, lr=0.05, lambda_max=50.0, seed=3,
                              dual_every_steps=2)


def assert_two_workers_equal_one_process(result, splits, stage: train.TrainStageConfig) -> None:
    """lr > 0: with one seeded global batch order (data_order="global") two Ray Train workers, each holding half
    of every batch, compute the loss of the whole batch (one calibration batch, global means), so the model, eta
    and the multiplier trajectory equal those of one worker. Not bit for bit: the ranks' float32 sums are added
    in another order (DDP's gradient average, the gathered calibration scores), an error of ~1e-7 relative per
    step that training carries along; over 3 epochs and 7 dual steps it stays below 1e-4 (multipliers: relative;
    constraint values: absolute, measured up to 8e-6) and 1e-3 on the weights. A model
    without BatchNorm: batch statistics over half a batch would differ by design. ``result``: a TrainResult, or
    anything with its ``method_dir``, ``model_path``, ``history_path`` and ``final_metrics``."""
    cfg = stage.loop
    local = _one_process_global_order(splits, stage)
    ray_hist = _dual_history(result)
    # a dual step every 2 optimizer steps (5 full batches per epoch): several per epoch, and rho acts
    assert len(ray_hist) == len(local.dual.history) > cfg.epochs
    assert any(h["rho_checked"] for h in ray_hist)
    lam = torch.tensor([h["lam"] for h in ray_hist])
    assert lam.max() > 1e-3  # the multipliers move: the comparison is not between two floors
    torch.testing.assert_close(lam, torch.tensor([h["lam"] for h in local.dual.history]), rtol=1e-4, atol=1e-8)
    for a, b in zip(ray_hist, local.dual.history):
        torch.testing.assert_close(torch.tensor(a["constraint"]), torch.tensor(b["constraint"]), rtol=1e-4,
                                   atol=1e-4)
        assert a["counts"] == b["counts"]  # every validation row counted exactly once across the two workers
        assert a["rho"] == b["rho"] and a["rho_checked"] == b["rho_checked"]
    assert result.final_metrics["eta"] == pytest.approx(local.eta, rel=1e-5)
    model, blob = train.load_model(result.model_path)
    torch.testing.assert_close(model.fc.weight, local.model.fc.weight, rtol=1e-3, atol=1e-4)
    # outputs: one history row per epoch x class, the training soft size beside the validation one
    hist = pl.read_parquet(result.history_path)
    assert hist.height == cfg.epochs * splits.num_classes
    assert set(hist.columns) >= {"method", "epoch", "class", "lambda", "rho", "constraint", "val_coverage",
                                 "val_size", "val_soft_size", "train_soft_size", "dual_steps"}
    assert hist["train_soft_size"].is_not_nan().all() and blob["model_spec"]["family"] == "linear"


def test_a_group_trains_each_job_as_its_own_fit_and_a_killed_worker_resumes_its_job(ray_cluster, digits_splits,
                                                                                     tmp_path):
    """fit_group trains CE and a CaCT fine-tune of it in one worker group (one start-up). Each job is the fit it
    would be alone (here in local mode, num_workers=0, with the worker's one torch thread: the same
    loop in this process), and a worker killed in the second job resumes that job from its last checkpoint; the
    first job is not trained again. eta_relative: eta is measured once on the starting model; the restarted job
    must take it from the checkpoint, not measure it again on the trained model. Dual steps every 2 optimizer
    steps: the replayed epoch asks the coordinator again for steps it already applied, which must answer with
    the stored ones."""
    ce_loop = TrainConfig(method="ce", epochs=2, batch_size=64, lr=0.05, seed=7)
    cfg = TrainConfig(method="cact", epochs=3, batch_size=64, lr=0.05, lambda_max=10.0, rho_step=2, seed=7,
                      eta_relative=0.9, dual_every_steps=2)

    def stages(out, **kw):
        ce = train.TrainStageConfig(out=str(out), loop=ce_loop, verbose=False, max_failures=1,
                                    **{k: v for k, v in kw.items() if k != "fail_at_epoch"})
        return ce, train.TrainStageConfig(out=str(out), loop=cfg, init_from=str(ce.method_dir / "model.pt"),
                                          verbose=False, max_failures=1, **kw)

    with _one_torch_thread():
        ce_a, cact_a = stages(tmp_path / "a", num_workers=0)
        alone = {"ce": train.fit(digits_splits, ce_a), "cact": train.fit(digits_splits, cact_a)}  # local mode
        # overwrite (a pipeline's --no-resume) retrains from scratch, not from the last checkpoint of the same run
        fresh = {c.method: train.fit(digits_splits, dataclasses.replace(c, overwrite=True)) for c in (ce_a, cact_a)}
    assert not any(r.reused or r.resumed_from_epoch for r in fresh.values())
    group = train.fit_group(digits_splits, list(stages(tmp_path / "b", fail_at_epoch=1)))  # one, restarted
    assert list(group) == ["ce", "cact"]
    assert next((tmp_path / "b" / "ray_storage").rglob(".fault_injected"))  # the worker really died
    assert group["cact"].resumed_from_epoch == 1  # restarted from its epoch-0 checkpoint, not from scratch
    assert group["ce"].resumed_from_epoch == 0 and not group["ce"].reused
    assert len(_dual_history(alone["cact"])) > cfg.epochs  # several dual steps per epoch
    # same seed, same data order: each job of the group, the replayed job and the overwritten local fits equal
    # the fits alone
    for m in ("ce", "cact"):
        a = pl.read_parquet(alone[m].history_path)
        for other in (group[m], fresh[m]):
            assert a.equals(pl.read_parquet(other.history_path)), m
            wa, wb = train.load_model(alone[m].model_path)[0], train.load_model(other.model_path)[0]
            for x, y in zip(wa.state_dict().values(), wb.state_dict().values()):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert _dual_history(group["cact"]) == _dual_history(alone["cact"]) == _dual_history(fresh["cact"])
    assert group["cact"].final_metrics["eta"] == alone["cact"].final_metrics["eta"] != TrainConfig.eta
    # a rerun of a finished group reuses every job instead of training again (no duplicated rows)
    again = train.fit_group(digits_splits, list(stages(tmp_path / "b")))
    assert all(r.reused for r in again.values())
    assert pl.read_parquet(again["cact"].history_path).height == cfg.epochs * digits_splits.num_classes


def test_a_worker_group_that_failed_for_good_resumes_on_the_rerun(ray_cluster, digits_splits, tmp_path):
    """What a rerun after the driver died relies on, for a worker group: a run that ended with its worker killed
    and no restart left (max_failures=0) is resumed by the same call from its last Ray Train checkpoint, not
    started over, and ends with the model of an uninterrupted run (here local mode under one torch thread, the
    same function bit for bit). The pipeline test kills the driver itself, in local mode, the demo's default."""
    cfg = TrainConfig(method="cact", epochs=3, batch_size=64, lr=0.05, lambda_max=10.0, seed=11, dual_every_steps=2)
    stage = train.TrainStageConfig(out=str(tmp_path / "group"), loop=cfg, verbose=False, max_failures=0)
    with pytest.raises(Exception):
        train.fit(digits_splits, dataclasses.replace(stage, fail_at_epoch=1))
    assert not (stage.method_dir / "model.pt").exists()
    resumed = train.fit(digits_splits, stage)
    assert resumed.resumed_from_epoch == 1  # from the epoch-0 checkpoint of the failed run
    with _one_torch_thread():
        straight = train.fit(digits_splits, dataclasses.replace(stage, out=str(tmp_path / "local"), num_workers=0))
    assert _dual_history(resumed) == _dual_history(straight)
    torch.testing.assert_close(train.load_model(resumed.model_path)[0].state_dict(),
                               train.load_model(straight.model_path)[0].state_dict(), rtol=0, atol=0)


def test_bad_input_is_refused_before_training(ray_cluster, digits_splits, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'bogus'.*cact"):
        TrainConfig(method="bogus")
    with pytest.raises(ValueError, match="num_workers=64"):
        train.fit(digits_splits, train.TrainStageConfig(out=str(tmp_path / "w"), num_workers=64,
                                                        cpus_per_worker=1.0))
    # the default CPU share: 64 workers on 2 CPUs would get 0.03 CPUs each; refused, saying how many fit
    with pytest.raises(ValueError, match=r"num_workers=64 would get 0.031 CPUs.*at most 3 workers fit"):
        train.fit(digits_splits, train.TrainStageConfig(out=str(tmp_path / "w"), num_workers=64))
    with pytest.raises(ValueError, match="GPU"):
        train.fit(digits_splits, train.TrainStageConfig(out=str(tmp_path / "g"), use_gpu=True))
    # local mode (num_workers=0): no worker to kill, no callback (a Tune trial) to report to
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        train.TrainStageConfig(out=str(tmp_path / "n"), num_workers=-1)
    with pytest.raises(ValueError, match="fail_at_epoch kills a worker.*num_workers >= 1"):
        train.TrainStageConfig(out=str(tmp_path / "n"), num_workers=0, fail_at_epoch=1)
    with pytest.raises(ValueError, match="local mode.*reports to no callback.*report_to_tune=True"):
        train.fit(digits_splits, train.TrainStageConfig(out=str(tmp_path / "n"), num_workers=0), callbacks=[object()])
    with pytest.raises(ValueError, match="report_to_tune is for num_workers=0"):
        train.fit(digits_splits, train.TrainStageConfig(out=str(tmp_path / "n")), report_to_tune=True)
    assert not (tmp_path / "n").exists()
    # a dual-step calibration part rounded to nothing: refused here, not raised (and retried) in every worker
    with pytest.raises(ValueError, match=r"ce: the val split \(179 rows.*no calibration rows at "
                                         r"val_cal_fraction=0.01.*--val-fraction"):
        train.fit(digits_splits, train.TrainStageConfig(out=str(tmp_path / "v"),
                                                        loop=TrainConfig(method="ce", val_cal_fraction=0.01)))
    assert not (tmp_path / "v" / "train").exists()
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


def _two_actors_with_a_group_each():
    """Two live actors (a Ray Train controller's stand-ins), each the creator of a small placement group:
    ``(actor, actor, [group, group])``."""
    import ray
    from ray.util.placement_group import placement_group

    @ray.remote(num_cpus=0)
    class Creator:
        def make(self):
            pg = placement_group([{"CPU": 0.01}])
            ray.get(pg.ready(), timeout=60)
            return pg

    dead, alive = Creator.remote(), Creator.remote()
    return dead, alive, [ray.get(a.make.remote()) for a in (dead, alive)]


def test_a_sweep_removes_orphaned_placement_groups_and_keeps_others(ray_cluster):
    """A group whose creator actor died (a killed Ray Train controller) is removed; the driver's own groups and
    those of live actors are not."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    dead, alive, groups = _two_actors_with_a_group_each()
    dead_pg, alive_pg = (pg.id.hex() for pg in groups)
    own = placement_group([{"CPU": 0.01}])
    ray.get(own.ready(), timeout=60)
    with ray_cleanup.orphans_released(every_s=0.2, settle_s=5):
        ray.kill(dead)  # a trial's controller, killed while the sweep runs
    table = placement_group_table()
    assert table[dead_pg]["state"] == "REMOVED"
    assert table[alive_pg]["state"] == "CREATED" and table[own.id.hex()]["state"] == "CREATED"
    remove_placement_group(own)
    remove_placement_group(groups[1])
    ray.kill(alive)


def test_an_orphan_whose_group_gcs_never_flagged_is_removed_too(ray_cluster, monkeypatch):
    """GCS flags a group's creator as dead only for groups registered when it handles the death; a group whose
    registration arrived later (a controller killed while creating it) is unflagged forever. The reaper reads
    the creator's death from the actor table, so it removes that group as well; a live creator's stays."""
    import ray
    from ray.util.placement_group import placement_group_table, remove_placement_group

    dead, alive, groups = _two_actors_with_a_group_each()
    dead_pg, alive_pg = (pg.id.hex() for pg in groups)
    ray.kill(dead)
    real = ray_cleanup._job_actor_placement_groups

    def unflagged():  # the group table as GCS leaves it after the race
        table = real()
        for pg in table:
            pg.creator_actor_dead = False
        return table

    monkeypatch.setattr(ray_cleanup, "_job_actor_placement_groups", unflagged)
    deadline = time.time() + 30
    while placement_group_table()[dead_pg]["state"] != "REMOVED" and time.time() < deadline:
        ray_cleanup.release_orphaned_placement_groups()  # the kill reaches the actor table a moment later
        time.sleep(0.2)
    table = placement_group_table()
    assert table[dead_pg]["state"] == "REMOVED" and table[alive_pg]["state"] == "CREATED"
    remove_placement_group(groups[1])
    ray.kill(alive)


def test_a_run_saved_before_a_field_was_added_is_still_the_same_run():
    """config.json written by an older version lacks fields added since (at their defaults): still reused."""
    cfg = train.TrainStageConfig(out="runs/x", loop=TrainConfig(method="cact", epochs=3))
    saved = json.loads(json.dumps(train_run.jsonable(cfg.to_dict())))
    del saved["loop"]["eta_relative"], saved["materialize_bytes"]
    assert train_run._with_defaults(saved) == train_run.jsonable(cfg.to_dict())
    changed = {**saved, "loop": {**saved["loop"], "epochs": 4}}
    assert train_run._with_defaults(changed) != train_run.jsonable(cfg.to_dict())


def test_changing_a_conformal_knob_keeps_the_ce_backbone(tmp_path):
    """The CE backbone's run name ignores the fields only the conformal losses and the dual step read, so a rerun
    with another --eta (or lambda_max, rho...) reuses the backbone instead of training it again."""
    conformal = set(TrainConfig.conformal_fields())
    assert {"eta", "lambda_max", "conftr_lambda", "dual_every_steps"} <= conformal
    assert not conformal & {"alpha", "temperature", "val_cal_fraction", "lr"}  # CE's validation metrics read them
    splits, spec = types.SimpleNamespace(root=tmp_path), {"family": "linear"}

    def ce_name(**changes):
        loop = train.ce_config(dataclasses.replace(TrainConfig(epochs=3), **changes))
        return train_run.ray_run_name(train.TrainStageConfig(out=str(tmp_path), loop=loop), splits, spec)

    base = ce_name()
    assert base.startswith("ce-")
    for changes in ({"eta": 0.7}, {"eta_relative": 0.9}, {"lambda_max": 10.0}, {"rho_init": 10.0},
                    {"conftr_lambda": 0.1}, {"dual_source": "train"}, {"method": "cact_uniform"}):
        assert ce_name(**changes) == base, changes
    for changes in ({"lr": 0.2}, {"alpha": 0.05}, {"temperature": 0.5}, {"val_cal_fraction": 0.3}, {"seed": 1}):
        assert ce_name(**changes) != base, changes


def test_a_backbone_saved_under_older_conformal_defaults_is_reused_but_not_an_older_cact_run():
    """A CE backbone's config.json from before the conformal defaults changed (eta_relative, reduction, rho_step,
    no cal_weighting field) is the same backbone; a CaCT run saved without cal_weighting trained with the plain
    batch quantile, which is not today's default, so it is not the same run."""
    ce = train.TrainStageConfig(out="runs/x", loop=train.ce_config(TrainConfig(epochs=3)))
    saved = json.loads(json.dumps(train_run.jsonable(ce.to_dict())))
    saved["loop"] |= {"eta_relative": None, "reduction": "sample", "rho_step": 10}
    del saved["loop"]["cal_weighting"], saved["loop"]["dual_every_steps"]
    assert train_run.same_run(saved, ce)
    assert not train_run.same_run({**saved, "loop": {**saved["loop"], "lr": 0.5}}, ce)
    cact = train.TrainStageConfig(out="runs/x", loop=TrainConfig(method="cact", epochs=3))
    old = json.loads(json.dumps(train_run.jsonable(cact.to_dict())))
    del old["loop"]["cal_weighting"]
    assert not train_run.same_run(old, cact)
    assert train_run.same_run({**old, "loop": {**old["loop"], "cal_weighting": "balanced"}}, cact)


def test_a_finished_run_is_found_again_whatever_cpu_share_the_rerun_gets():
    """fit_methods sizes cpus_per_worker to the fits that run at once (and the cluster's free memory), so a rerun
    on a busier cluster asks for another share: that is how the run is executed, not what it computed."""
    cfg = train.TrainStageConfig(out="runs/x", loop=TrainConfig(method="ce_finetune", epochs=3), cpus_per_worker=0.4)
    saved = json.loads(json.dumps(train_run.jsonable(dataclasses.replace(cfg, cpus_per_worker=1 / 3).to_dict())))
    assert train_run.same_run(saved, cfg)
    assert not train_run.same_run(saved, dataclasses.replace(cfg, num_workers=2))


def test_a_run_folder_moved_elsewhere_is_still_the_same_run(tmp_path):
    """config.json keeps the absolute paths of where the run was trained; a run folder moved or copied to
    another path (the fine-tune's backbone inside it) is recognised, a backbone from elsewhere is not."""
    old, new = tmp_path / "old", tmp_path / "new"
    cfg = train.TrainStageConfig(out=str(old), loop=TrainConfig(method="cact", epochs=3),
                                 init_from=str(old / "train" / "ce" / "model.pt"))
    saved = json.loads(json.dumps(train_run.jsonable(cfg.to_dict())))
    moved = train.TrainStageConfig(out=str(new), loop=TrainConfig(method="cact", epochs=3),
                                   init_from=str(new / "train" / "ce" / "model.pt"))
    assert train_run.same_run(saved, moved)
    other = dataclasses.replace(moved, init_from=str(tmp_path / "elsewhere" / "model.pt"))
    assert not train_run.same_run(saved, other)


def test_a_diverging_run_fails_once_with_a_clear_error_in_process(digits_splits):
    from cact_ops.training import TrainingDiverged

    x, y = read_split_tensors(digits_splits, "train")
    val = read_split_tensors(digits_splits, "val")
    model = build_model("small_cnn", 10, in_channels=1)
    cfg = TrainConfig(method="ce", epochs=2, lr=1e12, grad_clip=0.0, optimizer="sgd")
    diverged = r"ce: the (loss|model's logits|model's validation logits) became NaN or inf"
    with pytest.raises(TrainingDiverged, match=diverged + r" .*lr=1e\+12"):
        fit_in_process(model, cfg, (x, y), val)


@pytest.mark.ray
def test_a_streamed_split_is_decoded_by_ray_data_and_a_diverging_job_is_not_retried(ray_cluster, digits_splits,
                                                                                      tmp_path):
    """One worker group (one start-up) for two things. First job, data_order="shard" (what a split too large for
    the driver gets): the train split streams through Ray Data, whose tasks decode the images into uint8
    tensors, and the worker only trains; without a shuffle buffer the batches are the rows in file order, so the
    run is what one process computes decoding those batches itself (not bit for bit: the worker's torch runs on
    one thread, this process on two). Second job: NaN is a property of the configuration, so the worker reports
    it instead of raising, Ray Train does not retry it max_failures times, and the driver raises the worker's
    message, naming the method and the lr."""
    cfg = TrainConfig(method="cact", epochs=2, batch_size=64, lr=0.05, lambda_max=50.0, seed=5, dual_every_steps=3)
    streamed = train.TrainStageConfig(out=str(tmp_path), loop=cfg, model_family="linear", data_order="shard",
                                      shuffle_buffer=0, verbose=False, max_failures=3)
    diverging = train.TrainStageConfig(out=str(tmp_path), loop=TrainConfig(method="ce", epochs=1, lr=1e12,
                                                                            grad_clip=0.0),
                                       verbose=False, max_failures=3)
    assert train.predecoded(digits_splits, [streamed, diverging])
    with pytest.raises(ValueError, match=r"ce: the (loss|model's logits|model's validation logits) became NaN or "
                                         r"inf .*lower the learning rate"):
        train.fit_group(digits_splits, [streamed, diverging])
    # the worker ended its training function normally after reporting: no worker failure, so nothing to retry
    assert not (tmp_path / "train" / "ce" / "model.pt").exists()
    assert (tmp_path / "train" / "ce" / train.DIVERGED_FILE).is_file()

    r = train_run.result_from_disk(streamed, reused=True, verified=True)  # the first job finished and was written
    local = _one_process_in_file_order(digits_splits, streamed)
    hist = _dual_history(r)
    assert len(hist) == len(local.dual.history) > cfg.epochs
    torch.testing.assert_close(torch.tensor([h["lam"] for h in hist]),
                               torch.tensor([h["lam"] for h in local.dual.history]), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(train.load_model(r.model_path)[0].state_dict(), local.model.state_dict(),
                               rtol=1e-3, atol=1e-4)
    # In local mode (num_workers=0) the same streamed, Ray Data-decoded job trains in this process: with the
    # worker's one torch thread, the worker group's model and multipliers bit for bit
    with _one_torch_thread():
        alone = train.fit(digits_splits, dataclasses.replace(streamed, out=str(tmp_path / "local"), num_workers=0))
    assert _dual_history(alone) == hist
    torch.testing.assert_close(train.load_model(alone.model_path)[0].state_dict(),
                               train.load_model(r.model_path)[0].state_dict(), rtol=0, atol=0)
