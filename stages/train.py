"""Training stage: any registered method (cact_ops.methods) on a split folder, with Ray Train.

A thin adapter around :class:`cact_ops.training.EpochLoop`. This file is the driver side: the Ray Train run of a
worker group and the two-stage protocol (:func:`fit_methods`). :mod:`stages.train_run` holds a run's config,
identity and outputs (and when a finished run is reused), :mod:`stages.train_worker` the loop each Ray Train
worker runs, :mod:`stages.coordinator` the dual-step actor. What it adds:

* a Ray Train V2 ``TorchTrainer`` (DDP, one Ray Data shard of the train split per worker, GPU when asked);
* the dual update coordinated on the driver: one small actor per worker group (:mod:`stages.coordinator`)
  owns the ``DualState`` of each CaCT job. At every dual step the workers all-reduce per-class sums and counts
  on their part of the dual-step data, rank 0 sends them with the step's number, the coordinator applies the
  step and returns lambda and rho, rank 0 broadcasts them. A call repeated for a step already applied returns
  the stored answer, so a restarted worker cannot apply a step twice;
* a checkpoint every epoch (model, optimizer, scheduler, RNG, lambda, rho, history). A restarted worker group
  resumes from the latest one and re-seeds the coordinator from it; re-running the same command after the
  driver died resumes the run (same run name and storage path) instead of starting over;
* several methods in one worker group (:func:`fit_group`, used by :func:`fit_methods`): the CE backbone and its
  fine-tunes train one after the other in the same workers, so Ray Train's start-up is paid once per run, and
  each method keeps the outputs, reuse and resume contract of a fit of its own;
* ``num_workers=0``, local mode: the same training function in this process (rank 0 of 1, no Ray Train start-up;
  :class:`stages.train_worker.LocalSession` keeps the run's checkpoint, and reports to Tune in a sweep's trial);
* outputs under ``<out>/train/<method>/``: ``model.pt`` (weights + how to rebuild the model), ``history.parquet``
  (one row per epoch x class: lambda, rho, constraint, val coverage and size), ``metrics.parquet`` (one row
  per epoch), ``config.json``.

Example (the embedded default)::

    splits = stages.longtail.build(LongTailConfig(dataset="digits", out="runs/d/splits"))
    ce = stages.train.fit(splits, TrainStageConfig(out="runs/d", loop=TrainConfig(method="ce", epochs=10)))
    cact = stages.train.fit(splits, TrainStageConfig(out="runs/d", loop=TrainConfig(method="cact"),
                                                     init_from=ce.model_path))
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import uuid
import warnings

import ray

from cact_ops import methods as method_registry
from cact_ops.losses import METHODS
from cact_ops.training import TrainConfig

from . import _io
from .coordinator import NAMESPACE as COORDINATOR_NAMESPACE, Coordinator, DualCoordinator
from .payload import PREDECODED_KINDS, decode_to_uint8
from .storage import as_path, for_reader
# The run's config, identity and outputs (no Ray); TrainStageConfig, TrainResult and load_model are public here too.
from .train_run import (DIVERGED_FILE, TrainResult, TrainStageConfig, as_splits, jsonable, load_model,  # noqa: F401
                        model_spec, ray_run_name, result_from_disk, reusable, same_run)

# The least CPU share a training worker gets by default: below it the torch processes only fight for the cores
# (64 workers on 2 CPUs drove the load to 120 and crashed). An explicit cpus_per_worker is taken as given.
MIN_DEFAULT_CPUS_PER_WORKER = 0.5


def _worker_cpus(config: TrainStageConfig, total_cpu: float) -> float:
    """CPUs per worker: as configured, else up to 1 each, leaving room for Ray Data's read tasks (a worker group
    holding every CPU would wait forever for its own input)."""
    return config.cpus_per_worker or min(1.0, total_cpu / (config.num_workers + 1))


def _check_resources(config: TrainStageConfig, cpus_per_worker: float) -> None:
    res = ray.cluster_resources()
    if not config.cpus_per_worker and cpus_per_worker < MIN_DEFAULT_CPUS_PER_WORKER:
        fit = max(0, int(res.get("CPU", 0) / MIN_DEFAULT_CPUS_PER_WORKER) - 1)
        raise ValueError(
            f"num_workers={config.num_workers} would get {cpus_per_worker:.2g} CPUs each on a Ray cluster of "
            f"{res.get('CPU', 0):g} CPUs (at least {MIN_DEFAULT_CPUS_PER_WORKER:g} each, with room left for Ray "
            f"Data): at most {fit} workers fit; lower num_workers (--num-workers), set cpus_per_worker, or add nodes "
            "(--autoscale on a cluster that adds them)"
        )
    need_cpu = cpus_per_worker * config.num_workers
    if need_cpu > res.get("CPU", 0) + 1e-9:
        raise ValueError(
            f"num_workers={config.num_workers} x {cpus_per_worker:g} CPUs = {need_cpu:g} CPUs, but the Ray cluster "
            f"has {res.get('CPU', 0):g}: lower num_workers or cpus_per_worker, or add nodes"
        )
    if config.placement_strategy == "STRICT_SPREAD":
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        if config.num_workers > nodes:
            raise ValueError(f"num_workers={config.num_workers} with placement_strategy='STRICT_SPREAD' needs one "
                             f"node per worker, but the Ray cluster has {nodes}: lower num_workers, add nodes, or "
                             "use placement_strategy='PACK' or 'SPREAD'")
    if config.use_gpu and config.num_workers > res.get("GPU", 0):
        raise ValueError(
            f"num_workers={config.num_workers} GPU workers requested, but the Ray cluster has {res.get('GPU', 0):g} "
            "GPUs: lower num_workers, add GPU nodes, or drop use_gpu"
        )


def fit(splits, config: TrainStageConfig, callbacks: list | None = None, dataset=None,
        report_to_tune: bool = False) -> TrainResult:
    """Train ``config.loop.method`` on ``splits`` (a Splits handle or split folder) with Ray Train.

    Starts a local Ray if none is running. Re-running with the same config reuses a finished run, or resumes an
    interrupted one from its last checkpoint. ``callbacks`` go to Ray Train's RunConfig (a Tune trial passes
    ``TuneReportCallback``; in local mode, ``num_workers=0``, a Tune trial passes ``report_to_tune=True``
    instead: each epoch's metrics go to ``ray.tune.report`` from this process). ``dataset``: the train split as a
    Ray Dataset already read (see :func:`train_dataset`), shared by several fits; by default it is read here.
    """
    return fit_group(splits, [config], callbacks=callbacks, dataset=dataset,
                     report_to_tune=report_to_tune)[config.method]


# Settings of the one TorchTrainer a group runs in: its jobs must agree on them.
_GROUP_SHARED = ("num_workers", "use_gpu", "cpus_per_worker", "placement_strategy", "max_failures", "storage_path",
                 "materialize_bytes", "check_resources", "verbose")


def _check_dual_data(splits, configs: list[TrainStageConfig]) -> None:
    """Refuse, before any worker starts, dual-step data whose stratified calibration part (val_cal_fraction of
    each class, rounded) or remainder is empty: every worker would raise it, and Ray Train retry it."""
    from cact_ops.training import val_cal_mask

    from .payload import decode_labels

    labels = {}  # each split's labels read once, whatever the number of jobs
    for c in configs:
        source = "train" if c.loop.dual_source == "train" else "val"
        if source not in labels:
            labels[source] = decode_labels(splits.read_table(source, columns=["label"]))
        y = labels[source]
        cal = val_cal_mask(y, c.loop.val_cal_fraction, c.loop.seed)
        if not cal.any() or cal.all():
            raise ValueError(
                f"{c.method}: the {source} split ({y.numel()} rows, at most {int(y.bincount().max())} per "
                f"class) leaves the dual step no {'calibration' if not cal.any() else 'evaluation'} rows at "
                f"val_cal_fraction={c.loop.val_cal_fraction} (round(fraction x n_k) per class); use a larger val "
                "split (--val-fraction) or another val_cal_fraction (--val-cal-fraction)")


def fit_group(splits, configs: list[TrainStageConfig], callbacks: list | None = None, dataset=None,
              report_to_tune: bool = False) -> dict[str, TrainResult]:
    """Train several methods one after the other in one Ray Train worker group: the start-up (controller,
    worker processes, process group, dataset shards) is paid once for all of them.

    Each job keeps the contract of a fit of its own: its outputs under ``<out>/train/<method>/`` are written
    (atomically, by rank 0) as soon as it finishes, a finished job is reused on a rerun, its own dual
    coordinator applies each dual step once, and a restarted worker group resumes the job it was in from that
    job's last checkpoint (jobs already finished are not trained again). A job may fine-tune from an earlier
    job's ``model.pt`` (``init_from``): the CE backbone and its fine-tunes train in one group. The group's Ray
    Train run is named after all its jobs, so re-running the same command after the driver died resumes it.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not configs:
        return {}
    splits = as_splits(splits)
    if any(c.data_order == "auto" for c in configs):  # resolved before the run names and the saved configs
        auto = "global" if _io.parquet_bytes(splits.path("train")) <= DRIVER_READ_BYTES else "shard"
        for c in configs:
            if c.data_order == "auto":
                c.data_order = auto
    first = configs[0]
    if callbacks and first.num_workers == 0:
        raise ValueError("num_workers=0 (local mode) reports to no callback; a Tune trial in local mode "
                         "passes report_to_tune=True instead")
    if report_to_tune and first.num_workers != 0:
        raise ValueError("report_to_tune is for num_workers=0 (local mode); a worker group reports to "
                         "Tune through callbacks=[TuneReportCallback()]")
    for c in configs[1:]:
        differ = [k for k in _GROUP_SHARED if getattr(c, k) != getattr(first, k)]
        if differ:
            raise ValueError(f"fit_group: {c.method} differs from {first.method} in {differ}; the jobs of one "
                             "worker group share these settings")
    methods = [c.method for c in configs]
    if len(set(zip(methods, (c.out for c in configs)))) < len(configs):
        raise ValueError(f"fit_group: a method appears twice for one run folder in {methods}")
    specs = [model_spec(c, splits) for c in configs]
    outputs = {str((c.method_dir / "model.pt").resolve()) for c in configs}
    todo = [i for i, c in enumerate(configs) if not reusable(c)]
    _check_dual_data(splits, [configs[i] for i in todo])
    for i in todo:
        c = configs[i]
        if c.init_from and c.init_from not in outputs:  # an earlier job's output is checked when it is written
            _, blob = load_model(c.init_from)
            if blob["model_spec"]["num_classes"] != specs[i]["num_classes"]:
                raise ValueError(
                    f"init_from {c.init_from} has {blob['model_spec']['num_classes']} classes but the split folder "
                    f"{splits.root} has {specs[i]['num_classes']}"
                )
    results = {c.method: result_from_disk(c, reused=True, verified=True)
               for i, c in enumerate(configs) if i not in todo}
    if not todo:
        return results
    if not ray.is_initialized():
        ray.init(log_to_driver=first.verbose)
    total_cpu = ray.cluster_resources().get("CPU", 1)
    cpus = _worker_cpus(first, total_cpu)
    if first.check_resources:
        _check_resources(first, cpus)

    names = [ray_run_name(c, splits, s) for c, s in zip(configs, specs)]
    # One job: its own run name (runs interrupted before groups existed still resume). Several: every job's
    # name, finished or not, so that the rerun of an interrupted group finds the same Ray Train run.
    name = names[0] if len(configs) == 1 else \
        "group-" + hashlib.sha256(json.dumps(names).encode()).hexdigest()[:10]
    if any(configs[i].overwrite for i in todo):
        # Retrain means start afresh: the same name would resume the last run's latest checkpoint (and skip the
        # jobs before it in the group).
        name = f"{name}-fresh-{uuid.uuid4().hex[:8]}"
    storage = first.storage_path or str(as_path(_io.RunFolder(first.out).ray_storage))
    jobs = [{"stage": jsonable(configs[i].to_dict()), "spec": specs[i], "name": names[i]} for i in todo]
    duals = {names[i]: (specs[i]["num_classes"], dataclasses.asdict(configs[i].loop.dual_config))
             for i in todo if method_registry.get(configs[i].method).uses_dual}
    local = first.num_workers == 0
    coordinator_name = f"cact-dual-{name}" if duals and not local else None
    # local mode: the worker is this process, so the coordinator is an object here, not an actor to start (under
    # load an actor's process took 50 s to start on 2 CPUs, longer than the demo's whole training)
    coordinator = (Coordinator(duals) if local else
                   DualCoordinator.options(name=coordinator_name, namespace=COORDINATOR_NAMESPACE,
                                           get_if_exists=True).remote(duals)) if duals else None

    from ray.data import ExecutionOptions

    # data_order="global": every worker reads the split itself; no Ray Data shards (nor their actors) needed
    streamed = any(configs[i].data_order == "shard" for i in todo)
    train_ds = (dataset if dataset is not None else train_dataset(splits, first.materialize_bytes)) \
        if streamed else None
    decoded_by_ray_data = predecoded(splits, [configs[i] for i in todo])
    if decoded_by_ray_data:
        train_ds = train_ds.map_batches(decode_to_uint8, fn_kwargs={"payload": splits.payload,
                                                                    "image_size": configs[todo[0]].image_size},
                                        batch_format="pyarrow", batch_size=256, num_cpus=0.25)
    from .train_worker import LocalSession, train_loop_per_worker

    # Ray Train's own INFO lines follow the job's Ray log level (WARNING in a pipeline without --verbose)
    log_level = logging.getLevelName(max(logging.getLogger("ray").getEffectiveLevel(), logging.INFO))
    loop_config = {"jobs": jobs, "splits": str(as_path(splits.root).resolve()), "log_level": log_level,
                   "run_dir": str(as_path(storage) / name), "coordinator": coordinator_name,
                   "predecoded": decoded_by_ray_data,
                   # the registry entries travel with the jobs: a plugin's method trains on any worker
                   "methods": [method_registry.get(configs[i].method) for i in todo]}
    for i in todo:  # a divergence report of an earlier attempt is stale now
        (configs[i].method_dir / DIVERGED_FILE).unlink(missing_ok=True)
    histories, error = {}, None
    try:
        if local:  # this process is the only worker
            if streamed:  # each epoch's rows in the same order on every run, as the worker group's shards
                train_ds.context.execution_options.preserve_order = True
            train_loop_per_worker(loop_config, LocalSession(loop_config["run_dir"], first.use_gpu, train_ds,
                                                            report_to_tune, coordinator))
        else:
            error = TorchTrainer(
                train_loop_per_worker,
                train_loop_config=loop_config,
                scaling_config=ScalingConfig(num_workers=first.num_workers, use_gpu=first.use_gpu,
                                             resources_per_worker={"CPU": cpus},
                                             placement_strategy=first.placement_strategy),
                run_config=RunConfig(name=name, storage_path=storage,
                                     failure_config=FailureConfig(max_failures=first.max_failures),
                                     checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks or None,
                                     logging_config=LoggingConfig(log_level=log_level)),
                datasets={"train": train_ds} if streamed else None,
                # preserve_order: each worker sees its rows in the same order on every run (a seed fixes the run)
                dataset_config=DataConfig(datasets_to_split=["train"],
                                          execution_options=ExecutionOptions(preserve_order=True))
                if streamed else None,
            ).fit().error
    finally:
        if coordinator is not None and local:
            histories = {job: coordinator.history(job) for job in duals}
        elif coordinator is not None:
            histories = {job: _safe_get(coordinator.history.remote(job)) for job in duals}
            ray.kill(coordinator)
    for i in todo:
        c = configs[i]
        diverged = c.method_dir / DIVERGED_FILE
        if diverged.is_file():
            raise ValueError(json.loads(diverged.read_text())["error"] + f" (reported in {diverged})")
        saved = c.method_dir / "config.json"
        if not (saved.is_file() and same_run(json.loads(saved.read_text()), c)):
            raise RuntimeError(f"training {c.method} wrote no outputs under {c.method_dir} (error: {error})")
        results[c.method] = result_from_disk(c)
        written = json.loads((c.method_dir / "dual.json").read_text())["history"] \
            if (c.method_dir / "dual.json").is_file() else None
        if histories.get(names[i]) is not None and histories[names[i]] != written:
            raise RuntimeError(f"{c.method}: the coordinator's multiplier history differs from the one written: "
                               "please report this")
    return {m: results[m] for m in methods}


