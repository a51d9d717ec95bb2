"""MNIST from the official idx files (gzipped or raw), with the idx header and payload checks."""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from stages._io import sha256_file
from stages.sources.base import (Source, SourceError, SourceSpec, _first_existing, _pixels_column, _pixels_payload,
                                 _require_dir)


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        head = f.read(2)
    return gzip.open(path, "rb") if head == b"\x1f\x8b" else open(path, "rb")


def _read_exact(f, n: int, path: Path, what: str) -> bytes:
    try:
        data = f.read(n)
    except (EOFError, OSError, zlib.error) as e:
        raise SourceError(f"{path}: cannot read {what}: {e} (truncated or corrupt file)") from e
    if len(data) != n:
        raise SourceError(f"{path}: truncated file: expected {n} bytes of {what}, found {len(data)}")
    return data


def read_idx_header(path: Path, expected_magic: int) -> tuple[int, ...]:
    """Validate an idx header and return its dimensions (``(n,)`` for labels, ``(n, rows, cols)`` images).

    idx: big-endian int32 magic (0x0000 0x08 ndim: unsigned bytes) then ndim big-endian int32 sizes.
    """
    ndim = expected_magic & 0xFF
    with _open_maybe_gzip(path) as f:
        head = _read_exact(f, 4 + 4 * ndim, path, "idx header")
    magic = struct.unpack(">i", head[:4])[0]
    if magic != expected_magic:
        raise SourceError(f"{path}: corrupt idx header: magic number {magic}, expected {expected_magic} "
                          f"({'images' if ndim == 3 else 'labels'} file, unsigned bytes, {ndim} dims)")
    dims = struct.unpack(f">{ndim}i", head[4:])
    if any(d < 0 for d in dims) or any(d == 0 for d in dims[1:]):
        raise SourceError(f"{path}: corrupt idx header: dimensions {dims}")
    return dims


def _payload_length(path: Path) -> int:
    """Uncompressed byte length (streams gzip in 1 MiB blocks: catches truncation before anything is written)."""
    with _open_maybe_gzip(path) as f:
        if not isinstance(f, gzip.GzipFile):
            return os.fstat(f.fileno()).st_size
        n = 0
        try:
            while block := f.read(1 << 20):
                n += len(block)
        except (EOFError, OSError, zlib.error) as e:
            raise SourceError(f"{path}: truncated or corrupt gzip stream after {n} bytes: {e}") from e
        return n


class MnistSource(Source):
    """MNIST from the official idx files (gzipped or raw), read directly (no torchvision md5 check).

    Looks in ``data_root`` and ``data_root/MNIST/raw`` (torchvision's layout). ``sample_id``: train row i is
    i, test row j is 60000 + j.
    """

    dataset = "mnist"
    splits = ("train", "test")
    _stems = {"train": "train", "test": "t10k"}

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        root = _require_dir(Path(spec.data_root), "MNIST data_root")
        self.classes = [str(i) for i in range(10)]
        self._files: dict[str, tuple[Path, Path]] = {}
        for split, stem in self._stems.items():
            pair = []
            for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
                name = f"{stem}-{kind}"
                pair.append(_first_existing(
                    [d / n for d in (root, root / "MNIST" / "raw") for n in (name + ".gz", name)],
                    f"MNIST {split} {kind.split('-')[0]} file"))
            self._files[split] = tuple(pair)
        n, rows, cols = read_idx_header(self._files["train"][0], 2051)
        self._shape = (rows, cols)
        self.payload = _pixels_payload((rows, cols, 1))
        self._header: dict[str, tuple[int, int]] = {}

    def _load_labels(self, split):
        if split in self._ids:
            return
        img_path, lab_path = self._files[split]
        n_img, rows, cols = read_idx_header(img_path, 2051)
        if (rows, cols) != self._shape:
            raise SourceError(f"{img_path}: image size {rows}x{cols} differs from the train file's "
                              f"{self._shape[0]}x{self._shape[1]}")
        (n_lab,) = read_idx_header(lab_path, 2049)
        if n_lab != n_img:
            raise SourceError(f"{lab_path}: {n_lab} labels but {img_path} holds {n_img} images")
        expected = 16 + n_img * rows * cols
        got = _payload_length(img_path)
        if got < expected:
            raise SourceError(f"{img_path}: truncated file: {got} bytes, expected {expected} "
                              f"(16-byte header + {n_img} images of {rows}x{cols})")
        with _open_maybe_gzip(lab_path) as f:
            f.read(8)
            y = np.frombuffer(_read_exact(f, n_lab, lab_path, f"{n_lab} labels"), dtype=np.uint8)
        offset = 0 if split == "train" else self._n_train()
        self._set_labels(split, np.arange(n_lab, dtype=np.int64) + offset, y, str(lab_path))

    def _n_train(self) -> int:
        return read_idx_header(self._files["train"][1], 2049)[0]

    def _read(self, split, rows):
        path = self._files[split][0]
        per = self._shape[0] * self._shape[1]
        lo, hi = int(rows.min()), int(rows.max()) + 1
        with _open_maybe_gzip(path) as f:
            f.seek(16 + lo * per)  # gzip seeks forward by decompressing; chunks are read in order
            block = _read_exact(f, (hi - lo) * per, path, f"images {lo}..{hi - 1}")
        arr = np.frombuffer(block, dtype=np.uint8).reshape(hi - lo, *self._shape, 1)
        return {"pixels": _pixels_column(arr[rows - lo])}

    def _chunk_rows(self):
        return max(self.spec.chunk_rows, 10000)  # gzip cannot seek back cheaply: few large chunks

    def sources(self):
        return [str(p.resolve()) for pair in self._files.values() for p in pair]

    def checksums(self):
        return {str(p.resolve()): sha256_file(p) for pair in self._files.values() for p in pair}
