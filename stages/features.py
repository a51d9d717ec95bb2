"""Frozen features: run a trained backbone (or any model) over a split folder and write its penultimate features as
a new split folder, on which every method trains a head (model family ``head``).

A feature is the input of the model's last ``nn.Linear`` (:func:`cact_ops.models.penultimate_features`). The
output folder is an ordinary split folder (:mod:`stages.longtail`): the same rows in the same order, columns
``sample_id``, ``label`` and ``features`` (fixed_size_list<float32>[dim]), payload kind ``features``, model family
``head``; so ``stages.train``, ``stages.infer`` and ``stages.evaluate`` run on it unchanged. Its manifest records
where the features came from (the model's and the source splits' SHA-256): a rerun with the same inputs reuses the
folder, other inputs are refused rather than overwritten.

This is the protocol of DeepMind's ConfTr reference on CIFAR-10 (the logits layer of a trained network
re-initialised and trained alone), and the fast route for a large pretrained model: its forward pass runs once.

Example::

    feats = stages.features.extract(FeatureConfig(splits_root="runs/x/splits", model="runs/x/train/ce/model.pt",
                                                  out="runs/x/features"))
    stages.train.fit_methods(feats, "runs/x/heads", loop=TrainConfig(epochs=50, batch_size=500, lr=0.01),
                             from_scratch=True, model_family="head")
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cact_ops.models import penultimate_features

from . import _io
from .splits import SPLITS, Splits, load as load_splits
from .storage import as_path

log = logging.getLogger(__name__)


# How heads train on frozen features: DeepMind's ConfTr CIFAR-10 reference (experiments/run_cifar10.py: the logits
# layer re-initialised and trained for 50 epochs, batch 500, lr 0.01, T = 1, size weight 0.05, log transform).
# TrainConfig fields; the pipelines' --frozen-features mode applies them to every head.
REFERENCE_HEAD = {"epochs": 50, "batch_size": 500, "lr": 0.01, "optimizer": "sgd", "schedule": "cosine",
                  "warmup_epochs": 0, "milestones": (), "augment": "none", "temperature": 1.0,
                  "conftr_lambda": 0.05, "size_transform": "log"}


@dataclass
class FeatureConfig:
    """Which backbone runs over which splits, and where the feature split folder goes.

    ``model``: a ``model.pt`` written by :mod:`stages.train` (loaded with ``weights_only``); or None when a model
    object is passed to :func:`extract`. Splits up to ``local_max_bytes`` on disk run in this process; larger ones
    through Ray Data ``map_batches`` (``concurrency`` actors, a GPU each with ``use_gpu``).
    """

    splits_root: str | Path
    out: str | Path
    model: str | Path | None = None
    batch_size: int = 512
    use_gpu: bool = False
    concurrency: int = 1
    num_cpus: float = 1.0
    local_max_bytes: int = 64 << 20
    image_size: int | None = None  # None: the image_size stored in model.pt (or the split's own size)

    def __post_init__(self):
        self.splits_root, self.out = as_path(self.splits_root).resolve(), as_path(self.out).resolve()
        if self.model is not None:
            self.model = as_path(self.model).resolve()
        if self.batch_size < 1 or self.concurrency < 1:
            raise ValueError(f"FeatureConfig: batch_size and concurrency must be >= 1, got {self.batch_size}, "
                             f"{self.concurrency}")


class FeaturePredictor:
    """Ray Data model class: a batch of split rows -> sample_id, label, features (and the row's file)."""

    def __init__(self, payload: dict, model_path: str | None = None, model: torch.nn.Module | None = None,
                 use_gpu: bool = False, image_size: int | None = None):
        from . import payload as codec
        from .infer import load_model

        self.codec, self.payload = codec, payload
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if model is None:
            model, blob = load_model(model_path, self.device)
            image_size = image_size if image_size is not None else blob.get("image_size")
        self.model = model.to(self.device).eval()
        self.image_size = image_size

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        x = self.codec.decode(batch, self.payload, image_size=self.image_size,
                              max_tokens=self.payload.get("max_tokens", self.codec.DEFAULT_MAX_TOKENS))
        feats, _ = penultimate_features(self.model, x.to(self.device))
        out = {"sample_id": batch.column("sample_id").to_numpy().astype(np.int64),
               "features": feats.float().cpu().numpy()}
        if "path" in batch.column_names:
            out["path"] = batch.column("path").to_numpy(zero_copy_only=False)
        return out


def _model_digest(config: FeatureConfig, model: torch.nn.Module | None) -> dict:
    if model is None:
        return {"model": str(config.model), "model_sha256": _io.sha256_file(config.model)}
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return {"model": f"{type(model).__module__}.{type(model).__qualname__}",
            "model_sha256": hashlib.sha256(buf.getvalue()).hexdigest()}


def _features_table(source: pa.Table, found: dict[str, np.ndarray]) -> pa.Table:
    """The source split's rows, in its order, with their features."""
    order = np.argsort(found["sample_id"], kind="stable")
    ids = found["sample_id"][order]
    want = source.column("sample_id").to_numpy()
    pos = np.searchsorted(ids, want)
    if len(ids) != len(want) or not np.array_equal(ids[np.minimum(pos, len(ids) - 1)], want):
        raise RuntimeError(f"feature extraction returned {len(ids)} rows for a split of {len(want)}: rows lost")
    feats = np.ascontiguousarray(found["features"][order][pos], dtype=np.float32)
    flat = pa.array(feats.ravel(), pa.float32())
    return pa.table({"sample_id": source.column("sample_id"), "label": source.column("label"),
                     "features": pa.FixedSizeListArray.from_arrays(flat, feats.shape[1])})


def _run_model(config: FeatureConfig, splits, model: torch.nn.Module | None) -> dict[str, dict[str, np.ndarray]]:
    from .infer import map_splits

    payload = splits.payload
    kwargs = {"payload": payload, "model_path": None if model is not None else str(config.model), "model": model,
              "use_gpu": config.use_gpu, "image_size": config.image_size}
    return map_splits(splits, SPLITS, FeaturePredictor, kwargs, ["sample_id", payload.get("column") or payload["kind"]],
                      config.batch_size, config.use_gpu, config.concurrency, config.num_cpus, config.local_max_bytes)


def extract(config: FeatureConfig, model: torch.nn.Module | None = None) -> Splits:
    """Write (or reuse) the feature split folder ``config.out`` and return its handle.

    ``model``: any ``nn.Module`` ending in an ``nn.Linear`` (a user's pretrained network), instead of
    ``config.model``; it must accept the batches :func:`stages.payload.decode` gives for the source payload.
    """
    if (model is None) == (config.model is None):
        raise ValueError("FeatureConfig.model (a model.pt path) or the model argument: give exactly one")
    if config.model is not None and not config.model.is_file():
        raise FileNotFoundError(2, f"FeatureConfig.model: model file not found: {config.model}", str(config.model))
    splits = load_splits(config.splits_root)
    # the build's own checksums (a hand-made split folder without them is hashed here)
    checks = {s: splits.digest(s) for s in SPLITS}
    source = {"splits_root": str(splits.root), "splits": dict(checks),
              **_model_digest(config, model), "image_size": config.image_size}
    out = config.out
    if out.exists() and any(out.iterdir()):
        if not (out / "manifest.json").is_file():
            raise FileExistsError(f"FeatureConfig.out={out} is not empty and holds no manifest.json; refusing to "
                                  "write into it: choose another folder")
        old = load_splits(out)
        # paths are not compared (a run folder moved elsewhere keeps its features); contents are, by SHA-256
        def key(d): return {k: v for k, v in d.items() if k not in ("splits_root", "model")}
        if key(old.manifest.get("features_from") or {}) == key(source):
            log.info("reusing features in %s", out)
            return old
        raise FileExistsError(f"FeatureConfig.out={out} holds features of another model or splits; refusing to "
                              "overwrite it: choose another folder or delete it")
    found = _run_model(config, splits, model)
    manifest = {k: v for k, v in splits.manifest.items() if k not in ("payload", "files", "shards", "checksums")}
    with _io.atomic_path(out) as tmp:
        tmp.mkdir()
        written = {}
        for split in SPLITS:
            table = _features_table(splits.read_table(split, columns=["sample_id", "label"]), found[split])
            pq.write_table(table, tmp / f"{split}.parquet", compression="snappy")
            written[f"{split}.parquet"] = _io.sha256_file(tmp / f"{split}.parquet")
        dim = int(found["train"]["features"].shape[1])
        manifest |= {"payload": {"kind": "features", "column": "features", "dim": dim, "shape": None},
                     "files": {s: f"{s}.parquet" for s in SPLITS}, "model_family": "head",
                     "checksums": {"sources": (splits.manifest.get("checksums") or {}).get("sources"),
                                   "splits": written},
                     "features_from": source}
        _io.write_json(json.loads(json.dumps(manifest, default=str)), tmp / "manifest.json")
    log.info("wrote %d-dim features of %s to %s", dim, source["model"], out)
    return load_splits(out)
