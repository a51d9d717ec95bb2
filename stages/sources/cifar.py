"""CIFAR-10 and CIFAR-100 from the official python pickle batches (torchvision layout)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from stages._io import sha256_file
from stages.sources.base import (Source, SourceError, SourceSpec, _first_existing, _missing, _pixels_column,
                                 _pixels_payload, _require_dir)


def _unpickle_cifar(path: Path) -> dict:
    # The official CIFAR python batches are pickles: the one documented exception to "never unpickle"
    # in this project. Only files the user points at as CIFAR batches are loaded, with encoding="bytes"
    # exactly as the dataset's own instructions say.
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise _missing(path, "CIFAR batch file") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt batch file
        raise SourceError(f"{path}: not a readable CIFAR python batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise SourceError(f"{path}: not a CIFAR python batch (unpickled a {type(obj).__name__}, expected dict)")
    return obj


def _field(obj: dict, key: bytes, path: Path):
    if key not in obj:
        raise SourceError(f"{path}: field {key.decode()!r} missing (found {sorted(k.decode() for k in obj)})")
    return obj[key]


class CifarSource(Source):
    """CIFAR-10 / CIFAR-100 from the official python pickle batches (torchvision layout).

    CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``; CIFAR-100:
    ``cifar-100-python/{train, test, meta}`` with fine or coarse labels (``SourceSpec.label_kind``).
    ``data_root`` may be the parent of that folder or the folder itself. Pixels are stored HWC.
    """

    splits = ("train", "test")

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.dataset = spec.dataset
        root = _require_dir(Path(spec.data_root), f"{spec.dataset} data_root")
        if spec.dataset == "cifar10":
            folder = root if (root / "batches.meta").exists() else root / "cifar-10-batches-py"
            meta_path = _first_existing([folder / "batches.meta"], "CIFAR-10 batches.meta")
            self._files = {"train": [folder / f"data_batch_{i}" for i in range(1, 6)],
                           "test": [folder / "test_batch"]}
            names_key, self._label_key = b"label_names", b"labels"
        else:
            folder = root if (root / "meta").exists() else root / "cifar-100-python"
            meta_path = _first_existing([folder / "meta"], "CIFAR-100 meta")
            self._files = {"train": [folder / "train"], "test": [folder / "test"]}
            names_key = b"fine_label_names" if spec.label_kind == "fine" else b"coarse_label_names"
            self._label_key = b"fine_labels" if spec.label_kind == "fine" else b"coarse_labels"
        for paths in self._files.values():
            for p in paths:
                if not p.is_file():
                    raise _missing(p, f"{spec.dataset} batch file")
        self._meta = meta_path
        meta = _unpickle_cifar(meta_path)
        self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in _field(meta, names_key, meta_path)]
        self.payload = _pixels_payload((32, 32, 3))
        self._cache: dict = {}
        self._bounds: dict[str, list[tuple[int, int, Path]]] = {}

    def _batch(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        cache = self.__dict__.setdefault("_cache", {})
        if path not in cache:
            obj = _unpickle_cifar(path)
            data = np.asarray(_field(obj, b"data", path))
            labels = np.asarray(_field(obj, self._label_key, path), dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise SourceError(f"{path}: field 'data' has shape {data.shape} dtype {data.dtype}; "
                                  "expected [N, 3072] uint8")
            if len(labels) != len(data):
                raise SourceError(f"{path}: {len(labels)} {self._label_key.decode()} for {len(data)} images")
            cache.clear()  # keep one batch in memory at a time
            cache[path] = (data, labels)
        return cache[path]

    def _load_labels(self, split):
        if split in self._ids:
            return
        start = 0 if split == "train" else len(self.labels("train"))
        ys, bounds, row = [], [], 0
        for p in self._files[split]:
            _, y = self._batch(p)
            self._check_labels(y, f"{p} field {self._label_key.decode()!r}")
            bounds.append((row, row + len(y), p))
            ys.append(y)
            row += len(y)
        y = np.concatenate(ys)
        self._bounds[split] = bounds
        self._set_labels(split, np.arange(len(y), dtype=np.int64) + start, y, str(self._files[split][0]))

    def chunks(self, split):
        # Chunks never straddle two batch files, so each read unpickles one file.
        self._load_labels(split)
        out = []
        for lo, hi, _ in self._bounds[split]:
            out += [(s, min(s + self.spec.chunk_rows, hi)) for s in range(lo, hi, self.spec.chunk_rows)]
        return out

    def _read(self, split, rows):
        for lo, hi, p in self._bounds[split]:
            if lo <= rows[0] < hi:
                data, _ = self._batch(p)
                arr = data[rows - lo].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW planes -> HWC
                return {"pixels": _pixels_column(arr)}
        raise IndexError(rows[0])

    def _all_files(self) -> list[Path]:
        return [p for ps in self._files.values() for p in ps] + [self._meta]

    def sources(self):
        return [str(p.resolve()) for p in self._all_files()]

    def checksums(self):
        return {str(p.resolve()): sha256_file(p) for p in self._all_files()}
