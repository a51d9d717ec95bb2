"""Training stage: one method (ce, conftr, conftr_class, cact_uniform, cact) on a split folder, with Ray Train.

A thin adapter around :class:`cact_ops.training.EpochLoop`; this file is the driver side (configs, run identity,
reuse, the two-stage protocol, outputs), :mod:`stages.train_worker` the loop each Ray Train worker runs,
:mod:`stages.coordinator` the dual-step actor, :mod:`stages.ray_cleanup` the placement-group clean-up. What it adds:

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
import os
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import ray
import torch
import torch.nn as nn

from cact_ops import methods as method_registry
from cact_ops.losses import METHODS
from cact_ops.models import build_model
from cact_ops.training import TrainConfig

from . import _io
from .coordinator import NAMESPACE as COORDINATOR_NAMESPACE, DualCoordinator
from .ray_cleanup import release_orphaned_placement_groups

CHECKPOINT_FILE = "checkpoint.pt"
DIVERGED_FILE = "diverged.json"  # written by a worker whose training went NaN: a deterministic error, not retried


@dataclass
class TrainStageConfig:
    """How to train one method on one split folder. The training math lives in ``loop`` (a TrainConfig)."""

    out: str = "runs/default"  # run folder; outputs go to <out>/train/<method>/
    loop: TrainConfig = field(default_factory=TrainConfig)
    model_family: str | None = None  # None: the manifest's model_family hint (small_cnn, cifar_resnet32, ...)
    model_kwargs: dict = field(default_factory=dict)
    image_size: int | None = None  # resize images to this side (None: keep the stored size)
    init_from: str | None = None  # model.pt of a trained backbone: fine-tune from it (the two-stage protocol)
    finetune: str = "all"  # all | head: which parameters a fine-tune updates
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None: min(1, CPUs / (workers + 1)), leaving room for Ray Data (>= 0.5)
    # shard: each worker streams its own Ray Data shard of the train split (scales to any size); global: every
    # worker reads the split and takes its contiguous slice of one seeded global batch order, so a run gives the
    # same batches, and up to float rounding the same model and multipliers, with any number of workers (not
    # with crop_flip augmentation or BatchNorm: both see only a worker's slice); auto: global for a train split
    # of at most DRIVER_READ_BYTES on disk (no Ray Data actor to start, ~0.1 s less per epoch), shard above
    data_order: str = "auto"
    max_failures: int = 2  # worker-group restarts before the run fails
    storage_path: str | None = None  # Ray Train storage (shared storage on a cluster); None: <out>/ray_storage
    run_name: str | None = None  # None: method + a hash of the config, so a rerun resumes the same run
    val_batch_size: int = 512
    shuffle_buffer: int = 4096  # rows in the local shuffle buffer of each worker (seeded per epoch)
    materialize_bytes: int = 2 << 30  # train splits up to this size on disk are cached in the object store
    overwrite: bool = False  # retrain even when <out>/train/<method>/model.pt exists for the same config
    verbose: bool = True  # one progress line per epoch
    check_resources: bool = True  # refuse at once if the cluster cannot place the workers now (False on an
    #                               autoscaling cluster that adds nodes on demand: the run then waits for them)
    fail_at_epoch: int | None = None  # fault injection for tests: SIGKILL rank 0 once at this epoch

    def __post_init__(self):
        if isinstance(self.loop, dict):
            self.loop = TrainConfig(**self.loop)
        # Workers run in other folders (and on other nodes): every path they read must be absolute.
        self.out = str(Path(self.out).resolve())
        if self.init_from:
            self.init_from = str(Path(self.init_from).resolve())
        if self.data_order not in ("auto", "shard", "global"):
            raise ValueError(f"TrainStageConfig.data_order must be 'auto', 'shard' or 'global', got "
                             f"{self.data_order!r}")
        if self.finetune not in ("all", "head"):
            raise ValueError(f"finetune must be 'all' or 'head', got {self.finetune!r}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")

    @property
    def method(self) -> str:
        return self.loop.method

    @property
    def method_dir(self) -> Path:
        return _io.RunFolder(self.out).method(self.method)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loop"] = self.loop.to_dict()
        return d


@dataclass(frozen=True)
class TrainResult:
    """Paths of a trained method's outputs plus its last epoch's metrics."""

    method: str
    method_dir: Path
    model_path: Path
    history_path: Path
    metrics_path: Path
    final_metrics: dict
    resumed_from_epoch: int = 0  # > 0 when the run continued from a checkpoint
    reused: bool = False  # True when an identical finished run was found and nothing was trained

    def history(self) -> pl.DataFrame:
        return pl.read_parquet(self.history_path)


# ----------------------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------------------
def _splits(splits):
    from . import longtail

    return splits if hasattr(splits, "manifest") else longtail.load(splits)


def model_spec(config: TrainStageConfig, splits) -> dict:
    """How to rebuild the model: family, classes and constructor arguments (stored in model.pt)."""
    m = splits.manifest
    family = config.model_family or m.get("model_family") or "small_cnn"
    kwargs = dict(config.model_kwargs)
    payload = splits.payload
    shape = payload.get("shape")
    if family == "text":
        kwargs.setdefault("vocab_size", int(payload["vocab_size"]))
    elif family == "tfidf" and "idf" not in kwargs:
        from .payload import inverse_document_frequency

        kwargs["idf"] = inverse_document_frequency(splits)
    elif family == "head":
        kwargs.setdefault("in_features", int(payload["dim"]))
    elif family != "linear" and shape:
        kwargs.setdefault("in_channels", int(shape[-1]))
    elif family == "linear" and shape:
        side = config.image_size
        kwargs.setdefault("in_features", int(np.prod(shape)) if side is None else side * side * int(shape[-1]))
    return {"family": family, "num_classes": int(splits.num_classes), "kwargs": kwargs}


def load_model(path: str | os.PathLike, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from a ``model.pt`` written by this stage (``weights_only=True``: no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    blob = torch.load(path, map_location=map_location, weights_only=True)
    spec = blob["model_spec"]
    model = build_model(spec["family"], spec["num_classes"], **spec["kwargs"])
    model.load_state_dict(blob["model"])
    return model, blob


def _with_defaults(saved: dict) -> dict:
    """A saved config.json with the fields added since it was written filled in at their defaults, so that a
    run finished by an older version is still recognised (and reused) as the same run."""
    def defaults(cls) -> dict:
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}

    stage = {k: v for k, v in _jsonable(defaults(TrainStageConfig)).items() if k != "loop"}
    return {**stage, **saved, "loop": {**_jsonable(defaults(TrainConfig)), **saved.get("loop", {})}}


# Fields a run saved before they existed had, in effect, these values (not today's defaults): such a run is not
# the same as one trained with today's default.
_ABSENT_MEANT = {"cal_weighting": "none"}


# How a run was executed, not what it computed: a rerun on a busier cluster gets another CPU share per worker
# (fit_methods sizes it to the fits running at once) and must still find its finished runs.
_EXECUTION_ONLY = ("cpus_per_worker", "max_failures", "verbose", "check_resources", "overwrite", "fail_at_epoch",
                   "storage_path", "materialize_bytes", "run_name")


def _relative_to_run(d: dict) -> None:
    """Drop the run folder's own path from a config and express the backbone it fine-tuned from relative to it,
    so that a run folder moved or copied elsewhere is still recognised (the saved config holds the old paths)."""
    out = d.pop("out", None)
    if out and d.get("init_from"):
        try:
            d["init_from"] = Path(d["init_from"]).relative_to(out).as_posix()
        except ValueError:
            pass  # a backbone outside the run folder: compared as given


def _same_run(saved: dict, config: TrainStageConfig) -> bool:
    """Whether a finished run's saved config.json describes ``config``: execution settings are ignored, and for
    methods trained with plain CE so are the conformal-only fields (they never reach the loss), so a backbone
    saved when those fields had other defaults is still the same backbone."""
    saved = {**saved, "loop": {**_ABSENT_MEANT, **saved.get("loop", {})}}
    a, b = _with_defaults(saved), _jsonable(config.to_dict())
    for d in (a, b):
        for k in _EXECUTION_ONLY:
            d.pop(k, None)
        _relative_to_run(d)
    if method_registry.get(config.method).loss == "ce":
        for d in (a, b):
            d["loop"] = {k: v for k, v in d["loop"].items() if k not in TrainConfig.conformal_fields()}
    return a == b


def _run_name(config: TrainStageConfig, splits, spec: dict) -> str:
    if config.run_name:
        return config.run_name
    # Optional fields left at None are dropped: adding such a field to TrainConfig keeps older runs' names.
    loop = {k: v for k, v in config.loop.to_dict().items() if v is not None}
    key = json.dumps({"loop": loop, "spec": spec, "splits": str(Path(splits.root).resolve()),
                      "init_from": config.init_from, "finetune": config.finetune, "image_size": config.image_size,
                      "workers": config.num_workers,
                      **({"data_order": config.data_order} if config.data_order != "shard" else {})},
                     sort_keys=True, default=str)
    return f"{config.method}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


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
    if config.use_gpu and config.num_workers > res.get("GPU", 0):
        raise ValueError(
            f"num_workers={config.num_workers} GPU workers requested, but the Ray cluster has {res.get('GPU', 0):g} "
            "GPUs: lower num_workers, add GPU nodes, or drop use_gpu"
        )


def fit(splits, config: TrainStageConfig, callbacks: list | None = None, dataset=None) -> TrainResult:
    """Train ``config.loop.method`` on ``splits`` (a Splits handle or split folder) with Ray Train.

    Starts a local Ray if none is running. Re-running with the same config reuses a finished run, or resumes an
    interrupted one from its last checkpoint. ``callbacks`` go to Ray Train's RunConfig (a Tune trial passes
    ``TuneReportCallback``). ``dataset``: the train split as a Ray Dataset already read (see
    :func:`train_dataset`), shared by several fits; by default it is read here.
    """
    return fit_group(splits, [config], callbacks=callbacks, dataset=dataset)[config.method]


def _damaged_output(method_dir: Path) -> tuple[Path, str] | None:
    """The first output of a finished run in ``method_dir`` that does not load (missing, truncated, not what
    this stage writes), with why; None when ``model.pt``, ``metrics.parquet`` and ``history.parquet`` all load."""
    def model(path):
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(blob, dict) and isinstance(blob.get("model"), dict) and "model_spec" in blob):
            raise ValueError("not a model file of stages.train (no 'model' state dict and 'model_spec')")

    for name, load in (("model.pt", model), ("metrics.parquet", pl.read_parquet),
                       ("history.parquet", pl.read_parquet)):
        try:
            load(method_dir / name)
        except Exception as e:  # noqa: BLE001 - whatever makes it unreadable, the file cannot be used
            return method_dir / name, f"{type(e).__name__}: {e}".strip()[:300]
    return None


def _reusable(config: TrainStageConfig) -> bool:
    """Whether ``config``'s outputs hold a finished run of exactly this config (refuses another config's).

    The outputs are verified first: a run whose ``config.json`` (written last: the run finished writing its
    outputs), ``model.pt``, ``metrics.parquet`` or ``history.parquet`` is missing or does not load is not reused
    but trained again, with a warning naming the file; its outputs are replaced when the new run finishes. The
    new run gets a Ray Train run name of its own (``config.run_name``), so that it starts afresh instead of
    resuming the old run's last checkpoint (in a worker group, possibly another method's)."""
    method_dir = config.method_dir
    if not (method_dir / "model.pt").is_file() or config.overwrite:
        return False
    saved = method_dir / "config.json"
    try:
        saved_config = json.loads(saved.read_text())
        if not isinstance(saved_config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        damaged = (saved, "missing: the run never finished writing its outputs" if not saved.exists()
                   else f"{type(e).__name__}: {e}")
    else:
        if not _same_run(saved_config, config):
            raise ValueError(
                f"{method_dir} already holds a trained {config.method} model with another config; "
                "pass overwrite=True (a pipeline's --no-resume) or choose another --out"
            )
        damaged = _damaged_output(method_dir)
        if damaged is None:
            return True
    path, why = damaged
    warnings.warn(f"{path} is damaged ({why}): the {config.method} run in {method_dir} is not reused; training "
                  f"{config.method} again (its outputs there are replaced)", stacklevel=3)
    # The same name while these files stay as they are: a repair interrupted in turn resumes its own checkpoint.
    stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in (path, method_dir / "model.pt") if p.exists()]
    key = json.dumps([_jsonable(config.to_dict()), stats], sort_keys=True, default=str)
    config.run_name = f"{config.run_name or config.method}-repair-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    return False


# Settings of the one TorchTrainer a group runs in: its jobs must agree on them.
_GROUP_SHARED = ("num_workers", "use_gpu", "cpus_per_worker", "max_failures", "storage_path", "materialize_bytes",
                 "check_resources", "verbose")


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
              ) -> dict[str, TrainResult]:
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
    splits = _splits(splits)
    if any(c.data_order == "auto" for c in configs):  # resolved before the run names and the saved configs
        auto = "global" if _io.parquet_bytes(Path(splits.path("train"))) <= DRIVER_READ_BYTES else "shard"
        for c in configs:
            if c.data_order == "auto":
                c.data_order = auto
    first = configs[0]
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
    todo = [i for i, c in enumerate(configs) if not _reusable(c)]
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
    results = {c.method: _result_from_disk(c, reused=True, verified=True)
               for i, c in enumerate(configs) if i not in todo}
    if not todo:
        return results
    if not ray.is_initialized():
        ray.init(log_to_driver=first.verbose)
    total_cpu = ray.cluster_resources().get("CPU", 1)
    cpus = _worker_cpus(first, total_cpu)
    if first.check_resources:
        _check_resources(first, cpus)

    names = [_run_name(c, splits, s) for c, s in zip(configs, specs)]
    # One job: its own run name (runs interrupted before groups existed still resume). Several: every job's
    # name, finished or not, so that the rerun of an interrupted group finds the same Ray Train run.
    name = names[0] if len(configs) == 1 else \
        "group-" + hashlib.sha256(json.dumps(names).encode()).hexdigest()[:10]
    if any(configs[i].overwrite for i in todo):
        # Retrain means start afresh: the same name would resume the last run's latest checkpoint (and skip the
        # jobs before it in the group).
        name = f"{name}-fresh-{uuid.uuid4().hex[:8]}"
    storage = first.storage_path or str(_io.RunFolder(first.out).ray_storage.resolve())
    jobs = [{"stage": _jsonable(configs[i].to_dict()), "spec": specs[i], "name": names[i]} for i in todo]
    duals = {names[i]: (specs[i]["num_classes"], dataclasses.asdict(configs[i].loop.dual_config))
             for i in todo if method_registry.get(configs[i].method).uses_dual}
    coordinator_name = f"cact-dual-{name}" if duals else None
    coordinator = DualCoordinator.options(name=coordinator_name, namespace=COORDINATOR_NAMESPACE,
                                          get_if_exists=True).remote(duals) if duals else None

    from ray.data import ExecutionOptions

    # data_order="global": every worker reads the split itself; no Ray Data shards (nor their actors) needed
    streamed = any(configs[i].data_order == "shard" for i in todo)
    train_ds = (dataset if dataset is not None else train_dataset(splits, first.materialize_bytes)) \
        if streamed else None
    from .train_worker import train_loop_per_worker

    # Ray Train's own INFO lines follow the job's Ray log level (WARNING in a pipeline without --verbose)
    log_level = logging.getLevelName(max(logging.getLogger("ray").getEffectiveLevel(), logging.INFO))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"jobs": jobs, "splits": str(Path(splits.root).resolve()), "log_level": log_level,
                           "marker_dir": str(Path(storage) / name), "coordinator": coordinator_name,
                           # the registry entries travel with the jobs: a plugin's method trains on any worker
                           "methods": [method_registry.get(configs[i].method) for i in todo]},
        scaling_config=ScalingConfig(num_workers=first.num_workers, use_gpu=first.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=first.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks or None,
                             logging_config=LoggingConfig(log_level=log_level)),
        datasets={"train": train_ds} if streamed else None,
        # preserve_order: each worker sees its rows in the same order on every run, so a seed fixes the result.
        dataset_config=DataConfig(datasets_to_split=["train"],
                                  execution_options=ExecutionOptions(preserve_order=True)) if streamed else None,
    )
    release_orphaned_placement_groups()  # e.g. left by an earlier attempt of this fit that was killed
    for i in todo:  # a divergence report of an earlier attempt is stale now
        (configs[i].method_dir / DIVERGED_FILE).unlink(missing_ok=True)
    histories = {}
    try:
        result = trainer.fit()
    finally:
        if coordinator is not None:
            histories = {job: _safe_get(coordinator.history.remote(job)) for job in duals}
            ray.kill(coordinator)
        release_orphaned_placement_groups()
    for i in todo:
        c = configs[i]
        diverged = c.method_dir / DIVERGED_FILE
        if diverged.is_file():
            raise ValueError(json.loads(diverged.read_text())["error"] + f" (reported in {diverged})")
        saved = c.method_dir / "config.json"
        if not (saved.is_file() and _same_run(json.loads(saved.read_text()), c)):
            raise RuntimeError(f"training {c.method} wrote no outputs under {c.method_dir} (error: {result.error})")
        results[c.method] = _result_from_disk(c)
        written = json.loads((c.method_dir / "dual.json").read_text())["history"] \
            if (c.method_dir / "dual.json").is_file() else None
        if histories.get(names[i]) is not None and histories[names[i]] != written:
            raise RuntimeError(f"{c.method}: the coordinator's multiplier history differs from the one written: "
                               "please report this")
    return {m: results[m] for m in methods}


DRIVER_READ_BYTES = 256 << 20  # train splits up to this size are read by the driver, not by Ray Data tasks


def train_dataset(splits, materialize_bytes: int = 2 << 30):
    """The train split as a Ray Dataset. Small splits are materialised once on the driver: every epoch then
    re-splits blocks already in the object store instead of re-reading Parquet (seconds per epoch saved), and
    no read task has to compete with the training workers for CPUs (which can deadlock a small cluster)."""
    splits = _splits(splits)
    path = Path(splits.path("train"))
    size = _io.parquet_bytes(path)
    if size <= min(materialize_bytes, DRIVER_READ_BYTES):
        # Read here and put in the object store as it is: the same rows in the same order as a read task would
        # give, without starting one (a read task's start-up took 6 s on 2 CPUs for the digits split).
        return ray.data.from_arrow(splits.read_table("train"))
    # Fractional CPUs per read task: reads must run beside workers (or other trials) holding the CPUs.
    ds = ray.data.read_parquet(str(path), num_cpus=0.25)
    return ds.materialize() if size <= materialize_bytes else ds


def _safe_get(ref):
    try:
        return ray.get(ref, timeout=30)
    except Exception:  # the coordinator is only needed for a consistency check
        return None


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _write_outputs(config: TrainStageConfig, spec: dict, state: dict, seconds: float) -> None:
    """A finished job's outputs, each written atomically (rank 0 writes them; the driver reads them back)."""
    d = config.method_dir
    d.mkdir(parents=True, exist_ok=True)
    # The folder is committed as a unit: config.json (the commit marker) goes first and comes back last, so a
    # crash in between leaves an unfinished run that is trained again, never new files under an old config.
    (d / "config.json").unlink(missing_ok=True)
    with _io.atomic_path(d / "model.pt") as tmp:
        torch.save({"model_spec": spec, "model": state["model"], "image_size": config.image_size,
                    "method": config.method, "epochs": state["epoch"]}, tmp)
    _io.write_parquet(pl.DataFrame(state["history"]).to_arrow(), d / "history.parquet")
    metrics = pl.DataFrame(state["metrics"]).with_columns(pl.lit(config.method).alias("method"))
    _io.write_parquet(metrics.to_arrow(), d / "metrics.parquet")
    if state.get("dual") is not None:
        _io.write_json({"history": state["dual"]["history"], "config": state["dual"]["config"]}, d / "dual.json")
    else:  # a previous run's multipliers (this project's file) must not pass for this run's
        (d / "dual.json").unlink(missing_ok=True)
    _io.write_json({"wall_seconds": round(seconds, 2), "resumed_from_epoch": state.get("resumed_from_epoch", 0)},
                   d / "run.json")
    # config.json last: its presence marks a finished run that a rerun may reuse.
    _io.write_json(_jsonable(config.to_dict()), d / "config.json")


