"""Inference stage: Ray Data batch inference of every trained method on the ``val`` and ``pool`` splits.

Reads ``<run>/train/<method>/model.pt`` (written by :mod:`stages.train`) and the split folder
(:mod:`stages.longtail`), runs ``map_batches`` with a model class (one actor per ``concurrency``, a GPU each when
``use_gpu``) and writes ``<run>/logits/<method>/{val,pool}.parquet``: ``sample_id`` int64, ``label`` int64,
``logits`` fixed_size_list<float32>[K], rows sorted by ``sample_id``. Each file is written atomically, so a
rerun replaces it. ``<run>/logits/<method>/manifest.json`` records the model's and the splits' SHA-256.

All methods and splits run in one pass: one dataset over the split files, and an actor holds every method's
model, so each batch is read and decoded once (decoding images costs more than a small model's forward pass)
and the actors start once.

Example::

    res = stages.infer.run(InferConfig(run_dir="runs/digits"))
    res.paths["cact"]["pool"]   # runs/digits/logits/cact/pool.parquet
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from cact_ops.methods import order_key

from . import _io
from .storage import UriPath, as_path, for_reader

log = logging.getLogger(__name__)


@dataclass
class InferConfig:
    """What to run inference for. Defaults: every trained method, the ``val`` and ``pool`` splits, CPU.

    >>> InferConfig("runs/digits").splits
    ('val', 'pool')
    """

    run_dir: str | Path
    splits_root: str | Path | None = None  # None: <run_dir>/splits
    methods: Sequence[str] | None = None  # None: every <run_dir>/train/<method>/model.pt
    splits: Sequence[str] = ("val", "pool")
    batch_size: int = 512
    use_gpu: bool = False  # one GPU per model actor (falls back to the CPU where CUDA is absent)
    concurrency: int = 1  # number of model actors
    num_cpus: float = 1.0  # CPUs per model actor
    # Splits up to this size on disk (all together) run through the same predictor in this process: on small
    # data the Ray Data read tasks and actor start-up (about 10 s on 2 CPUs) cost far more than the forward
    # passes. 0: always Ray Data. Never with use_gpu (the driver may have no GPU).
    local_max_bytes: int = 64 << 20
    image_size: int | None = None  # None: the image_size stored in each model.pt

    def __post_init__(self):
        self.splits = tuple(self.splits)
        if self.methods is not None:
            self.methods = tuple(self.methods)


@dataclass
class InferResult:
    """Where the logits went: ``paths[method][split]``, and the number of rows per split."""

    run_dir: Path
    paths: dict[str, dict[str, Path]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)


def discover_models(run_dir: str | Path) -> tuple[str, ...]:
    """Methods with ``train/<method>/model.pt``, in the canonical order (ce, conftr, ..., cact)."""
    root = _io.RunFolder(run_dir).train
    found = [p.parent.name for p in root.glob("*/model.pt")] if root.is_dir() else []
    return tuple(sorted(found, key=order_key))


def load_model(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a ``model.pt`` (:func:`stages.train_run.load_model`, ``weights_only``: no pickle), in eval mode."""
    from .train_run import load_model as _load

    model, blob = _load(path)
    return model.to(device).eval(), blob


class LogitsPredictor:
    """Ray Data model class: a batch of split rows (Arrow) -> sample_id, label and one logits column per method."""

    def __init__(self, model_paths: dict[str, str], payload: dict, use_gpu: bool = False,
                 image_size: int | None = None):
        from . import payload as codec

        self.codec = codec
        self.payload = payload
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.models, self.image_sizes = {}, {}
        for method, path in model_paths.items():
            self.models[method], blob = load_model(path, self.device)
            self.image_sizes[method] = image_size if image_size is not None else blob.get("image_size")

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        out = {"sample_id": batch.column("sample_id").to_numpy().astype(np.int64),
               "label": batch.column("label").to_numpy().astype(np.int64)}
        if "path" in batch.column_names:  # which split file the row came from
            out["path"] = batch.column("path").to_numpy(zero_copy_only=False)
        decoded = {}  # one decode per distinct image size, shared by the methods
        max_tokens = self.payload.get("max_tokens", self.codec.DEFAULT_MAX_TOKENS)
        for method, model in self.models.items():
            size = self.image_sizes[method]
            if size not in decoded:
                decoded[size] = self.codec.decode(batch, self.payload, image_size=size,
                                                  max_tokens=max_tokens).to(self.device)
            out[f"logits__{method}"] = model(decoded[size]).float().cpu().numpy()
        return out


