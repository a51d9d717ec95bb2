"""``root/<split>/<class>/<image>`` trees (ImageNet, Imagenette), optionally with ImageNet-LT list files
(``relative/path label`` per line) that select and label each split's rows exactly.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from stages._io import sha256_file
from stages.sources import listing
from stages.sources.base import Source, SourceError, SourceSpec, _missing, _require_dir

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def _tree_digest(rel_paths: Sequence[str], sizes: Sequence[int]) -> str:
    """sha256 over ``relative path, size`` of every file (content identity lives in the written splits)."""
    h = hashlib.sha256()
    for rel, size in zip(rel_paths, sizes):
        h.update(f"{rel}\t{size}\n".encode())
    return h.hexdigest()


class ImageFolderSource(Source):
    """``root/<split>/<class>/<image>`` trees; classes = sorted subfolders of the train split, files sorted.

    ImageNet-LT lists (``relative/path label`` per line, relative to ``data_root``) replace the folder scan
    of their split and define its rows and labels exactly; the list's split name is ``train``, ``val`` or
    ``test``. Without lists the splits are ``train`` and ``test`` (read from ``test_split``, default ``val``:
    ImageNet and Imagenette publish their held-out images as ``val``).
    """

    dataset = "imagefolder"

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.root = _require_dir(Path(spec.data_root), "imagefolder data_root")
        self._folders = {"train": spec.train_split or "train", "test": spec.test_split or "val"}
        self._lists = {s: Path(p) for s, p in (("train", spec.train_list), ("val", spec.val_list),
                                                ("test", spec.test_list)) if p is not None}
        self.splits = ("train", "val", "test") if "val" in self._lists else ("train", "test")
        train_dir = self.root / self._folders["train"]
        if train_dir.is_dir():
            self.classes = sorted(d.name for d in os.scandir(train_dir) if d.is_dir() and not d.name.startswith("."))
        elif "train" in self._lists:
            self.classes = self._classes_from_list(self._lists["train"])
        else:
            raise _missing(train_dir, "imagefolder train split folder")
        if not self.classes:
            raise SourceError(f"{train_dir}: no class subfolders")
        self.payload = {"kind": "image", "column": "image", "shape": None}
        self._paths: dict[str, list[str]] = {}
        self._sizes: dict[str, np.ndarray] = {}  # file sizes per split (listing.file_sizes: parallel, cached)

    def _classes_from_list(self, path: Path) -> list[str]:
        # Without a train folder to list, class k is named after the folder of its images in the list.
        names: dict[int, str] = {}
        for rel, lab, _ in self._parse_list(path):
            names.setdefault(lab, Path(rel).parent.name)
        return [names.get(k, str(k)) for k in range(max(names) + 1)] if names else []

    @staticmethod
    def _parse_list(path: Path) -> Iterator[tuple[str, int, int]]:
        if not path.is_file():
            raise _missing(path, "ImageNet-LT list file")
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                    raise SourceError(f"{path}:{i}: expected 'relative/path label', got {line.strip()!r}")
                yield parts[0], int(parts[1]), i

    def _split_offset(self, split: str) -> int:
        off = 0
        for s in self.splits:
            if s == split:
                return off
            self._load_labels(s)
            off += len(self._ids[s])
        raise KeyError(split)

    def _load_labels(self, split):
        if split in self._ids:
            return
        if split in self._lists:
            lp = self._lists[split]
            rels, labs, lines = [], [], []
            for rel, lab, line in self._parse_list(lp):
                rels.append(rel), labs.append(lab), lines.append(line)
            labs_arr = np.asarray(labs, dtype=np.int64)
            bad = (labs_arr < 0) | (labs_arr >= len(self.classes))
            if np.any(bad):
                i = int(np.argmax(bad))
                raise SourceError(f"{lp}:{lines[i]}: label {labs[i]} is outside the class list "
                                  f"(accepted: 0..{len(self.classes) - 1}, {len(self.classes)} classes)")
            self._sizes[split] = listing.file_sizes(self.root, rels)
            missing = [rels[i] for i in np.flatnonzero(self._sizes[split] < 0)]
            if missing:
                raise FileNotFoundError(
                    2, f"{lp}: {len(missing)} listed file(s) missing under {self.root}, e.g. "
                       f"{', '.join(missing[:5])}", str(self.root / missing[0]))
            where = str(lp)
        else:
            folder = _require_dir(self.root / self._folders[split], f"imagefolder {split} split folder")
            known = {c: k for k, c in enumerate(self.classes)}
            rels, labs = [], []
            for d in sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")):
                if d not in known:
                    raise SourceError(f"{folder / d}: class folder {d!r} is outside the class list "
                                      f"(the subfolders of {self.root / self._folders['train']})")
                files = sorted(e.name for e in os.scandir(folder / d)
                               if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
                rels += [f"{self._folders[split]}/{d}/{f}" for f in files]
                labs += [known[d]] * len(files)
            where = str(folder)
        self._paths[split] = rels
        offset = self._split_offset(split)
        self._set_labels(split, np.arange(len(rels), dtype=np.int64) + offset, labs, where)

    def _chunk_rows(self):
        return min(self.spec.chunk_rows, 512)  # encoded images are large: keep a read task's batch small

    def _read(self, split, rows):
        paths = [self._paths[split][int(r)] for r in rows]

        def load(rel: str) -> bytes:
            try:
                return (self.root / rel).read_bytes()
            except OSError as e:
                raise SourceError(f"{self.root / rel}: unreadable image file ({e})") from e

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            data = list(pool.map(load, paths))
        return {"image": pa.array(data, type=pa.binary()), "path": pa.array(paths, type=pa.string())}

    def __getstate__(self):
        state = super().__getstate__()
        state["_sizes"] = {}  # only the driver's checksums need them: shard tasks do not carry them
        return state

    def describe(self, split, sample_id):
        self._load_labels(split)
        row = int(np.searchsorted(self._ids[split], sample_id))
        return str(self.root / self._paths[split][row])

    def sources(self):
        out = [str(self.root.resolve())]
        return out + [str(p.resolve()) for p in self._lists.values()]

    def checksums(self):
        out = {str(p.resolve()): sha256_file(p) for p in self._lists.values()}
        for split in self.splits:
            self._load_labels(split)
            key = f"{self.root.resolve()} [{split}: listing of relative path + size]"
            if split not in self._sizes:
                self._sizes[split] = listing.file_sizes(self.root, self._paths[split])
            out[key] = _tree_digest(self._paths[split], self._sizes[split])
        return out