def _result_from_disk(config: TrainStageConfig, reused: bool = False, resumed_from: int | None = None,
                      verified: bool = False) -> TrainResult:
    """The result of a finished run from its outputs; ``verified``: :func:`_reusable` has just loaded them."""
    d = config.method_dir
    damaged = None if verified else _damaged_output(d)
    if damaged is not None:
        raise RuntimeError(f"{damaged[0]} does not load ({damaged[1]}): the {config.method} run in {d} is unusable; "
                           "run the same command again (a damaged output is not reused but trained again)")
    metrics = pl.read_parquet(d / "metrics.parquet")
    try:
        run = json.loads((d / "run.json").read_text()) if (d / "run.json").is_file() else {}
    except ValueError:  # only informative (wall time, resumed epoch): a damaged one is not worth failing for
        run = {}
    return TrainResult(method=config.method, method_dir=d, model_path=d / "model.pt",
                       history_path=d / "history.parquet", metrics_path=d / "metrics.parquet",
                       final_metrics=metrics.row(-1, named=True) if metrics.height else {},
                       resumed_from_epoch=resumed_from if resumed_from is not None else run.get("resumed_from_epoch", 0),
                       reused=reused)


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
    splits = _splits(splits)
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
    if config is None or not parallel or not config.use_gpu:
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
    for part in ray.get([task.remote(str(_splits(splits).root), g, dataset, entries) for g in groups]):
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
    p.add_argument("--num-workers", type=int, default=1)
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
