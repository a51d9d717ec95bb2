"""Inspect encoded images (JPEG, PNG, ...): shape, mode, format, or the error that opening them raised."""
from __future__ import annotations

import concurrent.futures
import io
import os
from dataclasses import dataclass
from typing import Sequence


@dataclass
class ImageInfo:
    """What one encoded image holds: ``shape`` (H, W, C after the mode rule), ``mode``, ``format``, or ``error``."""

    shape: tuple[int, int, int] | None = None
    mode: str | None = None
    format: str | None = None
    error: str | None = None


def inspect_image(data: bytes, full_decode: bool = True) -> ImageInfo:
    """Open (and by default fully decode) one encoded image; never raises.

    Grayscale modes (``L``, ``1``, ``I;16``, ``I``, ``F``) count as C=1; everything else decodes to RGB, C=3.

    >>> inspect_image(b"not an image").error is not None
    True
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
            if full_decode:
                im.load()  # raises on truncated/corrupt data (PIL refuses truncated images by default)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        return ImageInfo(error=f"{type(e).__name__}: {e}")
    c = 1 if mode in ("L", "1", "I;16", "I", "F", "LA") else 3
    return ImageInfo(shape=(h, w, c), mode=mode, format=(fmt or "").lower())


def inspect_images(values: Sequence[bytes | None], full_decode: bool = True) -> list[ImageInfo]:
    """:func:`inspect_image` over many images on a small thread pool (PIL releases the GIL to decode)."""
    def run(part: Sequence[bytes | None]) -> list[ImageInfo]:
        return [inspect_image(v, full_decode) if v is not None else ImageInfo(error="null value") for v in part]

    workers = min(8, os.cpu_count() or 1)
    # Threads pay off only when decoding (C, GIL released) outweighs PIL's per-image Python overhead:
    # measured here, 8x8 JPEGs ran 30% slower on two threads than serially.
    big = sum(len(v) for v in values if v is not None) >= 16384 * len(values)
    if len(values) < 256 or workers == 1 or not big:
        return run(values)
    step = -(-len(values) // (4 * workers))  # a few slices per worker: one future per slice, not per image
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        parts = pool.map(run, [values[i: i + step] for i in range(0, len(values), step)])
        return [info for part in parts for info in part]
