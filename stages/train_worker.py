"""The Ray Train worker side of :mod:`stages.train`: the loop every worker of a group runs (its jobs in order,
resuming the job of the last checkpoint), one job's epochs with the dual step through the group's coordinator,
the batches (Ray Data shard or one seeded global order) and the collectives.

Kept apart from the driver side so that each file does one job; the driver only names
:func:`train_loop_per_worker` and reads what rank 0 writes (:func:`stages.train_run.write_outputs`).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
import torch.nn as nn

from cact_ops import distributed as _dist
from cact_ops import methods as method_registry
from cact_ops.models import build_model
from cact_ops.training import EpochLoop, TrainConfig, TrainingDiverged, format_epoch, val_cal_mask

from .coordinator import NAMESPACE as COORDINATOR_NAMESPACE
from . import _io
from .storage import as_path
from .train_run import CHECKPOINT_FILE, DIVERGED_FILE, TrainStageConfig, write_outputs

# Local mode (num_workers=0, LocalSession): the run's last checkpoint, under the run's storage folder, so that a
# rerun after a crash resumes as a worker group's does.
LOCAL_CHECKPOINT = "local_checkpoint.pt"


class TorchDistComm:
    """The loop's collectives through torch.distributed (gloo on CPU, NCCL on GPU), by cact_ops.distributed."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world_size = _dist.world()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return _dist.all_reduce_sum(t).cpu()

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        return _dist.gather_cat(t.detach()).cpu()

    def broadcast_object(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]


# ----------------------------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------------------------
def build_stage_model(spec: dict, init_from: str | None, finetune: str) -> nn.Module:
    """Build the model from its spec, load a backbone when fine-tuning, freeze all but the head if asked."""
    model = build_model(spec["family"], spec["num_classes"], **spec["kwargs"])
    if init_from:
        blob = _io.load_torch(init_from, map_location="cpu")
        model.load_state_dict(blob["model"])
    if finetune == "head":
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        head = {id(p) for p in last.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
    return model


def _val_batches(x_table, payload, image_size, is_cal, rank, world, batch_size):
    """This worker's rows (i = rank mod world) of the dual-step table, decoded batch by batch."""
    from .payload import decode, decode_labels

    idx = np.arange(rank, x_table.num_rows, world)
    labels = decode_labels(x_table)
    for start in range(0, len(idx), batch_size):
        b = idx[start:start + batch_size]
        sub = x_table.take(b)
        yield decode(sub, payload, image_size), labels[b], is_cal[b]


def _global_order_batches(table, payload, image_size, loop_cfg: TrainConfig, epoch: int, rank: int, world: int):
    """This worker's contiguous slice of every global batch of one seeded order of the whole split: the
    concatenation of the ranks' slices is the batch one worker would see. An incomplete last batch is dropped
    whatever the world size (the order changes every epoch, so no row is left out for good), except when it is
    the only one: a split smaller than a batch (a head's batch of 500 on a small split) is one batch an epoch."""
    from .payload import decode, decode_labels

    labels = decode_labels(table)
    order = torch.randperm(table.num_rows, generator=torch.Generator().manual_seed(loop_cfg.seed * 100003 + epoch))
    for start in range(0, table.num_rows, loop_cfg.batch_size):
        rows = order[start:start + loop_cfg.batch_size].numpy()
        if len(rows) < loop_cfg.batch_size and start > 0:
            return
        mine = np.array_split(rows, world)[rank]
        yield decode(table.take(mine), payload, image_size), labels[mine]


def _inject_fault(marker: Path) -> None:
    """SIGKILL this worker once (a real process crash), after the epoch's dual step and before its checkpoint:
    the restarted group replays the epoch and the coordinator must answer with the step it already applied."""
    if not marker.exists():
        import ray.train

        # Ray Train's controller polls reports; a crash before it has taken the previous epoch's report loses
        # that checkpoint and the run restarts from scratch. Wait until every report so far is committed, so the
        # test of "resume from the last checkpoint" does not race the poll (CI failed once on exactly this).
        ray.train.get_all_reported_checkpoints(timeout_s=120)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)


