"""A built split folder, read: :func:`load` checks its ``manifest.json`` and files and returns a
:class:`Splits` handle (paths, classes, counts, payload, tables). Every stage reads its data through it;
:mod:`stages.longtail` builds the folders.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from stages._io import read_parquet, sha256_file
from stages.storage import UriPath, as_path, file_sizes

SPLITS = ("train", "val", "pool")


class ManifestError(ValueError):
    """A split folder's manifest is missing, unreadable or inconsistent; the message names the file."""


@dataclass(frozen=True, eq=False)
class Splits:
    """Handle on a built split folder.

    >>> s = load(path)                                   # doctest: +SKIP
    >>> s.read_table("train").num_rows == sum(s.train_counts)   # doctest: +SKIP
    True
    """

    root: Path | UriPath
    manifest: dict = field(repr=False)

    def path(self, split: str) -> Path:
        """Where ``split`` lives: its folder of shards (or, in single-file folders such as features, its
        Parquet file). Both are accepted by ``pyarrow.parquet.read_table`` and ``ray.data.read_parquet``."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; accepted: {', '.join(SPLITS)}")
        return self.root / self.manifest.get("files", {}).get(split, f"{split}.parquet")

    def files(self, split: str) -> list[Path]:
        """The Parquet files of ``split`` in row order, as the manifest lists them (no folder listing)."""
        listed = (self.manifest.get("shards") or {}).get(split)
        return [self.root / f for f in listed] if listed is not None else [self.path(split)]

    def digest(self, split: str) -> str:
        """sha256 identifying ``split``'s bytes: the build's own checksums when recorded, else the files'."""
        recorded = (self.manifest.get("checksums") or {}).get("splits") or {}
        parts = []
        for f in self.files(split):
            name = f.relative_to(self.root).as_posix()
            parts.append(f"{name}:{recorded.get(name) or sha256_file(f)}")
        if len(parts) == 1:
            return parts[0].split(":", 1)[1]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def train_counts(self) -> list[int]:
        return list(self.manifest["counts"]["train"])

    @property
    def payload(self) -> dict:
        return dict(self.manifest["payload"])

    @property
    def vocab(self) -> list[str] | None:
        """Token list of a tokens payload (id of ``vocab[i]`` is ``i + 2``), else None."""
        name = self.manifest["payload"].get("vocab")
        if not name:
            return None
        return list(json.loads((self.root / name).read_text())["tokens"])

    def read_table(self, split: str, columns: Sequence[str] | None = None) -> pa.Table:
        """The whole split as an Arrow table (rows in official order)."""
        cols = list(columns) if columns else None
        tables = [read_parquet(f, columns=cols) for f in self.files(split)]
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


_REQUIRED = ("dataset", "classes", "num_classes", "profile", "counts", "payload", "checksums", "files")


def load(root: str | Path | UriPath) -> Splits:
    """Open a built split folder (a path or a URI); raise naming the file when the manifest or a split file is
    missing/invalid."""
    root = as_path(root, absolute=False)
    mpath = root / "manifest.json"
    if not root.is_dir():
        raise FileNotFoundError(2, f"split folder not found: {root}", str(root))
    if not mpath.is_file():
        raise FileNotFoundError(2, f"manifest not found: {mpath} (not a split build folder)", str(mpath))
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{mpath}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"{mpath}: expected a JSON object")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ManifestError(f"{mpath}: missing key(s) {', '.join(missing)}")
    counts = manifest["counts"]
    for s in SPLITS:
        if s not in counts or len(counts[s]) != manifest["num_classes"]:
            raise ManifestError(f"{mpath}: counts[{s!r}] missing or not {manifest['num_classes']} classes long")
    splits = Splits(root=root, manifest=manifest)
    # on an object store, one listing instead of a request per shard
    listed = file_sizes(root) if isinstance(root, UriPath) else None
    for s in SPLITS:
        for f in splits.files(s):
            if not (f.relative_to(root).as_posix() in listed if listed is not None else f.is_file()):
                raise FileNotFoundError(2, f"split file not found: {f} (listed in {mpath})", str(f))
    name = manifest["payload"].get("vocab")
    if name and not (root / name).is_file():
        raise FileNotFoundError(2, f"vocabulary not found: {root / name} (listed in {mpath})", str(root / name))
    return splits
