"""What every data source shares: :class:`SourceSpec` (where a dataset lives), the :class:`Source` base class
(official splits, chunked reads, selection by ``sample_id``), :class:`SourceError` and small column helpers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa


class SourceError(ValueError):
    """A source file or field is unreadable or invalid; the message names the file/field at fault."""


def _missing(path: Path | str, what: str) -> FileNotFoundError:
    return FileNotFoundError(2, f"{what} not found: {path}", str(path))


@dataclass(frozen=True)
class SourceSpec:
    """Where a dataset lives and how to read it.

    Attributes:
        dataset: a registered source name (:func:`stages.sources.source_names`). Default ``"digits"``
            (embedded, needs no files).
        data_root: folder holding the official files (a ``.tar.gz`` path is also accepted for newsgroups).
            Not used for digits.
        train_split, test_split: official split names: folder names for imagefolder (default ``"train"``,
            ``"val"``), file stems for parquet (default ``"train"``, ``"test"``). Other datasets have fixed
            official files and ignore them.
        train_list, val_list, test_list: ImageNet-LT list files (``relative/path label`` per line, paths
            relative to ``data_root``); each list given replaces that split's folder scan and selects and
            labels its rows exactly. imagefolder only.
        label_kind: CIFAR-100 labels, ``"fine"`` (100 classes, default) or ``"coarse"`` (20 superclasses).
        strip_headers: newsgroups: drop each message's header block (as scikit-learn's
            ``remove=("headers",)``). Default False: keep the raw text.
        image_column: parquet: the payload column; default: the first of ``image``, ``image_jpeg``,
            ``image_png``, ``image_bytes``, ``bytes``, ``pixels`` present.
        label_column: parquet: the label column (default ``"label"``).
        chunk_rows: rows per read chunk (one Ray read task per chunk; bounds memory per batch).

    >>> SourceSpec().dataset
    'digits'
    """

    dataset: str = "digits"
    data_root: str | None = None
    train_split: str | None = None
    test_split: str | None = None
    train_list: str | None = None
    val_list: str | None = None
    test_list: str | None = None
    label_kind: str = "fine"
    strip_headers: bool = False
    image_column: str | None = None
    label_column: str = "label"
    chunk_rows: int = 4096

    def __post_init__(self):
        from stages.sources import _SOURCES, source_names  # the registry imports this module: look up when called

        datasets = source_names()
        if self.dataset not in datasets:
            raise ValueError(f"dataset={self.dataset!r} is not supported; accepted: {', '.join(datasets)}")
        if self.label_kind not in ("fine", "coarse"):
            raise ValueError(f"label_kind={self.label_kind!r}; accepted: 'fine', 'coarse'")
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows={self.chunk_rows} must be >= 1")
        if _SOURCES[self.dataset].needs_data_root and self.data_root is None:
            raise ValueError(f"dataset={self.dataset!r} needs data_root (the folder holding its official files)")
        lists = [self.train_list, self.val_list, self.test_list]
        if any(x is not None for x in lists) and self.dataset != "imagefolder":
            raise ValueError("train_list/val_list/test_list (ImageNet-LT lists) apply to dataset='imagefolder' only")


# ----------------------------------------------------------------------------------------------------------
# Base class: row tables per official split, chunked reads, selection by sample_id.


class Source:
    """An opened dataset: class names, payload description, official splits and their rows.

    Subclasses fill ``_ids``/``_labels`` per split (official order, ``sample_id`` ascending) and implement
    ``_read(split, rows)`` returning the payload columns for the given row indices of that split.
    """

    dataset: str
    classes: list[str]
    payload: dict
    splits: tuple[str, ...]
    needs_data_root: bool = True  # False for a source that reads no files (digits)

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self._ids: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}

    # -- public API -------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def labels(self, split: str) -> pa.Table:
        """Labels-only table (``sample_id`` int64, ``label`` int64) of an official split, official order."""
        self._check_split(split)
        self._load_labels(split)
        return pa.table({"sample_id": self._ids[split], "label": self._labels[split]})

    def chunks(self, split: str) -> list[tuple[int, int]]:
        """Row ranges ``[start, end)`` of ``split``, one read task each."""
        self._check_split(split)
        self._load_labels(split)
        n, step = len(self._ids[split]), self._chunk_rows()
        return [(s, min(s + step, n)) for s in range(0, n, step)]

    def read_rows(self, split: str, start: int, end: int, rows: np.ndarray | None = None) -> pa.Table:
        """Rows ``start..end`` of ``split`` (or only ``rows``, absolute row indices inside that range)."""
        self._load_labels(split)
        rows = np.arange(start, end, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        cols = {"sample_id": pa.array(self._ids[split][rows]), "label": pa.array(self._labels[split][rows])}
        cols.update(self._read(split, rows))
        return pa.table(cols)

    def iter_batches(self, split: str, sample_ids: np.ndarray | None = None) -> Iterator[pa.Table]:
        """Stream ``split`` chunk by chunk; with ``sample_ids`` (sorted) only those rows are read."""
        chunks = self.chunks(split)
        ids = self._ids[split]
        if sample_ids is not None:
            sample_ids = np.asarray(sample_ids, dtype=np.int64)
            pos = np.searchsorted(ids, sample_ids)
            bad = (pos >= len(ids)) | (ids[np.minimum(pos, len(ids) - 1)] != sample_ids) if len(ids) else pos >= 0
            if np.any(bad):
                raise SourceError(f"{self.dataset} {split}: unknown sample_id(s) {sample_ids[bad][:5].tolist()}")
        for start, end in chunks:
            if sample_ids is None:
                yield self.read_rows(split, start, end)
                continue
            lo, hi = np.searchsorted(pos, [start, end])
            if lo < hi:
                yield self.read_rows(split, start, end, pos[lo:hi])

    def sources(self) -> list[str]:
        """Resolved paths of the files/folders this source reads (for the manifest)."""
        return [str(Path(self.spec.data_root).resolve())] if self.spec.data_root else []

    def checksums(self) -> dict[str, str]:
        """sha256 per source file (folder trees: one digest of the listing), keyed by path."""
        return {}

    def describe(self, split: str, sample_id: int) -> str:
        """Where a row comes from, for error messages."""
        return f"{self.dataset} {split} sample_id={sample_id}"

    # -- helpers ----------------------------------------------------------------------------------------
    def _chunk_rows(self) -> int:
        return self.spec.chunk_rows

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"{self.dataset} has no split {split!r}; accepted: {', '.join(self.splits)}")

    def _load_labels(self, split: str) -> None:
        raise NotImplementedError

    def _read(self, split: str, rows: np.ndarray) -> dict[str, pa.Array]:
        raise NotImplementedError

    def _check_labels(self, labels: np.ndarray, where: str) -> np.ndarray:
        labels = np.asarray(labels, dtype=np.int64)
        bad = (labels < 0) | (labels >= len(self.classes))
        if np.any(bad):
            i = int(np.argmax(bad))
            raise SourceError(
                f"{where}: label {int(labels[i])} (row {i}) is outside the class list "
                f"(accepted: 0..{len(self.classes) - 1}, {len(self.classes)} classes)"
            )
        return labels

    def _set_labels(self, split: str, ids: np.ndarray, labels: np.ndarray, where: str) -> None:
        self._labels[split] = self._check_labels(labels, where)
        self._ids[split] = np.asarray(ids, dtype=np.int64)

    def __getstate__(self):
        # Caches of decoded files are per process; Ray read tasks reload what they need.
        state = self.__dict__.copy()
        state.pop("_cache", None)
        return state


def _pixels_column(arr: np.ndarray) -> pa.Array:
    """[N, ...] uint8 -> binary column of N row-major byte strings (zero copy of one contiguous buffer)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    n = arr.shape[0]
    per = int(np.prod(arr.shape[1:])) if arr.ndim > 1 else 1
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * per).tobytes())
    return pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(arr.tobytes())])


def _pixels_payload(shape: Sequence[int]) -> dict:
    return {"kind": "pixels", "column": "pixels", "shape": [int(s) for s in shape], "dtype": "uint8",
            "layout": "HWC"}


def _first_existing(candidates: Sequence[Path], what: str) -> Path:
    for c in candidates:
        if c.exists():
            return c
    raise FileNotFoundError(2, f"{what} not found; looked for: {', '.join(map(str, candidates))}",
                            str(candidates[0]))


def _require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise _missing(path, what)
    if not path.is_dir():
        raise SourceError(f"{what} is not a folder: {path}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise SourceError(f"{what} is not readable: {path}")
    return path