class RayTrainSession:
    """A Ray Train worker's view of its run: rank, world size, device, its Ray Data shard, the group's dual
    coordinator (the actor the driver started), and the checkpoints and metrics it reports through Ray Train
    (rank 0 reports the checkpoint)."""

    def __init__(self, coordinator_name: str | None):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.coordinator = ray.get_actor(coordinator_name, namespace=COORDINATOR_NAMESPACE) if coordinator_name \
            else None

    def ask(self, method: str, *args):
        """A call to the group's coordinator actor."""
        return ray.get(getattr(self.coordinator, method).remote(*args))

    def shard(self):
        return ray.train.get_dataset_shard("train")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def last_state(self) -> dict | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)

    def report(self, metrics: dict, state: dict | None) -> None:
        if state is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def log(self, line: str) -> None:
        # Straight to the process's stdout: Ray Train's patched print would log the line twice.
        sys.__stdout__.write(line + "\n")
        sys.__stdout__.flush()


class LocalSession:
    """``num_workers=0``: the calling process is the run's only worker (rank 0 of 1), as in Ray Train's local mode,
    but without Ray Train, whose ``ray.train`` calls inside a Tune trial go to Tune's session instead. The run's
    last checkpoint is its own file, ``<run_dir>/local_checkpoint.pt``, written atomically every epoch (a crash
    leaves the previous one), so a rerun resumes as a worker group's does; in a Tune trial every epoch's metrics
    go to ``ray.tune.report``, as ``TuneReportCallback`` forwards a worker group's."""

    rank, world = 0, 1

    def __init__(self, run_dir, use_gpu: bool, dataset=None, report_to_tune: bool = False, coordinator=None):
        self.path = as_path(run_dir) / LOCAL_CHECKPOINT
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.dataset, self.report_to_tune = dataset, report_to_tune
        self.coordinator = coordinator  # a stages.coordinator.Coordinator object: the dual step in this process

    def ask(self, method: str, *args):
        """A call to the coordinator object, in this process."""
        return getattr(self.coordinator, method)(*args)

    def shard(self):
        return self.dataset

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def last_state(self) -> dict | None:
        return _io.load_torch(self.path, map_location="cpu") if self.path.exists() else None

    def report(self, metrics: dict, state: dict | None) -> None:
        with _io.atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        if self.report_to_tune:
            from ray import tune

            tune.report(metrics)

    def log(self, line: str) -> None:
        print(line, flush=True)


def train_loop_per_worker(cfg: dict, session: LocalSession | None = None) -> None:
    """Train the group's jobs in order; after a restart, resume the job the last checkpoint belongs to. Ray
    Train calls it in every worker; ``stages.train`` calls it with a :class:`LocalSession` for ``num_workers=0``."""
    from .splits import load as load_splits

    if session is None:
        # Ray Train gives the worker's root logger an INFO console handler; its per-report line ("Reporting
        # training result ...", a logger outside ray.train) then follows the job's log level only if the root does.
        logging.getLogger().setLevel(cfg.get("log_level", "INFO"))
        session = RayTrainSession(cfg["coordinator"])
    for entry in cfg.get("methods", ()):  # the driver's registry entries: a plugin's method builds its loss here
        method_registry.adopt(entry)
    rank = session.rank
    splits = load_splits(cfg["splits"])
    comm = TorchDistComm(session.device)
    state = session.last_state()
    names = [job["name"] for job in cfg["jobs"]]
    # A checkpoint of another run of the same name (jobs finished since were dropped from the list) is not ours.
    current = names.index(state["job"]) if state is not None and state.get("job") in names else 0
    for i, job in enumerate(cfg["jobs"]):
        if i < current:  # finished, and its outputs written, before the restart
            continue
        t0 = time.time()
        stage = TrainStageConfig(**{**job["stage"], "loop": TrainConfig(**job["stage"]["loop"])})
        try:
            final = _train_job(job, stage, state if i == current else None, splits, session, comm,
                               as_path(cfg["run_dir"]), cfg.get("predecoded", False))
        except TrainingDiverged as e:
            # Deterministic: a retry (max_failures) would diverge again. Say why and end the group; the driver
            # raises this message. Every rank sees the same global loss, so every rank stops here.
            if rank == 0:
                _io.write_json({"job": job["name"], "error": str(e)}, stage.method_dir / DIVERGED_FILE)
            return
        if rank == 0:
            write_outputs(stage, job["spec"], final, time.time() - t0)
        comm.broadcast_object(None)  # the next job may fine-tune from this one's model.pt: wait for it


