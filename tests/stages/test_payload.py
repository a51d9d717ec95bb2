"""Payload decoding (pixels, encoded images, tokens) from Arrow tables and Ray-style numpy dicts."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch

from stages import payload as codec
from stages.longtail import LongTailConfig, build
from tests.stages.test_ingest import jpeg_bytes


def as_numpy_dict(table: pa.Table) -> dict[str, np.ndarray]:
    """What Ray Data hands a ``map_batches``/``iter_batches(batch_format="numpy")`` function."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_pixels_exact_from_table_and_numpy_dict():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(5, 4, 3, 2), dtype=np.uint8)  # B, H, W, C
    col = pa.array([r.tobytes() for r in x], pa.binary())
    t = pa.table({"label": [0, 1, 2, 3, 4], "pixels": col})
    desc = {"kind": "pixels", "column": "pixels", "shape": [4, 3, 2]}
    got = codec.decode(t, desc)
    assert got.shape == (5, 2, 4, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(codec.decode(as_numpy_dict(t), desc), got)
    torch.testing.assert_close(codec.decode(t.slice(2, 2), desc), got[2:4])  # sliced Arrow buffers
    assert codec.decode(t, desc, image_size=6).shape == (5, 2, 6, 6)
    assert codec.decode_labels(as_numpy_dict(t)).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"pixels row 0 has 3 bytes; expected 24"):
        codec.decode({"pixels": np.array([b"abc"], dtype=object)}, desc)


def test_images_png_exact_grayscale_and_resize():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(2, 6, 4, 3), dtype=np.uint8)
    t = pa.table({"image": pa.array([png_bytes(a) for a in rgb], pa.binary())})
    desc = {"kind": "image", "column": "image", "shape": [6, 4, 3], "channels": 3}
    got = codec.decode(t, desc)  # PNG is lossless: exact pixels
    torch.testing.assert_close(got, torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(codec.decode(as_numpy_dict(t), desc), got)
    square = codec.decode(t, desc, image_size=2)  # shorter side to 2, centre crop
    assert square.shape == (2, 3, 2, 2) and 0 <= square.min() and square.max() <= 1
    gray = pa.table({"image": pa.array([png_bytes(rgb[0, ..., 0])], pa.binary())})
    assert codec.decode(gray, {"kind": "image", "column": "image", "shape": [6, 4, 1]}).shape == (1, 1, 6, 4)
    mixed = pa.table({"image": pa.array([jpeg_bytes(0, size=(8, 8)), jpeg_bytes(1, size=(10, 12))])})
    with pytest.raises(ValueError, match="different sizes"):
        codec.decode(mixed, {"kind": "image", "column": "image", "shape": None})
    assert codec.decode(mixed, {"kind": "image", "column": "image", "shape": None}, image_size=4).shape == (2, 3, 4, 4)


def test_tokens_pad_truncate_and_vocab():
    t = pa.table({"tokens": pa.array([[5, 6, 7], [8], []], pa.list_(pa.int32()))})
    desc = {"kind": "tokens", "column": "tokens"}
    assert codec.decode(t, desc).tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert codec.decode(as_numpy_dict(t), desc, max_tokens=2).tolist() == [[5, 6], [8, 0], [0, 0]]
    assert codec.decode(t, desc).dtype == torch.int64
    vocab = codec.fit_vocab(["b a a", "c b a"], min_count=1)
    assert vocab == [] and codec.fit_vocab(["bb aa aa", "cc bb aa"], min_count=1) == ["aa", "bb", "cc"]
    assert codec.encode_texts(["AA dd"], ["aa"]) == [[2, 1]]
    with pytest.raises(ValueError, match="accepted: 'image', 'pixels', 'tokens'"):
        codec.decode(t, {"kind": "text", "column": "tokens"})


def test_read_split_tensors_on_digits(tmp_path):
    s = build(LongTailConfig(dataset="digits", out=str(tmp_path / "d"), imbalance_factor=10))
    x, y = codec.read_split_tensors(s, "train")
    assert x.shape == (sum(s.train_counts), 1, 8, 8) and x.dtype == torch.float32
    assert torch.bincount(y, minlength=10).tolist() == s.train_counts
    assert float(x.max()) == 1.0 and float(x.min()) == 0.0
    xv, _ = codec.read_split_tensors(s, "val", image_size=16)
    assert xv.shape[1:] == (1, 16, 16)