def _logits_table(sample_id: np.ndarray, label: np.ndarray, logits: np.ndarray) -> pa.Table:
    order = np.argsort(sample_id, kind="stable")
    k = logits.shape[1]
    flat = pa.array(np.ascontiguousarray(logits[order], dtype=np.float32).ravel(), pa.float32())
    return pa.table({"sample_id": pa.array(sample_id[order], pa.int64()),
                     "label": pa.array(label[order], pa.int64()),
                     "logits": pa.FixedSizeListArray.from_arrays(flat, k)})


# Ray Data runs tasks of one whole CPU that no option sizes (read_parquet lists the files in one): a pass needs
# this much free beside its actors, or it never starts.
RAY_DATA_OWN_CPUS = 1.0


def fit_to_free(concurrency: int, num_cpus: float, free_cpus: float) -> tuple[int, float] | None:
    """``(actors, CPUs per actor)`` for a Ray Data inference pass on ``free_cpus`` free CPUs, leaving
    :data:`RAY_DATA_OWN_CPUS` to Ray Data's own tasks: as asked when it fits, else fewer actors, then smaller
    ones (down to a quarter CPU); None when even that does not fit (the pass then runs in this process).

    >>> fit_to_free(1, 1.0, 4.0), fit_to_free(4, 1.0, 3.0), fit_to_free(1, 1.0, 1.5), fit_to_free(1, 1.0, 1.0)
    ((1, 1.0), (2, 1.0), (1, 0.5), None)
    """
    room = free_cpus - RAY_DATA_OWN_CPUS
    if room < 0.25:
        return None
    per_actor = min(num_cpus, room)
    return max(1, min(concurrency, int(room // per_actor))), per_actor


def map_splits(splits, names, predictor_cls, predictor_kwargs: dict, columns: list[str], batch_size: int,
               use_gpu: bool = False, concurrency: int = 1, num_cpus: float = 1.0,
               local_max_bytes: int = 64 << 20) -> dict[str, dict[str, np.ndarray]]:
    """Run a batch predictor (a Ray Data model class: Arrow batch -> dict of arrays) over the ``names`` splits:
    in this process when they are small (up to ``local_max_bytes`` on disk, never with ``use_gpu``), else as one
    Ray Data ``map_batches`` pass over all their files (the actors start once), sized to the CPUs free now
    (:func:`fit_to_free`; in this process too when too few are free). Returns, per split, each output
    column concatenated over its batches (the ``path`` column the routing adds is dropped)."""
    files = [(f, s) for s in names for f in splits.files(s)]
    # a file's key is what Ray Data's path column names it by: its path in its filesystem (bucket/key on an
    # object store)
    keys = [f.fs_path if isinstance(f, UriPath) else str(f.resolve()) for f, _ in files]
    route = {key: s for key, (_, s) in zip(keys, files)}
    parts: dict[str, list[np.ndarray]] = {}
    sizing = None
    if use_gpu or sum(_io.parquet_bytes(f) for f, _ in files) > local_max_bytes:
        import ray

        free = ray.available_resources()
        sizing = fit_to_free(concurrency, num_cpus, free.get("CPU", 0.0))
        if sizing is None and use_gpu:  # the driver may have no GPU: wait for the CPUs instead
            sizing = (concurrency, num_cpus)
            log.warning("inference: %.2g CPUs free, %.2g needed; the pass waits for them", free.get("CPU", 0.0),
                        concurrency * num_cpus + RAY_DATA_OWN_CPUS)
        elif sizing is None:
            log.info("inference: %.2g CPUs free, too few for a Ray Data pass beside what holds the others; it "
                     "runs in this process", free.get("CPU", 0.0))
        elif sizing != (concurrency, num_cpus):
            log.info("inference: %d model actor(s) x %.2g CPUs (%.2g CPUs free)", *sizing, free.get("CPU", 0.0))
    if sizing is None:
        predictor = predictor_cls(**predictor_kwargs)
        for (path, _), key in zip(files, keys):
            table = _io.read_parquet(path, columns=columns)
            for start in range(0, table.num_rows, batch_size):
                batch = table.slice(start, batch_size)
                out = predictor(batch.append_column("path", pa.array([key] * batch.num_rows)))
                for name, values in out.items():
                    parts.setdefault(name, []).append(np.asarray(values))
    else:
        actors, actor_cpus = sizing
        if use_gpu:
            actors = max(1, min(actors, int(free.get("GPU", 0))))
        paths, filesystem = for_reader(f for f, _ in files)
        ds = ray.data.read_parquet(paths, filesystem=filesystem, columns=columns, include_paths=True)
        ds = ds.map_batches(predictor_cls, fn_constructor_kwargs=predictor_kwargs, batch_size=batch_size,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
                            num_gpus=1 if use_gpu else 0, num_cpus=actor_cpus)
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            for name, values in batch.items():
                parts.setdefault(name, []).append(np.asarray(values))
    cols = {name: np.concatenate(v) for name, v in parts.items()}
    origin = np.array([route.get(p) or route.get(str(Path(p).resolve()), "") for p in cols.pop("path", [])])
    return {split: {name: values[origin == split] for name, values in cols.items()} for split in names}


def run(config: InferConfig) -> InferResult:
    """Write ``<run>/logits/<method>/<split>.parquet`` for every method and split (Ray Data ``map_batches``, or
    the same predictor in this process for splits up to ``local_max_bytes``)."""
    from .splits import load as load_splits

    run_dir = as_path(config.run_dir)  # absolute: the model actors run elsewhere
    run = _io.RunFolder(run_dir)
    splits = load_splits(as_path(config.splits_root) if config.splits_root else run.splits)
    methods = tuple(config.methods) if config.methods else discover_models(run_dir)
    if not methods:
        raise FileNotFoundError(2, f"no trained model under {run.train} (run stages.train first)",
                                str(run.train))
    model_paths = {m: run.model(m) for m in methods}
    for m, p in model_paths.items():
        if not p.is_file():
            raise FileNotFoundError(2, f"model file not found: {p}", str(p))
    payload = splits.payload
    columns = ["sample_id", "label", payload.get("column") or payload["kind"]]
    result = InferResult(run_dir=run_dir, paths={m: {} for m in methods})
    predictor_kwargs = {"model_paths": {m: str(p) for m, p in model_paths.items()}, "payload": payload,
                        "use_gpu": config.use_gpu, "image_size": config.image_size}
    by_split = map_splits(splits, config.splits, LogitsPredictor, predictor_kwargs, columns, config.batch_size,
                          config.use_gpu, config.concurrency, config.num_cpus, config.local_max_bytes)
    for split in config.splits:
        cols = by_split[split]
        sample_id, label = cols["sample_id"], cols["label"]
        result.rows[split] = len(sample_id)
        expected = int(sum(splits.manifest["counts"][split]))
        if len(sample_id) != expected:
            raise RuntimeError(f"{splits.path(split)}: inference returned {len(sample_id)} rows, the manifest "
                               f"lists {expected}")
        for m in methods:
            path = run.logits(m, split)
            _io.write_parquet(_logits_table(sample_id, label, cols[f"logits__{m}"]), path)
            result.paths[m][split] = path
        log.info("inference on %s: %d rows x %d methods", split, len(sample_id), len(methods))
    for m in methods:
        _io.write_json({"model": str(model_paths[m]), "model_sha256": _io.sha256_file(model_paths[m]),
                        "splits_root": str(splits.root),
                        "split_files": {s: {"file": str(splits.path(s)), "sha256": splits.digest(s),
                                            "rows": result.rows[s]} for s in config.splits}},
                       run.logits(m) / "manifest.json")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages.infer", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--splits-root", default=None)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--splits", nargs="+", default=["val", "pool"])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--concurrency", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = run(InferConfig(a.run_dir, a.splits_root, a.methods, a.splits, a.batch_size, a.use_gpu, a.concurrency))
    for m, paths in res.paths.items():
        for s, path in paths.items():
            print(f"{m} {s}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