def _train_job(job: dict, stage: TrainStageConfig, state: dict | None, splits, session, comm, run_dir: Path,
               predecoded: bool = False) -> dict:
    """One method's training, from ``state`` (its last checkpoint) when given; returns its final state."""
    from .payload import decode, decode_labels, predecoded_batch

    loop_cfg = stage.loop
    torch.manual_seed(loop_cfg.seed)
    np.random.seed(loop_cfg.seed)
    payload = splits.payload
    rank, world, device = session.rank, session.world, session.device
    model = session.prepare_model(build_stage_model(job["spec"], stage.init_from, stage.finetune))
    shard = session.shard() if stage.data_order == "shard" else None

    def dual_update(dual, grad_sums, counts, h_means, step, epoch):
        answer = None
        if rank == 0:
            answer = session.ask("update", job["name"], step, grad_sums, counts, h_means, epoch)
        dual.load_state_dict(comm.broadcast_object(answer))

    loop = EpochLoop(model, loop_cfg, job["spec"]["num_classes"], device, comm=comm, dual_update=dual_update,
                     train_counts=splits.manifest["counts"]["train"])
    resumed_from = 0
    if state is not None:
        loop.load_state_dict(state)
        resumed_from = loop.epoch
        if rank == 0 and state.get("dual") is not None and method_registry.get(loop_cfg.method).uses_dual:
            session.ask("seed", job["name"], state["dual"])

    dual_table = splits.read_table("train" if loop_cfg.dual_source == "train" else "val")
    is_cal = val_cal_mask(decode_labels(dual_table), loop_cfg.val_cal_fraction, loop_cfg.seed)
    # eta relative to the starting model: measured once, before the first epoch, by every worker together
    loop.resolve_eta(_val_batches(dual_table, payload, stage.image_size, is_cal, rank, world, stage.val_batch_size))
    local_batch = max(2, loop_cfg.batch_size // world)  # the global batch stays the configured one
    train_table = splits.read_table("train") if stage.data_order == "global" else None

    def validate():
        return loop.validation_statistics(
            _val_batches(dual_table, payload, stage.image_size, is_cal, rank, world, stage.val_batch_size))

    for epoch in range(loop.epoch, loop_cfg.epochs):
        if train_table is not None:
            batches = _global_order_batches(train_table, payload, stage.image_size, loop_cfg, epoch, rank, world)
        else:
            rows = shard.iter_batches(batch_size=local_batch, batch_format="numpy",
                                      local_shuffle_buffer_size=stage.shuffle_buffer or None,
                                      local_shuffle_seed=loop_cfg.seed * 100003 + epoch)
            # Decoded by Ray Data tasks (stages.train) when the split holds images; else decoded here.
            batches = (predecoded_batch(b) for b in rows) if predecoded else \
                ((decode(b, payload, stage.image_size), decode_labels(b)) for b in rows)
        train_metrics = loop.train_epoch(batches, validate)
        metrics = loop.end_epoch(train_metrics, validate())
        if stage.fail_at_epoch == epoch and rank == 0:
            _inject_fault(run_dir / job["name"] / ".fault_injected")
        if rank == 0 and stage.verbose:
            session.log(format_epoch(loop_cfg.method, metrics))
        last = loop.history[-loop.num_classes:]
        report = {**metrics, "method": loop_cfg.method, "lambda": [r["lambda"] for r in last],
                  "rho": [r["rho"] for r in last], "val_class_coverage": [r["val_coverage"] for r in last],
                  "val_class_size": [r["val_size"] for r in last]}
        session.report(report, {**loop.state_dict(), "resumed_from_epoch": resumed_from, "job": job["name"]}
                       if rank == 0 else None)
    return {**loop.state_dict(), "resumed_from_epoch": resumed_from}
