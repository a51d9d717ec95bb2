"""Where split and run folders live: a local path, or a URI (``s3://bucket/run``, ``gs://...``, any scheme
``pyarrow.fs`` resolves, others through fsspec), read and written through ``pyarrow.fs``.

:func:`as_path` is the one entry point. A local path comes back as an absolute :class:`pathlib.Path`, so local
runs behave exactly as before; a URI comes back as a :class:`UriPath`, which offers the part of ``pathlib.Path``
the stages use (``/``, ``read_text``, ``is_file``, ``glob``, ``stat`` ...) over the URI's filesystem. ``str()``
of a ``UriPath`` is its URI, query included, which ``pyarrow.parquet`` and ``ray.data`` read as they are.

The atomic contract on an object store: one object is written whole or not at all (a PUT, or a multipart upload
completed at the end), so a file needs no rename; a folder written whole (a split build, a features folder)
has its ``manifest.json`` written last and removed first on replacement, and readers require it. See
:func:`stages._io.atomic_path`.

Query parameters pass through to ``pyarrow.fs`` (``s3://bucket/run?endpoint_override=host:9000&scheme=http``
for MinIO or a test server); credentials come from the usual environment (``AWS_ACCESS_KEY_ID`` ...) on every
node.
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import io
import os
import posixpath
import re
from pathlib import Path, PurePosixPath
from typing import Iterator

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_uri(value) -> bool:
    """Whether ``value`` names a URI other than ``file://`` (those are local paths)."""
    m = _URI.match(str(value)) if value is not None else None
    return bool(m) and m.group(1).lower() != "file"


def as_path(value: str | os.PathLike, absolute: bool = True) -> "Path | UriPath":
    """A local ``Path`` (made absolute unless ``absolute=False``), or a :class:`UriPath` for a URI.

    >>> as_path("s3://bucket/run?region=eu-west-1") / "train"
    UriPath('s3://bucket/run/train?region=eu-west-1')
    >>> as_path("file:///tmp/x"), as_path("/tmp/y").is_absolute()
    (PosixPath('/tmp/x'), True)
    """
    if isinstance(value, UriPath):
        return value
    text = os.fspath(value) if not isinstance(value, str) else value
    if text.lower().startswith("file://"):
        text = text[len("file://"):]
    if is_uri(text):
        return UriPath(text)
    return Path(text).absolute() if absolute else Path(text)


def for_reader(files) -> tuple[list[str], object]:
    """``(paths, filesystem)`` for ``ray.data.read_parquet(paths, filesystem=filesystem)``: Ray Data resolves a
    list of URIs from their text and would keep their query (an endpoint override) in the object keys, so files
    at URIs go as paths inside their filesystem, with it; local files as they are (filesystem None)."""
    files = list(files)
    remote = [f for f in files if isinstance(f, UriPath)]
    if not remote:
        return [str(f) for f in files], None
    if len(remote) != len(files) or len({(f._scheme, f._query, f.fs_path.split("/")[0]) for f in remote}) > 1:
        raise ValueError("files of one read must all be local or all in one bucket")
    return [f.fs_path for f in remote], remote[0].fs


def file_sizes(folder) -> dict[str, int]:
    """``{relative posix path: bytes}`` of every file under ``folder`` (local or URI), from one listing."""
    folder = as_path(folder)
    if isinstance(folder, UriPath):
        return {i.path[len(folder.fs_path) + 1:]: int(i.size) for i in folder._listing(True) if i.type.name == "File"}
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, bucket: str, query: str):
    """One filesystem per (scheme, bucket, options) and process: creating an S3 client costs a round trip."""
    import pyarrow.fs as pafs

    uri = f"{scheme}://{bucket}" + (f"?{query}" if query else "")
    try:
        return pafs.FileSystem.from_uri(uri)[0]
    except ValueError as e:  # pyarrow's ArrowInvalid
        if "nrecognized filesystem" not in str(e):
            raise
    import fsspec  # schemes pyarrow does not know itself (memory://, abfs://, ...)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fsspec.core.url_to_fs(uri)[0]))


