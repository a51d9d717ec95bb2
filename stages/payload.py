"""Payload codecs: encoded rows of a split -> torch tensors, and the text tokenizer/vocabulary.

The split files (:mod:`stages.longtail`) keep payloads compact: encoded JPEG/PNG bytes (``image``), raw uint8
row-major HxWxC bytes (``pixels``), token ids (``tokens``) or frozen features (``features``, float32 vectors). Readers decode one batch at a time with
:func:`decode`, which accepts a ``pyarrow.Table``/``RecordBatch`` or the dict of numpy arrays that Ray Data's
``map_batches``/``iter_batches(batch_format="numpy")`` hand out::

    paths, filesystem = for_reader(splits.files("train"))   # stages.storage: local files or URIs
    ds = ray.data.read_parquet(paths, filesystem=filesystem)
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        x = decode(batch, splits.payload, image_size=64)      # float32 [B, C, 64, 64] in [0, 1]
        y = torch.as_tensor(batch["label"])

Tokenizer: lowercase, tokens = runs of two or more word characters (scikit-learn's default
``token_pattern``). Vocabulary: fit on the training split only, most frequent first (ties by token),
ids from 2; 0 = padding, 1 = unknown.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # torch is imported lazily: the split build never needs it
    import torch

PAD_ID, UNK_ID = 0, 1
TOKEN_PATTERN = r"(?u)\b\w\w+\b"
_TOKEN_RE = re.compile(TOKEN_PATTERN)
DEFAULT_MAX_TOKENS = 256


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and vocabulary


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens (two or more word characters).

    >>> tokenize("Re: The GPU's 2 cores!")
    ['re', 'the', 'gpu', 'cores']
    """
    return _TOKEN_RE.findall(text.lower())


def fit_vocab(texts: Iterable[str], max_size: int = 20000, min_count: int = 2) -> list[str]:
    """Tokens seen at least ``min_count`` times, most frequent first (ties: alphabetical), at most ``max_size``.

    Token ``vocab[i]`` gets id ``i + 2``.

    >>> fit_vocab(["a bb bb cc", "cc bb dd"], min_count=2)
    ['bb', 'cc']
    """
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(tokenize(t))
    items = sorted((tok for tok, c in counts.items() if c >= min_count), key=lambda tok: (-counts[tok], tok))
    return items[:max_size]


def encode_texts(texts: Iterable[str], vocab: Sequence[str] | Mapping[str, int]) -> list[list[int]]:
    """Token ids per text (unknown tokens -> 1). ``vocab`` is the list from :func:`fit_vocab` or its index.

    >>> encode_texts(["bb zz cc"], ["bb", "cc"])
    [[2, 1, 3]]
    """
    index = vocab if isinstance(vocab, Mapping) else {tok: i + 2 for i, tok in enumerate(vocab)}
    return [[index.get(tok, UNK_ID) for tok in tokenize(t)] for t in texts]


def vocab_document(vocab: Sequence[str], max_size: int, min_count: int) -> dict:
    """The ``vocab.json`` object written beside a tokens split."""
    return {"tokens": list(vocab), "pad_id": PAD_ID, "unk_id": UNK_ID, "first_id": 2, "size": len(vocab) + 2,
            "token_pattern": TOKEN_PATTERN, "lowercase": True, "max_size": max_size, "min_count": min_count,
            "fit_on": "train"}


# ----------------------------------------------------------------------------------------------------------
# Decoding


def _column(batch: Any, name: str):
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        if name not in batch.schema.names:
            raise KeyError(f"payload column {name!r} not in batch (columns: {batch.schema.names})")
        col = batch.column(name)
        return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if name not in batch:
        raise KeyError(f"payload column {name!r} not in batch (columns: {list(batch)})")
    return batch[name]


def _bytes_list(col) -> list[bytes]:
    if isinstance(col, pa.Array):
        return col.to_pylist()
    return [bytes(v) for v in col]


def _pixels_uint8(col, shape: Sequence[int]) -> np.ndarray:
    """Binary column of equal-length raw rows -> [B, H, W, C] uint8 (zero copy for Arrow input)."""
    per = int(np.prod(shape))
    if isinstance(col, pa.Array) and col.null_count == 0 and pa.types.is_binary(col.type):
        offsets = np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset: col.offset + len(col) + 1]
        if len(col) == 0:
            return np.zeros((0, *shape), dtype=np.uint8)
        if np.all(np.diff(offsets) == per):
            data = np.frombuffer(col.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]]
            return data.reshape(len(col), *shape)
    if isinstance(col, np.ndarray) and col.dtype == np.uint8 and col.ndim >= 2:
        return col.reshape(len(col), *shape)  # Ray may hand fixed-size binary as a uint8 matrix
    rows = _bytes_list(col)
    bad = [i for i, r in enumerate(rows) if r is None or len(r) != per]
    if bad:
        raise ValueError(f"pixels row {bad[0]} has {None if rows[bad[0]] is None else len(rows[bad[0]])} bytes; "
                         f"expected {per} for shape {list(shape)}")
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), *shape)