DRIVER_READ_BYTES = 256 << 20  # train splits up to this size are read by the driver, not by Ray Data tasks


def predecoded(splits, configs: list[TrainStageConfig]) -> bool:
    """Whether a streamed train split reaches the workers decoded by Ray Data tasks (images and pixels, when the
    jobs agree on the image size): the CPUs beside the workers decode (on a GPU node, while the GPUs compute)
    and the workers only train."""
    return (any(c.data_order == "shard" for c in configs) and splits.payload["kind"] in PREDECODED_KINDS
            and len({c.image_size for c in configs}) == 1)


def train_dataset(splits, materialize_bytes: int = 2 << 30):
    """The train split as a Ray Dataset. Small splits are materialised once on the driver: every epoch then
    re-splits blocks already in the object store instead of re-reading Parquet (seconds per epoch saved), and
    no read task has to compete with the training workers for CPUs (which can deadlock a small cluster)."""
    splits = as_splits(splits)
    size = _io.parquet_bytes(splits.path("train"))
    if size <= min(materialize_bytes, DRIVER_READ_BYTES):
        # Read here and put in the object store as it is: the same rows in the same order as a read task would
        # give, without starting one (a read task's start-up took 6 s on 2 CPUs for the digits split).
        return ray.data.from_arrow(splits.read_table("train"))
    # Fractional CPUs per read task: reads must run beside workers (or other trials) holding the CPUs.
    paths, filesystem = for_reader(splits.files("train"))
    ds = ray.data.read_parquet(paths, filesystem=filesystem, num_cpus=0.25)
    return ds.materialize() if size <= materialize_bytes else ds


