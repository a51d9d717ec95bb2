"""Data sources: a registry of readers of the real dataset formats into rows ``sample_id, label, <payload>``.

Every built-in source (one module per format here) reads its *official* files directly and yields Arrow
tables in the dataset's official order:

==============  ==========================================================  =================================
dataset         files under ``data_root``                                   payload column(s)
==============  ==========================================================  =================================
``digits``      none: scikit-learn's bundled ``load_digits``                ``pixels`` (8x8x1 uint8)
``mnist``       idx files, gzipped or raw (``train-images-idx3-ubyte[.gz]``) ``pixels`` (28x28x1 uint8)
``cifar10``     ``cifar-10-batches-py/`` python pickle batches              ``pixels`` (32x32x3 uint8, HWC)
``cifar100``    ``cifar-100-python/{train,test,meta}`` (fine or coarse)     ``pixels`` (32x32x3 uint8, HWC)
``imagefolder`` ``<split>/<wnid>/*.JPEG`` + optional ImageNet-LT list files  ``image`` (encoded bytes), ``path``
``parquet``     ``<split>.parquet`` with image bytes or raw pixels + label  ``image`` or ``pixels``
``newsgroups``  ``20news-bydate.tar.gz`` or its unpacked folder             ``text`` (raw), ``path``
==============  ==========================================================  =================================

Images stay encoded (JPEG/PNG bytes) or raw uint8 bytes per row with the shape in the payload description;
decoding happens in the readers (:mod:`stages.payload`). ``sample_id`` is unique across the whole source
and stable: the row's index in official order, test rows offset by the number of training rows (digits: the
index in ``load_digits`` order; ImageNet-LT lists: the line index, lists concatenated train, val, test).

Two ways to read a source: ``Source.iter_batches`` streams Arrow tables in plain Python (what the long-tail
build uses, optionally fetching only chosen ``sample_id`` s), and :func:`stages.ingest.read_source` gives the
same rows as a lazy Ray Dataset (one read task per chunk). ``Source.labels(split)`` is the cheap labels-only
table (``sample_id``, ``label``) on which selections are made.

Every problem with the input raises :class:`SourceError` (a ``ValueError``) or ``FileNotFoundError`` whose
message names the file and field at fault.

A new format: subclass :class:`Source` in a module of this package, implement ``_load_labels``, ``_read``,
``sources`` and ``checksums``, and call :func:`register_source` with its name; ``SourceSpec``, ``open_source``
and the long-tail build then accept that name.
"""
from __future__ import annotations

from typing import Any

from stages.sources.base import Source, SourceError, SourceSpec
from stages.sources.cifar import CifarSource
from stages.sources.digits import DigitsSource
from stages.sources.imagefolder import IMAGE_EXTENSIONS, ImageFolderSource
from stages.sources.images import ImageInfo, inspect_image, inspect_images
from stages.sources.mnist import MnistSource, read_idx_header
from stages.sources.newsgroups import NewsgroupsSource, strip_newsgroup_header
from stages.sources.parquet import ParquetSource

__all__ = ["DATASETS", "IMAGE_EXTENSIONS", "CifarSource", "DigitsSource", "ImageFolderSource", "ImageInfo",
           "MnistSource", "NewsgroupsSource", "ParquetSource", "Source", "SourceError", "SourceSpec",
           "inspect_image", "inspect_images", "open_source", "read_idx_header", "register_source",
           "source_names", "strip_newsgroup_header", "unregister_source"]

_SOURCES: dict[str, type[Source]] = {}


def register_source(name: str, cls: type[Source]) -> None:
    """Make ``cls`` (a :class:`Source` subclass, called with the ``SourceSpec``) the reader of ``dataset=name``.

    >>> register_source("digits", DigitsSource)
    Traceback (most recent call last):
    ...
    ValueError: a data source named 'digits' is already registered (DigitsSource); unregister_source('digits') first
    """
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise TypeError(f"register_source({name!r}, {cls!r}): expected a subclass of stages.sources.Source")
    if name in _SOURCES:
        raise ValueError(f"a data source named {name!r} is already registered ({_SOURCES[name].__name__}); "
                         f"unregister_source({name!r}) first")
    _SOURCES[name] = cls


def unregister_source(name: str) -> None:
    """Remove the source registered as ``name``."""
    if name not in _SOURCES:
        raise ValueError(f"no data source named {name!r} is registered; registered: {', '.join(_SOURCES)}")
    del _SOURCES[name]


def source_names() -> tuple[str, ...]:
    """The registered source names, in registration order.

    >>> source_names()[:3]
    ('digits', 'mnist', 'cifar10')
    """
    return tuple(_SOURCES)


def __getattr__(name: str):
    if name == "DATASETS":  # always the registry's current names, never a copy taken at import
        return source_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_source(spec: SourceSpec | str | None = None, **kwargs: Any) -> Source:
    """Open and validate a dataset source.

    >>> src = open_source("digits")
    >>> src.classes[:3], src.payload["shape"]
    (['0', '1', '2'], [8, 8, 1])
    """
    if spec is None or isinstance(spec, str):
        spec = SourceSpec(dataset=spec or "digits", **kwargs)
    elif kwargs:
        raise TypeError("pass either a SourceSpec or keyword fields, not both")
    return _SOURCES[spec.dataset](spec)


register_source("digits", DigitsSource)
register_source("mnist", MnistSource)
register_source("cifar10", CifarSource)
register_source("cifar100", CifarSource)
register_source("imagefolder", ImageFolderSource)
register_source("parquet", ParquetSource)
register_source("newsgroups", NewsgroupsSource)