def _resize(x: "torch.Tensor", size: int) -> "torch.Tensor":
    """[B, C, H, W] float -> [B, C, size, size]: shorter side to ``size`` then centre crop (plain resize if square)."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top: top + size, left: left + size].clamp_(0.0, 1.0)


def _channels(payload: Mapping[str, Any]) -> int:
    shape = payload.get("shape")
    if shape:
        return int(shape[-1])
    return int(payload.get("channels", 3))


def _decode_images(col, payload: Mapping[str, Any], image_size: int | None) -> "torch.Tensor":
    import torch
    from torchvision.io import ImageReadMode, decode_image

    mode = ImageReadMode.GRAY if _channels(payload) == 1 else ImageReadMode.RGB
    out = []
    for i, data in enumerate(_bytes_list(col)):
        if data is None:
            raise ValueError(f"image row {i} is null")
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
        img = img.unsqueeze(0).float().div_(255.0)
        out.append(_resize(img, image_size) if image_size else img)
    if not out:
        c = 1 if mode == ImageReadMode.GRAY else 3
        hw = (image_size, image_size) if image_size else tuple((payload.get("shape") or [0, 0])[:2])
        return torch.zeros((0, c, *hw), dtype=torch.float32)
    sizes = {tuple(t.shape[-2:]) for t in out}
    if len(sizes) > 1:
        raise ValueError(f"images in this batch have different sizes {sorted(sizes)[:4]}; pass image_size=")
    return torch.cat(out)


def _decode_tokens(col, max_tokens: int) -> "torch.Tensor":
    import torch

    if isinstance(col, pa.Array):
        rows = [np.asarray(r if r is not None else [], dtype=np.int64) for r in col.to_pylist()]
    elif isinstance(col, np.ndarray) and col.ndim == 2:
        rows = list(col.astype(np.int64))
    else:
        rows = [np.asarray(r if r is not None else [], dtype=np.int64) for r in col]
    length = max(1, min(max_tokens, max((len(r) for r in rows), default=1)))
    out = np.full((len(rows), length), PAD_ID, dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[:length]
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def _decode_features(col, dim: int) -> "torch.Tensor":
    import torch

    if isinstance(col, pa.Array):
        values = col.flatten().to_numpy(zero_copy_only=False) if len(col) else np.zeros(0, np.float32)
    else:
        values = np.stack([np.asarray(r, dtype=np.float32) for r in col]) if len(col) else np.zeros(0, np.float32)
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(-1, dim))


def inverse_document_frequency(splits) -> list[float]:
    """idf of every token id over the training split (scikit-learn's smooth idf: ln((1 + n) / (1 + df)) + 1).

    Only the training split is read, as for the vocabulary: nothing of D_val or the pool leaks into the model.
    """
    column = splits.read_table("train", columns=[splits.payload["column"]]).column(0).combine_chunks()
    size = int(splits.payload["vocab_size"])
    offsets = column.offsets.to_numpy()
    ids = column.values.to_numpy()[offsets[0]:offsets[-1]].astype(np.int64)
    doc = np.repeat(np.arange(len(column), dtype=np.int64), np.diff(offsets))
    # each (document, token) pair once: the token's document frequency
    df = np.bincount(np.unique(doc * size + ids) % size, minlength=size)
    return (np.log((1.0 + len(column)) / (1.0 + df)) + 1.0).tolist()


def decode(batch: pa.Table | pa.RecordBatch | Mapping[str, np.ndarray], payload: Mapping[str, Any],
           image_size: int | None = None, max_tokens: int = DEFAULT_MAX_TOKENS) -> "torch.Tensor":
    """Decode the payload column of a batch of split rows into one tensor.

    ``image``/``pixels`` -> float32 ``[B, C, H, W]`` in [0, 1] (grayscale stays C=1; ``image_size`` resizes
    to ``image_size`` x ``image_size``: shorter side, then centre crop). ``tokens`` -> int64 ``[B, L]``, padded
    with 0, ``L`` = the longest row truncated at ``max_tokens``. ``features`` (:mod:`stages.features`) -> float32
    ``[B, dim]``.

    >>> import pyarrow as pa
    >>> t = pa.table({"pixels": pa.array([bytes([0, 255, 0, 255])], pa.binary())})
    >>> decode(t, {"kind": "pixels", "column": "pixels", "shape": [2, 2, 1]}).tolist()
    [[[[0.0, 1.0], [0.0, 1.0]]]]
    """
    import torch

    kind = payload.get("kind")
    col = _column(batch, payload.get("column") or kind)
    if kind == "pixels":
        shape = payload.get("shape")
        if not shape:
            raise ValueError("pixels payload needs 'shape' [H, W, C] in its description")
        arr = _pixels_uint8(col, shape)
        x = torch.from_numpy(np.array(arr)).permute(0, 3, 1, 2).float().div_(255.0)  # copy: Arrow buffers are read-only
        return _resize(x, image_size) if image_size and len(x) else x
    if kind == "image":
        return _decode_images(col, payload, image_size)
    if kind == "tokens":
        return _decode_tokens(col, max_tokens)
    if kind == "features":
        return _decode_features(col, int(payload["dim"]))
    raise ValueError(f"payload kind {kind!r} cannot be decoded; accepted: 'image', 'pixels', 'tokens', 'features'")


def decode_labels(batch: pa.Table | pa.RecordBatch | Mapping[str, np.ndarray]) -> "torch.Tensor":
    """The ``label`` column as an int64 tensor.

    >>> decode_labels({"label": np.array([3, 1])}).tolist()
    [3, 1]
    """
    import torch

    col = _column(batch, "label")
    arr = col.to_numpy(zero_copy_only=False) if isinstance(col, pa.Array) else np.asarray(col)
    return torch.from_numpy(np.array(arr, dtype=np.int64))  # a copy: Arrow buffers are read-only


def read_split_tensors(splits, split: str, image_size: int | None = None,
                       max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple["torch.Tensor", "torch.Tensor"]:
    """All rows of a small split (digits, MNIST) as ``(x, y)`` tensors, for in-process training and tests.

    >>> from stages.longtail import LongTailConfig, build                 # doctest: +SKIP
    >>> s = build(LongTailConfig(dataset="digits", out="/tmp/d", imbalance_factor=10))  # doctest: +SKIP
    >>> x, y = read_split_tensors(s, "train"); x.shape[1:]                 # doctest: +SKIP
    torch.Size([1, 8, 8])
    """
    payload = splits.payload
    table = splits.read_table(split, columns=["label", payload["column"]])
    return decode(table, payload, image_size=image_size, max_tokens=max_tokens), decode_labels(table)


# Kinds whose decoding (JPEG/PNG, resizing) a streamed train split runs in Ray Data tasks, not on the workers.
PREDECODED_KINDS = ("image", "pixels")


def decode_to_uint8(batch: pa.Table, payload: Mapping[str, Any], image_size: int | None = None) -> dict:
    """Ray Data ``map_batches`` step of a streamed train split: rows -> ``{"x": uint8 [B, C, H, W], "label":
    int64 [B]}``. :func:`decode`, then quantised back to bytes (exact at the stored size; within 0.5/255 after
    a resize), so a row costs as much memory in the worker's shuffle buffer as a raw image, not four times that.
    The worker turns it into :func:`decode`'s floats with :func:`predecoded_batch`.

    >>> t = pa.table({"pixels": pa.array([bytes([0, 255, 7, 9])], pa.binary()), "label": [2]})
    >>> p = {"kind": "pixels", "column": "pixels", "shape": [2, 2, 1]}
    >>> b = decode_to_uint8(t, p)
    >>> b["x"].tolist(), b["label"].tolist()
    ([[[[0, 255], [7, 9]]]], [2])
    >>> bool((predecoded_batch(b)[0] == decode(t, p)).all())
    True
    """
    import torch

    x = decode(batch, payload, image_size).mul_(255.0).round_().to(torch.uint8).contiguous()
    return {"x": x.numpy(), "label": decode_labels(batch).numpy()}


def predecoded_batch(batch: Mapping[str, np.ndarray]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """A batch of :func:`decode_to_uint8` rows as the (x, y) tensors :func:`decode` and :func:`decode_labels`
    give (x float32 in [0, 1])."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch["x"])).float().div_(255.0)
    return x, torch.from_numpy(np.array(batch["label"], dtype=np.int64))