def _safe_get(ref):
    try:
        return ray.get(ref, timeout=30)
    except Exception:  # the coordinator is only needed for a consistency check
        return None


def fit_methods(splits, out: str, methods=METHODS, loop: TrainConfig | None = None, ce_epochs: int | None = None,
                finetune_epochs: int | None = None, finetune_lr: float | None = None, from_scratch: bool = False,
                overrides: dict[str, dict] | None = None, parallel: bool = True, backbone: TrainResult | None = None,
                **stage_kwargs) -> dict[str, TrainResult]:
    """Train every method. By default the two-stage protocol: a CE backbone trained once, then every conformal
    method fine-tuned from it (``from_scratch=True`` trains each method from scratch instead).

    ``loop`` is the base TrainConfig (its method is replaced); ``ce_epochs`` / ``finetune_epochs`` default to
    ``loop.epochs``; ``finetune_lr`` defaults to a tenth of ``loop.lr``; ``overrides[method]`` replaces
    TrainConfig fields of one method (e.g. the best config of a sweep); ``backbone``: a CE result already trained
    (by :func:`stages.sweep.run_methods`) to fine-tune from instead of training CE here. The methods train in
    one Ray Train worker group (:func:`fit_group`: the start-up is paid once), or on a GPU cluster with
    ``parallel`` in one group per ``num_workers`` GPUs at once. Extra keyword arguments go to every
    :class:`TrainStageConfig`.
    """
    loop = loop or TrainConfig()
    overrides = overrides or {}
    results: dict[str, TrainResult] = {}
    splits = as_splits(splits)
    ce_cfg, first = None, method_registry.backbone()
    if backbone is not None and not from_scratch:
        results[first] = backbone
    elif first in methods or not from_scratch:
        ce = dataclasses.replace(ce_config(loop), epochs=ce_epochs or loop.epochs, **overrides.get(first, {}))
        ce_cfg = TrainStageConfig(out=out, loop=ce, **stage_kwargs)
    configs = []
    for method in (m for m in methods if m != first):
        if from_scratch and method_registry.get(method).finetune_only:
            warnings.warn(f"{method} exists only as a fine-tune of the CE backbone: skipped with from_scratch",
                          stacklevel=2)
            continue
        if from_scratch:
            cfg = dataclasses.replace(loop, method=method, **overrides.get(method, {}))
            configs.append(TrainStageConfig(out=out, loop=cfg, **stage_kwargs))
        else:
            ft = dataclasses.replace(finetune_config(loop, method, finetune_epochs, finetune_lr),
                                     **overrides.get(method, {}))
            init = results[first].model_path if ce_cfg is None else ce_cfg.method_dir / "model.pt"
            configs.append(TrainStageConfig(out=out, loop=ft, init_from=str(init), **stage_kwargs))
    slots = _group_slots(ce_cfg or (configs[0] if configs else None), parallel)
    # several groups share one read of the train split; a single group reads it only if it trains something
    dataset = train_dataset(splits) if slots > 1 else None
    if ce_cfg is not None and (slots == 1 or not configs or from_scratch):
        # the backbone first in the same worker group: the fine-tunes read its model.pt once it is written
        configs = [ce_cfg] + configs
    elif ce_cfg is not None:
        results |= fit_group(splits, [ce_cfg], dataset=dataset)
    results |= _fit_groups(splits, configs, slots, dataset)
    return {m: results[m] for m in methods if m in results}


