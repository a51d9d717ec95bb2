"""File sizes of a folder tree's files, stat'ed in parallel and cached per folder (:func:`file_sizes`).

A split build identifies an image-folder source by every file's relative path and size, and checks that each
file an ImageNet-LT list names exists. On ImageNet that is 1.28M ``stat`` calls, once more on every rerun of a
pipeline. Here each folder is listed once (``os.scandir``, threads: the calls wait on the filesystem, not the
CPU) and its sizes are cached under the folder's modification time, which changes whenever a file is added,
removed or renamed in it: a rerun stats the folders only (1,000 for ImageNet). An image rewritten in place
with another size keeps the folder's time and goes unnoticed until the cache is removed; the written shards'
own checksums still describe exactly what was built.

The cache lives in ``$CACT_CACHE_DIR/listings`` (default ``~/.cache/cact/listings``), one JSON file per tree.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

THREADS = 16
_stat = os.stat  # one indirection: tests count the calls


def cache_dir() -> Path:
    """Where listings are cached: ``$CACT_CACHE_DIR/listings``, default ``~/.cache/cact/listings``."""
    base = os.environ.get("CACT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cact")
    return Path(base) / "listings"


def _cache_path(root: Path) -> Path:
    return cache_dir() / f"{hashlib.sha256(str(root).encode()).hexdigest()[:20]}.json"


def _folder_mtime(folder: Path) -> int | None:
    try:
        return _stat(folder).st_mtime_ns
    except OSError:
        return None


def _list_folder(folder: Path) -> dict[str, int]:
    """{name: size} of the regular files in ``folder`` (empty when it is missing)."""
    out = {}
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.is_file():
                    out[e.name] = _stat(e.path).st_size
    except (FileNotFoundError, NotADirectoryError):
        pass
    return out


def file_sizes(root: str | os.PathLike, rel_paths: Sequence[str]) -> np.ndarray:
    """Size in bytes of every ``root/rel`` (-1 where the file is missing), in ``rel_paths`` order."""
    root = Path(root).resolve()
    groups: dict[str, list[tuple[int, str]]] = {}
    for i, rel in enumerate(rel_paths):
        folder, _, name = rel.rpartition("/")
        groups.setdefault(folder, []).append((i, name))
    path = _cache_path(root)
    try:
        cached = json.loads(path.read_text())["folders"] if path.is_file() else {}
    except (OSError, ValueError, KeyError, TypeError):
        cached = {}  # a damaged cache is only a slower listing
    folders = list(groups)
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        mtimes = list(pool.map(lambda f: _folder_mtime(root / f), folders))
        stale = [f for f, m in zip(folders, mtimes)
                 if m is None or (cached.get(f) or {}).get("mtime_ns") != m]
        listed = dict(zip(stale, pool.map(lambda f: _list_folder(root / f), stale)))
    sizes = np.full(len(rel_paths), -1, dtype=np.int64)
    changed = False
    for f, m in zip(folders, mtimes):
        if f in listed:
            entry = {"mtime_ns": m, "sizes": listed[f]}
            if m is not None:
                cached[f], changed = entry, True
        else:
            entry = cached[f]
        for i, name in groups[f]:
            sizes[i] = entry["sizes"].get(name, -1)
    if changed:
        try:
            from stages._io import write_json

            write_json({"root": str(root), "folders": cached}, path)
        except OSError:  # a read-only home: the listing still worked, only the next one is not faster
            pass
    return sizes
