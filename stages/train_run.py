"""One training run of the train stage, apart from how Ray Train runs it: its config
(:class:`TrainStageConfig`), identity (the Ray Train run name, which config a finished run was), outputs
under ``<out>/train/<method>/`` (written by rank 0, read back by the driver) and when a finished run is reused.

No Ray here: :mod:`stages.train` (the driver) and :mod:`stages.train_worker` (the workers) both use it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from cact_ops import methods as method_registry
from cact_ops.models import build_model
from cact_ops.training import TrainConfig

from . import _io
from .splits import load as load_splits
from .storage import as_path

if TYPE_CHECKING:
    import polars as pl

CHECKPOINT_FILE = "checkpoint.pt"
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
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
    # 0: local mode, the training function runs in this process, rank 0 of 1 (no Ray Train controller or worker
    # actors to start, ~20 s of a small run on 2 CPUs); checkpoints and resume-on-rerun as with a worker group,
    # but no worker restarts (the worker is this process)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # None: min(1, CPUs / (workers + 1)), leaving room for Ray Data (>= 0.5)
    # Where the workers go (Ray's placement strategies): PACK (default: as few nodes as fit), SPREAD, or
    # STRICT_SPREAD (one worker per node; the two-node test uses it). Results do not depend on it.
    placement_strategy: str = "PACK"
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
    shuffle_buffer: int = 4096  # rows in the local shuffle buffer of each worker (seeded per epoch); 0: none
    materialize_bytes: int = 2 << 30  # train splits up to this size on disk are cached in the object store
    overwrite: bool = False  # retrain even when <out>/train/<method>/model.pt exists for the same config
    verbose: bool = True  # one progress line per epoch
    check_resources: bool = True  # refuse at once if the cluster cannot place the workers now (False on an
    #                               autoscaling cluster that adds nodes on demand: the run then waits for them)
    fail_at_epoch: int | None = None  # fault injection for tests: SIGKILL rank 0 once at this epoch

    def __post_init__(self):
        if isinstance(self.loop, dict):
            self.loop = TrainConfig(**self.loop)
        # Workers run in other folders (and on other nodes): every path they read must be absolute (or a URI).
        self.out = str(as_path(self.out).resolve())
        if self.init_from:
            self.init_from = str(as_path(self.init_from).resolve())
        if self.data_order not in ("auto", "shard", "global"):
            raise ValueError(f"TrainStageConfig.data_order must be 'auto', 'shard' or 'global', got "
                             f"{self.data_order!r}")
        if self.finetune not in ("all", "head"):
            raise ValueError(f"finetune must be 'all' or 'head', got {self.finetune!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0: local mode, this process trains), got {self.num_workers}")
        if self.num_workers == 0 and self.fail_at_epoch is not None:
            raise ValueError("fail_at_epoch kills a worker of a worker group: it needs num_workers >= 1 (in local "
                             "mode the worker is this process)")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={self.shuffle_buffer}; accepted: 0 (no shuffle) or more rows")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy={self.placement_strategy!r}; accepted: "
                             f"{', '.join(PLACEMENT_STRATEGIES)}")

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
        return _io.read_frame(self.history_path)


def as_splits(splits):
    return splits if hasattr(splits, "manifest") else load_splits(splits)


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
    path = as_path(path, absolute=False)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    blob = _io.load_torch(path, map_location=map_location)
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

    stage = {k: v for k, v in jsonable(defaults(TrainStageConfig)).items() if k != "loop"}
    return {**stage, **saved, "loop": {**jsonable(defaults(TrainConfig)), **saved.get("loop", {})}}


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
            d["init_from"] = as_path(d["init_from"]).relative_to(as_path(out)).as_posix()
        except ValueError:
            pass  # a backbone outside the run folder: compared as given


def same_run(saved: dict, config: TrainStageConfig) -> bool:
    """Whether a finished run's saved config.json describes ``config``: execution settings are ignored, and for
    methods trained with plain CE so are the conformal-only fields (they never reach the loss), so a backbone
    saved when those fields had other defaults is still the same backbone."""
    saved = {**saved, "loop": {**_ABSENT_MEANT, **saved.get("loop", {})}}
    a, b = _with_defaults(saved), jsonable(config.to_dict())
    for d in (a, b):
        for k in _EXECUTION_ONLY:
            d.pop(k, None)
        _relative_to_run(d)
    if method_registry.get(config.method).loss == "ce":
        for d in (a, b):
            d["loop"] = {k: v for k, v in d["loop"].items() if k not in TrainConfig.conformal_fields()}
    return a == b


def ray_run_name(config: TrainStageConfig, splits, spec: dict) -> str:
    if config.run_name:
        return config.run_name
    # Optional fields left at None are dropped: adding such a field to TrainConfig keeps older runs' names.
    loop = {k: v for k, v in config.loop.to_dict().items() if v is not None}
    key = json.dumps({"loop": loop, "spec": spec, "splits": str(as_path(splits.root).resolve()),
                      "init_from": config.init_from, "finetune": config.finetune, "image_size": config.image_size,
                      "workers": config.num_workers,
                      **({"data_order": config.data_order} if config.data_order != "shard" else {})},
                     sort_keys=True, default=str)
    return f"{config.method}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def damaged_output(method_dir: Path) -> tuple[Path, str] | None:
    """The first output of a finished run in ``method_dir`` that does not load (missing, truncated, not what
    this stage writes), with why; None when ``model.pt``, ``metrics.parquet`` and ``history.parquet`` all load."""
    def model(path):
        blob = _io.load_torch(path, map_location="cpu")
        if not (isinstance(blob, dict) and isinstance(blob.get("model"), dict) and "model_spec" in blob):
            raise ValueError("not a model file of stages.train (no 'model' state dict and 'model_spec')")

    for name, load in (("model.pt", model), ("metrics.parquet", _io.read_frame),
                       ("history.parquet", _io.read_frame)):
        try:
            load(method_dir / name)
        except Exception as e:  # noqa: BLE001 - whatever makes it unreadable, the file cannot be used
            return method_dir / name, f"{type(e).__name__}: {e}".strip()[:300]
    return None


def reusable(config: TrainStageConfig) -> bool:
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
        if not same_run(saved_config, config):
            raise ValueError(
                f"{method_dir} already holds a trained {config.method} model with another config; "
                "pass overwrite=True (a pipeline's --no-resume) or choose another --out"
            )
        damaged = damaged_output(method_dir)
        if damaged is None:
            return True
    path, why = damaged
    warnings.warn(f"{path} is damaged ({why}): the {config.method} run in {method_dir} is not reused; training "
                  f"{config.method} again (its outputs there are replaced)", stacklevel=3)
    # The same name while these files stay as they are: a repair interrupted in turn resumes its own checkpoint.
    stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in (path, method_dir / "model.pt") if p.exists()]
    key = json.dumps([jsonable(config.to_dict()), stats], sort_keys=True, default=str)
    config.run_name = f"{config.run_name or config.method}-repair-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    return False


def jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def write_outputs(config: TrainStageConfig, spec: dict, state: dict, seconds: float) -> None:
    """A finished job's outputs, each written atomically (rank 0 writes them; the driver reads them back)."""
    d = config.method_dir
    d.mkdir(parents=True, exist_ok=True)
    # The folder is committed as a unit: config.json (the commit marker) goes first and comes back last, so a
    # crash in between leaves an unfinished run that is trained again, never new files under an old config.
    import polars as pl  # here, not at the top: the model helpers import on a machine without Polars

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
    _io.write_json(jsonable(config.to_dict()), d / "config.json")


def result_from_disk(config: TrainStageConfig, reused: bool = False, resumed_from: int | None = None,
                      verified: bool = False) -> TrainResult:
    """The result of a finished run from its outputs; ``verified``: :func:`reusable` has just loaded them."""
    d = config.method_dir
    damaged = None if verified else damaged_output(d)
    if damaged is not None:
        raise RuntimeError(f"{damaged[0]} does not load ({damaged[1]}): the {config.method} run in {d} is unusable; "
                           "run the same command again (a damaged output is not reused but trained again)")
    metrics = _io.read_frame(d / "metrics.parquet")
    try:
        run = json.loads((d / "run.json").read_text()) if (d / "run.json").is_file() else {}
    except ValueError:  # only informative (wall time, resumed epoch): a damaged one is not worth failing for
        run = {}
    return TrainResult(method=config.method, method_dir=d, model_path=d / "model.pt",
                       history_path=d / "history.parquet", metrics_path=d / "metrics.parquet",
                       final_metrics=metrics.row(-1, named=True) if metrics.height else {},
                       resumed_from_epoch=resumed_from if resumed_from is not None else run.get("resumed_from_epoch", 0),
                       reused=reused)