@contextlib.contextmanager
def _naming(path: "UriPath"):
    """Errors of the object store (unreachable, access denied, a bad option) name the URI they concern."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as e:
        raise OSError(f"{path}: {e}") from e


class _Stat:
    def __init__(self, info):
        self.st_size = int(info.size or 0)
        self.st_mtime_ns = int(info.mtime_ns or 0)


class UriPath:
    """The subset of ``pathlib.Path`` the stages use, for a URI, over ``pyarrow.fs``.

    It refuses ``os.fspath`` (so ``open(uri_path)`` fails with a clear message instead of making a local file
    named ``s3:``): code that needs a local file goes through :func:`stages._io.atomic_path` or ``read_bytes``.
    """

    def __init__(self, uri: str, _parts: tuple[str, str, str] | None = None):
        if _parts is None:
            base, _, query = uri.partition("?")
            scheme, rest = base.split("://", 1)
            _parts = (scheme.lower(), rest.strip("/"), query)
        self._scheme, self._key, self._query = _parts

    # ------------------------------------------------------------------ naming
    @property
    def fs(self):
        """The ``pyarrow.fs.FileSystem`` holding this path."""
        return _filesystem(self._scheme, self._key.split("/", 1)[0], self._query)

    @property
    def fs_path(self) -> str:
        """The path inside :attr:`fs` (``bucket/key`` for object stores)."""
        return self._key

    def _child(self, key: str) -> "UriPath":
        return UriPath("", (self._scheme, posixpath.normpath(key).strip("/"), self._query))

    def __truediv__(self, other) -> "UriPath":
        return self._child(f"{self._key}/{os.fspath(other) if not isinstance(other, str) else other}")

    def joinpath(self, *others) -> "UriPath":
        out = self
        for o in others:
            out = out / o
        return out

    def __str__(self) -> str:
        return f"{self._scheme}://{self._key}" + (f"?{self._query}" if self._query else "")

    def __repr__(self) -> str:
        return f"UriPath({str(self)!r})"

    def __fspath__(self):
        raise TypeError(f"{self} is a URI: this step needs a local file (a bug: report it, naming the step)")

    def __eq__(self, other) -> bool:
        return isinstance(other, UriPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    name = property(lambda self: PurePosixPath(self._key).name)
    suffix = property(lambda self: PurePosixPath(self._key).suffix)
    stem = property(lambda self: PurePosixPath(self._key).stem)
    parent = property(lambda self: self._child(posixpath.dirname(self._key)))

    def with_name(self, name: str) -> "UriPath":
        return self.parent / name

    def with_suffix(self, suffix: str) -> "UriPath":
        return self._child(str(PurePosixPath(self._key).with_suffix(suffix)))

    def relative_to(self, other) -> PurePosixPath:
        other = as_path(other)
        if not isinstance(other, UriPath) or (other._scheme, other._query) != (self._scheme, self._query):
            raise ValueError(f"{self} is not under {other}")
        return PurePosixPath(self._key).relative_to(other._key)

    def is_absolute(self) -> bool:
        return True

    def resolve(self) -> "UriPath":
        return self

    absolute = resolve

    def as_posix(self) -> str:
        return str(self)

    # ------------------------------------------------------------------ queries
    def _info(self):
        with _naming(self):
            return self.fs.get_file_info(self._key)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def stat(self) -> _Stat:
        info = self._info()
        if info.type.name == "NotFound":
            raise FileNotFoundError(2, f"not found: {self}", str(self))
        return _Stat(info)

    def _listing(self, recursive: bool) -> list:
        import pyarrow.fs as pafs

        with _naming(self):
            return self.fs.get_file_info(pafs.FileSelector(self._key, recursive=recursive, allow_not_found=True))

    def iterdir(self) -> Iterator["UriPath"]:
        return iter(sorted(self._child(i.path) for i in self._listing(False)))

    def glob(self, pattern: str) -> Iterator["UriPath"]:
        """Entries whose path below this one matches ``pattern`` segment by segment (no ``**``)."""
        depth = len(pattern.split("/"))
        found = []
        for info in self._listing(depth > 1):
            rel = info.path[len(self._key) + 1:]
            if rel.count("/") + 1 == depth and fnmatch.fnmatchcase(rel, pattern):
                found.append(self._child(info.path))
        return iter(sorted(found))

    def rglob(self, pattern: str) -> Iterator["UriPath"]:
        return iter(sorted(self._child(i.path) for i in self._listing(True)
                           if i.type.name == "File" and fnmatch.fnmatchcase(PurePosixPath(i.path).name, pattern)))

    # ------------------------------------------------------------------ reads and writes
    def open(self, mode: str = "rb", encoding: str | None = None):
        if mode in ("r", "rb"):
            f = self.fs.open_input_file(self._key)
        elif mode in ("w", "wb"):
            f = self.fs.open_output_stream(self._key)  # one object, visible whole when closed
        else:
            raise ValueError(f"mode={mode!r}; accepted: r, rb, w, wb")
        return io.TextIOWrapper(f, encoding=encoding or "utf-8") if "b" not in mode else f

    def read_bytes(self) -> bytes:
        try:
            with _naming(self), self.fs.open_input_file(self._key) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(2, f"not found: {self}", str(self)) from None

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        with _naming(self), self.fs.open_output_stream(self._key) as f:
            f.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def touch(self, exist_ok: bool = True) -> None:
        if not self.exists():
            self.write_bytes(b"")
        elif not exist_ok:
            raise FileExistsError(17, f"exists: {self}", str(self))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        if self.exists():
            if not exist_ok:
                raise FileExistsError(17, f"exists: {self}", str(self))
            return
        self.fs.create_dir(self._key, recursive=parents)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self._key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        """Remove this folder and everything under it (the stages call it only on folders they wrote)."""
        if self.exists():
            self.fs.delete_dir(self._key)
