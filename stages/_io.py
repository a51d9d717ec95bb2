"""Atomic file output shared by every stage: write under a temporary name, then rename (on an object store:
upload one whole object; a folder's ``manifest.json`` last).

A crash leaves either the old file or the new one, never half a file; a rerun replaces, never appends. Also the
ownership of run folders (:func:`claim_run_folder`): a pipeline writes only into a folder it created and marked.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import UriPath, as_path, is_uri


def refuse_uri(value, field: str) -> None:
    """Raise ``ValueError`` naming ``field`` when ``value`` is a URI (``s3://...``) where only a local path is
    read: a dataset's official files and list files (split and run folders may be URIs, see
    :mod:`stages.storage`). ``pathlib`` would otherwise turn ``s3://bucket/x`` into a local folder named ``s3:``.

    >>> refuse_uri("/mnt/shared/data", "data_root")
    >>> refuse_uri("s3://bucket/data", "data_root")
    Traceback (most recent call last):
    ...
    ValueError: data_root='s3://bucket/data' is a URI: a dataset's files are read from a local or mounted path (on a cluster, a path every node mounts, e.g. /mnt/shared/...); URIs are accepted for split and run folders
    """
    if value is not None and is_uri(value):
        raise ValueError(f"{field}={str(value)!r} is a URI: a dataset's files are read from a local or mounted "
                         "path (on a cluster, a path every node mounts, e.g. /mnt/shared/...); URIs are accepted "
                         "for split and run folders")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike | UriPath) -> Iterator[Path]:
    """Yield a temporary local path; on success move it onto ``path`` (file or folder) in one step.

    Locally that is a rename of a sibling. On an object store (``path`` a URI) the file is uploaded as one object
    (visible whole or not at all); a folder's files are uploaded after its old ``manifest.json`` and files are
    removed, and its new ``manifest.json`` goes last: readers of a folder require that commit marker.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "x.txt") as tmp:
    ...     _ = tmp.write_text("hi")
    >>> (d / "x.txt").read_text()
    'hi'
    """
    if isinstance(path, UriPath) or is_uri(path):
        with tempfile.TemporaryDirectory(prefix="cact-upload-") as staging:
            tmp = Path(staging) / as_path(path).name
            yield tmp
            _upload(tmp, as_path(path))
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)) / path.name
    try:
        yield tmp
        if tmp.is_dir():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        elif tmp.exists():
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


COMMIT_MARKER = "manifest.json"  # written last into a folder on an object store, removed first on replacement


def _upload(local: Path, dest: UriPath) -> None:
    if local.is_file():
        with open(local, "rb") as src, dest.open("wb") as out:
            shutil.copyfileobj(src, out, 8 << 20)
        return
    if not local.is_dir():
        return  # nothing was written: like the local branch, leave the destination as it is
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == COMMIT_MARKER, p))
    (dest / COMMIT_MARKER).unlink(missing_ok=True)
    dest.rmtree()
    for f in files:
        _upload(f, dest / f.relative_to(local).as_posix())


def move_file(local: Path, dest: Path | UriPath) -> None:
    """Move a finished local file onto ``dest``: a rename (same filesystem), or one upload to a URI."""
    if isinstance(dest, UriPath):
        _upload(local, dest)
        local.unlink()
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, dest)


def move_folder(src: Path | UriPath, dest: Path | UriPath) -> None:
    """Commit a finished folder onto an absent or empty ``dest``: one rename locally; on an object store a
    server-side copy of each object, ``manifest.json`` last, then ``src`` is removed."""
    if not isinstance(src, UriPath):
        os.replace(src, dest)
        return
    files = sorted(src.rglob("*"), key=lambda p: p.name == COMMIT_MARKER)
    for f in files:
        src.fs.copy_file(f.fs_path, (dest / f.relative_to(src).as_posix()).fs_path)
    src.rmtree()


def remove_tree(folder: Path | UriPath) -> None:
    """Remove a folder this project wrote (a build's partial folders), wherever it lives."""
    if isinstance(folder, UriPath):
        folder.rmtree()
    else:
        shutil.rmtree(folder, ignore_errors=True)


def write_parquet(table: pa.Table, path: str | os.PathLike) -> Path | UriPath:
    """Write ``table`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return as_path(path, absolute=False)


def write_json(obj: Any, path: str | os.PathLike) -> Path | UriPath:
    """Write ``obj`` as indented, key-sorted JSON atomically (byte-identical for equal objects)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return as_path(path, absolute=False)


def write_text(text: str, path: str | os.PathLike) -> Path | UriPath:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return as_path(path, absolute=False)


def read_parquet(path: str | os.PathLike, columns=None) -> pa.Table:
    """A Parquet file (or folder of them) as an Arrow table, local or at a URI."""
    path = as_path(path, absolute=False)
    if isinstance(path, UriPath):
        return pq.read_table(path.fs_path, columns=columns, filesystem=path.fs)
    return pq.read_table(path, columns=columns)


def read_frame(path: str | os.PathLike):
    """A Parquet file as a polars DataFrame, local or at a URI (polars' own object-store client would not read
    the pyarrow URI options, such as an endpoint override)."""
    import polars as pl

    path = as_path(path, absolute=False)
    return pl.from_arrow(read_parquet(path)) if isinstance(path, UriPath) else pl.read_parquet(path)


def load_torch(path: str | os.PathLike, **kwargs):
    """``torch.load(path, weights_only=True, **kwargs)``, local or at a URI."""
    import io

    import torch

    path = as_path(path, absolute=False)
    source = io.BytesIO(path.read_bytes()) if isinstance(path, UriPath) else path
    return torch.load(source, weights_only=True, **kwargs)


def parquet_bytes(path: str | os.PathLike) -> int:
    """Size on disk of a Parquet split: one file, or a folder of ``*.parquet`` files."""
    path = as_path(path, absolute=False)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*.parquet"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (bounded memory)."""
    h = hashlib.sha256()
    path = as_path(path, absolute=False)
    with (path.open("rb") if isinstance(path, UriPath) else open(path, "rb")) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Run folders: their layout, and the rule that the project writes only into folders it created (or a run folder
# of an older version).


class RunFolder:
    """The layout of a run folder: the one place that names where each stage reads and writes.

    >>> r = RunFolder("runs/x")
    >>> r.model("cact").as_posix(), r.logits("ce", "pool").as_posix(), r.eval_file("summary.parquet").as_posix()
    ('runs/x/train/cact/model.pt', 'runs/x/logits/ce/pool.parquet', 'runs/x/eval/summary.parquet')
    """

    def __init__(self, root: str | os.PathLike):
        self.root = as_path(root, absolute=False)

    splits = property(lambda self: self.root / "splits", doc="the long-tailed splits (stages.longtail)")
    train = property(lambda self: self.root / "train", doc="one folder per trained method")
    eval = property(lambda self: self.root / "eval", doc="summary, per-class and per-split tables")
    plots = property(lambda self: self.root / "plots", doc="the report's figures")
    report = property(lambda self: self.root / "report.md")
    report_html = property(lambda self: self.root / "report.html")
    config = property(lambda self: self.root / "config.json", doc="the pipeline's flags and configs")
    ray_storage = property(lambda self: self.root / "ray_storage", doc="Ray Train checkpoints (default)")
    features = property(lambda self: self.root / "features", doc="frozen-features mode: the features' splits")
    backbone = property(lambda self: self.root / "backbone", doc="frozen-features mode: the CE backbone's run")
    all_logits = property(lambda self: self.root / "logits", doc="one folder per method: its logits per split")

    def method(self, method: str) -> Path:
        return self.train / method

    def model(self, method: str) -> Path:
        return self.method(method) / "model.pt"

    def logits(self, method: str, split: str | None = None) -> Path:
        folder = self.all_logits / method
        return folder if split is None else folder / f"{split}.parquet"

    def eval_file(self, name: str) -> Path:
        return self.eval / name

    def sweep(self, method: str) -> Path:
        return self.root / "sweep" / method


RUN_MARKER = ".cact-run.json"  # written first into every run folder the project creates
PROJECT = "cact"


def _is_legacy_run(folder: Path) -> bool:
    """A run folder written before the marker existed: a pipeline's config.json and a train/ or splits/ folder."""
    try:
        config = json.loads(RunFolder(folder).config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "pipeline" in config and \
        (RunFolder(folder).train.is_dir() or RunFolder(folder).splits.is_dir())


def is_run_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a run folder of this project: it holds the marker :data:`RUN_MARKER` naming it."""
    try:
        marker = json.loads((as_path(folder, absolute=False) / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("project") == PROJECT


def claim_run_folder(folder: str | os.PathLike) -> Path | UriPath:
    """Make ``folder`` a run folder of this project before anything else is written into it, and return it.

    A new or empty folder is created and marked (``<folder>/.cact-run.json``: the project and the creation time,
    written first); a folder holding the marker is the project's and is reused as it is; a run folder written by
    an older version (no marker, but a pipeline's ``config.json`` and a ``train/`` or ``splits/`` folder) is
    recognised and marked. Any other non-empty folder, or a file at that path, is refused with
    ``FileExistsError``: nothing in it is written, replaced or deleted.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> claim_run_folder(d / "run") == d / "run", is_run_folder(d / "run")
    (True, True)
    """
    folder = as_path(folder, absolute=False)
    try:
        return _claim(folder)
    except FileExistsError:
        raise
    except (OSError, ValueError) as e:  # unreachable, a missing bucket, no write permission, a bad URI option
        raise OSError(f"run folder {folder}: cannot be read or written ({e}); check the path or URI, the "
                      "credentials and the write permission") from e


def _claim(folder: Path | UriPath) -> Path | UriPath:
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder: a run folder cannot go there; choose "
                              "another path")
    if is_run_folder(folder):
        return folder
    if (folder / RUN_MARKER).exists():
        raise FileExistsError(f"{folder / RUN_MARKER} exists but is not a readable CaCT run marker (JSON with "
                              f'"project": "{PROJECT}"): refusing to write into {folder}; choose another folder, '
                              "or delete the damaged marker if the folder is a CaCT run folder")
    adopted = False
    if folder.is_dir() and any(folder.iterdir()):
        if not _is_legacy_run(folder):
            raise FileExistsError(
                f"{folder} is not empty and was not created by CaCT (no {RUN_MARKER} marker, and no run "
                "config.json with a train/ or splits/ folder): refusing to write into it, so that none of its "
                "files is overwritten or deleted; choose a new or empty folder (or move its contents away)")
        adopted = True
    folder.mkdir(parents=True, exist_ok=True)
    write_json({"project": PROJECT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "adopted_existing_run": adopted}, folder / RUN_MARKER)
    return folder