def ce_config(loop: TrainConfig) -> TrainConfig:
    """``loop`` as the CE backbone's config: method ``ce`` and every field CE never reads at its default, so
    that changing a conformal knob (``--eta``, ``--lambda-max``...) re-keys only the fine-tunes, and the backbone
    they share is found and reused instead of trained again.

    >>> c = ce_config(TrainConfig(method="cact", eta=0.7, eta_relative=0.5, lr=0.2, alpha=0.05))
    >>> c.method, c.eta, c.eta_relative, c.lr, c.alpha
    ('ce', 1.2, 0.9, 0.2, 0.05)
    """
    defaults = TrainConfig()
    return dataclasses.replace(loop, method=method_registry.backbone(),
                               **{k: getattr(defaults, k) for k in TrainConfig.conformal_fields()})


def finetune_config(loop: TrainConfig, method: str, finetune_epochs: int | None = None,
                    finetune_lr: float | None = None) -> TrainConfig:
    """The second stage of the two-stage protocol: ``method`` fine-tuned from the CE backbone for
    ``finetune_epochs`` (default ``loop.epochs``) at ``finetune_lr`` (default a tenth of ``loop.lr``), no warm-up,
    no step milestones (they count the backbone's epochs).

    A method trained with plain CE (the ``ce_finetune`` control) keeps the conformal knobs at their defaults, as
    the backbone does, so changing one of them does not retrain the control.

    >>> c = finetune_config(TrainConfig(lr=0.1, epochs=200, milestones=(160, 180)), "cact", 20)
    >>> c.method, c.epochs, c.lr, c.milestones
    ('cact', 20, 0.01, ())
    >>> finetune_config(TrainConfig(eta=0.5), "ce_finetune").eta
    1.2
    """
    base = ce_config(loop) if method_registry.get(method).loss == "ce" else loop
    return dataclasses.replace(base, method=method, epochs=finetune_epochs or loop.epochs,
                               lr=finetune_lr if finetune_lr is not None else loop.lr / 10, warmup_epochs=0,
                               milestones=())


