"""``<split>.parquet`` image tables: encoded image bytes (or raw uint8 pixels) plus an integer label column."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages._io import sha256_file
from stages.sources.base import Source, SourceError, SourceSpec, _missing, _pixels_payload

_IMAGE_COLUMNS = ("image", "image_jpeg", "image_png", "image_bytes", "bytes", "pixels")


def _schema_json(meta: dict[bytes, bytes] | None, key: str):
    if not meta:
        return None
    if b"cact" in meta:
        try:
            val = json.loads(meta[b"cact"]).get(key)
        except (ValueError, AttributeError):
            val = None
        if val is not None:
            return val
    if key.encode() in meta:
        try:
            return json.loads(meta[key.encode()])
        except ValueError:
            return None
    return None


class ParquetSource(Source):
    """``<data_root>/<split>.parquet`` tables: encoded image bytes (or raw ``pixels``) plus ``label``.

    Class names come from the schema metadata (``classes``, JSON; or the ``cact`` key this project writes);
    without them the classes are ``"0".."K-1"``. A column named ``pixels`` (or metadata ``dtype``/``shape``
    with ``encoding: "raw"``) is raw uint8 and needs ``shape`` in the metadata. Rows keep file order.
    """

    dataset = "parquet"
    splits = ("train", "test")

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        root = Path(spec.data_root)
        self._paths = {"train": root / f"{spec.train_split or 'train'}.parquet",
                       "test": root / f"{spec.test_split or 'test'}.parquet"}
        self._pf: dict[str, pq.ParquetFile] = {}
        first = self._file("train")
        schema = first.schema_arrow
        names = schema.names
        col = spec.image_column or next((c for c in _IMAGE_COLUMNS if c in names), None)
        if col is None or col not in names:
            wanted = repr(spec.image_column) if spec.image_column else "(auto-detected)"
            raise SourceError(f"{self._paths['train']}: payload column {wanted} not found (found columns "
                              f"{names}; accepted: {', '.join(_IMAGE_COLUMNS)} or image_column=...)")
        if not (pa.types.is_binary(schema.field(col).type) or pa.types.is_large_binary(schema.field(col).type)):
            raise SourceError(f"{self._paths['train']}: column {col!r} has type {schema.field(col).type}, "
                              "expected binary (encoded image bytes or raw pixels)")
        if spec.label_column not in names:
            raise SourceError(f"{self._paths['train']}: no label column {spec.label_column!r} (found {names})")
        if not pa.types.is_integer(schema.field(spec.label_column).type):
            raise SourceError(f"{self._paths['train']}: column {spec.label_column!r} has type "
                              f"{schema.field(spec.label_column).type}, expected an integer type")
        self._col = col
        meta = schema.metadata
        classes = _schema_json(meta, "classes")
        self._declared_classes = classes is not None
        raw = col == "pixels" or (_schema_json(meta, "encoding") == "raw")
        shape = _schema_json(meta, "shape")
        if raw:
            if not shape:
                raise SourceError(f"{self._paths['train']}: raw pixel column {col!r} needs 'shape' [H, W, C] "
                                  "in the schema metadata")
            self.payload = _pixels_payload(shape)
        else:
            self.payload = {"kind": "image", "column": "image", "shape": None}
        if classes is not None:
            self.classes = [str(c) for c in classes]
        else:
            labs = first.read(columns=[spec.label_column]).column(0)
            self.classes = [str(i) for i in range(int(pc.max(labs).as_py() or 0) + 1)]

    def _file(self, split) -> pq.ParquetFile:
        if split not in self._pf:
            path = self._paths[split]
            if not path.is_file():
                raise _missing(path, f"parquet {split} table")
            try:
                self._pf[split] = pq.ParquetFile(path)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
                raise SourceError(f"{path}: not a readable Parquet file ({e})") from e
        return self._pf[split]

    def __getstate__(self):
        state = super().__getstate__()
        state["_pf"] = {}  # open file handles do not travel to Ray tasks
        return state

    def _load_labels(self, split):
        if split in self._ids:
            return
        pf = self._file(split)
        if split != "train":
            for c in (self._col, self.spec.label_column):
                if c not in pf.schema_arrow.names:
                    raise SourceError(f"{self._paths[split]}: column {c!r} missing (found {pf.schema_arrow.names})")
        labs = pf.read(columns=[self.spec.label_column]).column(0)
        if labs.null_count:
            raise SourceError(f"{self._paths[split]}: column {self.spec.label_column!r} has "
                              f"{labs.null_count} null labels")
        offset = 0 if split == "train" else self._file("train").metadata.num_rows
        y = labs.to_numpy()
        self._set_labels(split, np.arange(len(y), dtype=np.int64) + offset, y,
                         f"{self._paths[split]} column {self.spec.label_column!r}")

    def chunks(self, split):
        # One chunk per row group (row groups are the unit Parquet reads; a chunk never spans two).
        self._load_labels(split)
        md = self._file(split).metadata
        out, row = [], 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            out.append((row, row + n))
            row += n
        return out

    def _read(self, split, rows):
        pf = self._file(split)
        md = pf.metadata
        row, lo = 0, int(rows[0])
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if row <= lo < row + n:
                # The last row group read stays cached (one per process): consecutive shards of a split build
                # usually take rows from the same row group, which would otherwise be read once per shard.
                cache = self.__dict__.setdefault("_cache", {})
                if (split, g) not in cache:
                    cache.clear()
                    cache[(split, g)] = pf.read_row_group(g, columns=[self._col]).column(0)
                col = cache[(split, g)].take(pa.array(rows - row)).combine_chunks()
                if pa.types.is_large_binary(col.type):
                    col = col.cast(pa.binary())
                return {self.payload["column"]: col}
            row += n
        raise IndexError(lo)

    def describe(self, split, sample_id):
        self._load_labels(split)
        row = int(np.searchsorted(self._ids[split], sample_id))
        return f"{self._paths[split]} row {row} (column {self._col!r})"

    def sources(self):
        return [str(p.resolve()) for p in self._paths.values()]

    def checksums(self):
        return {str(p.resolve()): sha256_file(p) for p in self._paths.values()}
