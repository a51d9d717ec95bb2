"""Ingest stage: a data source's rows as a lazy Ray Dataset (:func:`read_source`).

The formats, ``SourceSpec``/``Source`` and the source registry live in :mod:`stages.sources`; their names are
re-exported here, so ``stages.ingest.open_source`` and the rest keep working.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from stages.sources import (IMAGE_EXTENSIONS, CifarSource, DigitsSource, ImageFolderSource, ImageInfo,  # noqa: F401
                            MnistSource, NewsgroupsSource, ParquetSource, Source, SourceError, SourceSpec,
                            inspect_image, inspect_images, open_source, read_idx_header, register_source,
                            source_names, strip_newsgroup_header, unregister_source)


def __getattr__(name: str):
    if name == "DATASETS":  # the registered source names, as registered now
        return source_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_source(spec: SourceSpec | Source, split: str = "train") -> "ray.data.Dataset":  # noqa: F821
    """The same rows as a lazy Ray Dataset: one read task per chunk, rows in official order.

    >>> ds = read_source(SourceSpec(), "train")   # doctest: +SKIP
    >>> ds.count()                                 # doctest: +SKIP
    901
    """
    import ray

    src = spec if isinstance(spec, Source) else open_source(spec)
    chunks = src.chunks(split)

    def read(batch: dict[str, np.ndarray]) -> pa.Table:
        return pa.concat_tables([src.read_rows(split, int(s), int(e))
                                 for s, e in zip(batch["start"], batch["end"])])

    items = [{"start": s, "end": e} for s, e in chunks]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        read, batch_size=1, batch_format="numpy")