def _group_slots(config: TrainStageConfig | None, parallel: bool = True) -> int:
    """How many worker groups train at once: one per ``num_workers`` GPUs on a GPU cluster; on CPUs one group
    (its start-up is paid once, and on a small machine a fit is mostly start-up)."""
    if config is None or not parallel or not config.use_gpu or config.num_workers == 0:
        return 1
    return max(1, int(ray.cluster_resources().get("GPU", 0) // config.num_workers))


def _fit_groups(splits, configs: list[TrainStageConfig], slots: int, dataset) -> dict[str, TrainResult]:
    """``configs`` in ``slots`` worker groups at once (round robin, so a rerun forms the same groups), each
    group driven by a zero-CPU Ray task."""
    groups = [configs[i::slots] for i in range(slots) if configs[i::slots]]
    if len(groups) <= 1:
        return fit_group(splits, configs, dataset=dataset)
    task = ray.remote(num_cpus=0)(_fit_group_task)
    results = {}
    entries = [method_registry.get(c.method) for c in configs]
    for part in ray.get([task.remote(str(as_splits(splits).root), g, dataset, entries) for g in groups]):
        results |= part
    return results


def _fit_group_task(splits_root: str, configs: list[TrainStageConfig], dataset, entries) -> dict[str, TrainResult]:
    for entry in entries:  # the driver's registry entries (a plugin's method is not registered in this process)
        method_registry.adopt(entry)
    return fit_group(splits_root, configs, dataset=dataset)


# ----------------------------------------------------------------------------------------------------------------
# CLI: python -m stages.train SPLITS --out RUN --method cact ...
# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> TrainResult:
    p = argparse.ArgumentParser(description="Train one method on a split folder with Ray Train.")
    p.add_argument("splits", help="split folder written by stages.longtail")
    p.add_argument("--out", required=True, help="run folder (outputs under OUT/train/METHOD)")
    p.add_argument("--method", default="cact", choices=METHODS)
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers; 0: local mode (this process trains)")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--init-from", default=None, help="model.pt of a backbone to fine-tune")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    cfg = TrainStageConfig(out=a.out, loop=TrainConfig(method=a.method, epochs=a.epochs, lr=a.lr,
                                                       batch_size=a.batch_size, seed=a.seed),
                           num_workers=a.num_workers, use_gpu=a.use_gpu, init_from=a.init_from,
                           overwrite=a.overwrite)
    r = fit(a.splits, cfg)
    print(json.dumps({"model": str(r.model_path), "resumed_from_epoch": r.resumed_from_epoch, "reused": r.reused,
                      **{k: v for k, v in r.final_metrics.items() if isinstance(v, (int, float, str))}}, indent=1))
    return r


if __name__ == "__main__":
    main()
