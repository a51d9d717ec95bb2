"""Sources read tiny files written here in every official format; bad inputs fail naming the file/field.

The ``write_*`` helpers are imported by test_longtail.py too.
"""
from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import ingest
from stages.ingest import SourceError, SourceSpec, open_source

# ----------------------------------------------------------------------------------------------------------
# Writers of the official formats (tiny)


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    """idx: big-endian magic (0x08 = ubyte, ndim) and dims, then the bytes."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    data = struct.pack(">i", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def write_mnist(root: Path, n_train=(5, 4, 3), n_test=(2, 2, 2), gz=True, seed=0) -> dict:
    """MNIST-style idx files with labels in class blocks interleaved; returns the arrays written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, stem, per in (("train", "train", n_train), ("test", "t10k", n_test)):
        y = np.concatenate([np.full(c, k) for k, c in enumerate(per)]).astype(np.uint8)
        y = y[rng.permutation(len(y))]
        x = rng.integers(0, 256, size=(len(y), 4, 3), dtype=np.uint8)  # non-square: catches H/W swaps
        sfx = ".gz" if gz else ""
        write_idx(root / f"{stem}-images-idx3-ubyte{sfx}", x, gz)
        write_idx(root / f"{stem}-labels-idx1-ubyte{sfx}", y, gz)
        out[split] = (x, y)
    return out


def write_cifar10(root: Path, per_batch=6, n_test=5, names=("cat", "dog", "emu"), seed=0) -> dict:
    """``cifar-10-batches-py`` with 5 train batches, a test batch and batches.meta (bytes keys, like the originals)."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    out = {"train": [], "test": []}
    files = [(f"data_batch_{i}", per_batch, "train") for i in range(1, 6)] + [("test_batch", n_test, "test")]
    for name, n, split in files:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, len(names), size=n)]
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, f, protocol=2)
        out[split].append((data, labels))
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_vis": 3072}, f, protocol=2)
    return out


def write_cifar100(root: Path, n_train=12, n_test=6, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    fine = [f"f{i}" for i in range(4)]
    coarse = ["c0", "c1"]
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        f_lab = [int(v) for v in rng.integers(0, 4, size=n)]
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": f_lab, b"coarse_labels": [v // 2 for v in f_lab]}, f)
        out[name] = (data, f_lab)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in fine],
                     b"coarse_label_names": [n.encode() for n in coarse]}, f)
    return out


def jpeg_bytes(seed: int, size=(6, 5), mode="RGB", fmt="JPEG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    im = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def write_imagefolder(root: Path, train=(4, 3, 2), val=(2, 2, 2), wnids=("n02", "n01", "n03")) -> Path:
    """``root/{train,val}/<wnid>/*.JPEG`` (class folders deliberately created out of sorted order)."""
    seed = 0
    for split, per in (("train", train), ("val", val)):
        for wnid, n in zip(wnids, per):
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in reversed(range(n)):  # written in reverse: order must come from sorting, not the FS
                seed += 1
                (d / f"{wnid}_{i:04d}.JPEG").write_bytes(jpeg_bytes(seed))
    return root


def write_lt_lists(root: Path) -> dict[str, Path]:
    """ImageNet-LT style lists over a write_imagefolder tree (sorted wnids n01, n02, n03 = labels 0, 1, 2)."""
    lists = {
        "train": ["train/n01/n01_0002.JPEG 0", "train/n01/n01_0000.JPEG 0", "train/n02/n02_0003.JPEG 1",
                  "train/n03/n03_0001.JPEG 2"],
        "val": ["train/n01/n01_0001.JPEG 0", "train/n02/n02_0000.JPEG 1", "train/n03/n03_0000.JPEG 2"],
        "test": ["val/n01/n01_0000.JPEG 0", "val/n01/n01_0001.JPEG 0", "val/n02/n02_0001.JPEG 1",
                 "val/n03/n03_0000.JPEG 2"],
    }
    out = {}
    for split, lines in lists.items():
        out[split] = root / f"ImageNet_LT_{split}.txt"
        out[split].write_text("\n".join(lines) + "\n")
    return out


def write_image_parquet(root: Path, n_train=12, n_test=6, classes=("a", "b", "c"), fmt="PNG") -> Path:
    """``train.parquet``/``test.parquet`` like ../shared/data/cifar10-jpeg: image bytes + label + metadata."""
    root.mkdir(parents=True, exist_ok=True)
    meta = {b"classes": json.dumps(list(classes)).encode(), b"shape": b"[5, 6, 3]"}
    for name, n, off in (("train", n_train, 0), ("test", n_test, 1000)):
        t = pa.table({"image_jpeg": pa.array([jpeg_bytes(off + i, fmt=fmt) for i in range(n)], pa.binary()),
                      "label": pa.array([i % len(classes) for i in range(n)], pa.int64()),
                      "source_path": pa.array([f"{name}/{i}.png" for i in range(n)])})
        pq.write_table(t.replace_schema_metadata(meta), root / f"{name}.parquet", row_group_size=5)
    return root


NEWS = {
    "train": {"alt.atheism": {"101": "From: a@b\nSubject: god\n\nzeus zeus hera", "99": "From: c\n\nathena zeus"},
              "sci.space": {"200": "From: d\nSubject: moon\n\norbit rocket orbit", "7": "From: e\n\nrocket"},
              "comp.graphics": {"5": "From: f\n\npixel pixel"}},
    "test": {"alt.atheism": {"300": "From: g\n\nzeus unseenword", "310": "From: j\n\nhera"},
             "sci.space": {"301": "From: h\n\norbit", "311": "From: k\n\nrocket moon"},
             "comp.graphics": {"302": "From: i\n\npixel \xe9t\xe9", "312": "From: l\n\npixel"}},
}


def write_newsgroups(root: Path, tar: bool = True) -> Path:
    """The bydate layout, as a tarball (members in non-sorted order) or an unpacked folder; latin-1 text."""
    root.mkdir(parents=True, exist_ok=True)
    if not tar:
        for split, groups in NEWS.items():
            for g, docs in groups.items():
                d = root / f"20news-bydate-{split}" / g
                d.mkdir(parents=True, exist_ok=True)
                for name, text in docs.items():
                    (d / name).write_bytes(text.encode("latin-1"))
        return root
    path = root / "20news-bydate.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for split, groups in reversed(list(NEWS.items())):
            for g, docs in groups.items():
                for name, text in docs.items():
                    data = text.encode("latin-1")
                    info = tarfile.TarInfo(f"20news-bydate-{split}/{g}/{name}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return path


def rows(src, split):
    return pa.concat_tables(list(src.iter_batches(split)))


# ----------------------------------------------------------------------------------------------------------
# digits


def test_digits_fixed_half_split_and_pixels():
    src = open_source("digits")
    tr, te = src.labels("train"), src.labels("test")
    assert (tr.num_rows, te.num_rows) == (901, 896)
    ids = np.concatenate([tr["sample_id"].to_numpy(), te["sample_id"].to_numpy()])
    assert sorted(ids.tolist()) == list(range(1797))  # a partition of load_digits, ids = its row index
    from sklearn.datasets import load_digits

    d = load_digits()
    t = rows(src, "train")
    first = np.frombuffer(t["pixels"][0].as_py(), np.uint8).reshape(8, 8)
    np.testing.assert_array_equal(first, np.rint(d.images[0] * 255 / 16).astype(np.uint8))
    assert t["label"].to_numpy().tolist() == d.target[t["sample_id"].to_numpy()].tolist()
    assert src.payload == {"kind": "pixels", "column": "pixels", "shape": [8, 8, 1], "dtype": "uint8",
                           "layout": "HWC"}


# ----------------------------------------------------------------------------------------------------------
# MNIST idx


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_rows_match_files(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    src = open_source("mnist", data_root=str(tmp_path))
    assert src.payload["shape"] == [4, 3, 1]
    for split, (x, y) in arrays.items():
        t = rows(src, split)
        assert t["label"].to_numpy().tolist() == y.tolist()
        off = 0 if split == "train" else 12
        assert t["sample_id"].to_numpy().tolist() == list(range(off, off + len(y)))
        got = np.stack([np.frombuffer(b, np.uint8) for b in t["pixels"].to_pylist()]).reshape(x.shape)
        np.testing.assert_array_equal(got, x)
    # selection by sample id reads only the wanted rows
    part = pa.concat_tables(list(src.iter_batches("test", np.array([13, 17]))))
    assert part["sample_id"].to_pylist() == [13, 17]


def test_mnist_torchvision_layout(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw")
    assert open_source("mnist", data_root=str(tmp_path)).labels("train").num_rows == 12


def test_mnist_corrupt_header(tmp_path):
    write_mnist(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    data = bytearray(p.read_bytes())
    data[3] = 0x01  # magic 2049: a labels file where images are expected
    p.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"train-images-idx3-ubyte: corrupt idx header: magic number 2049"):
        open_source("mnist", data_root=str(tmp_path))


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_truncated_images(tmp_path, gz):
    write_mnist(tmp_path, gz=gz)
    p = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    p.write_bytes(p.read_bytes()[:-20])
    src = open_source("mnist", data_root=str(tmp_path))
    with pytest.raises(SourceError, match=r"t10k-images-idx3-ubyte.*truncated"):
        src.labels("test")


def test_mnist_truncated_labels_and_count_mismatch(tmp_path):
    write_mnist(tmp_path, gz=False)
    p = tmp_path / "train-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(SourceError, match=r"train-labels-idx1-ubyte: truncated file"):
        open_source("mnist", data_root=str(tmp_path)).labels("train")
    write_idx(p, np.zeros(5, np.uint8), gz=False)
    with pytest.raises(SourceError, match=r"train-labels-idx1-ubyte: 5 labels but .*train-images"):
        open_source("mnist", data_root=str(tmp_path)).labels("train")


def test_mnist_label_outside_class_list(tmp_path):
    write_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 12, 2, 2, 1], np.uint8), gz=False)
    with pytest.raises(SourceError, match=r"t10k-labels-idx1-ubyte: label 12 \(row 2\) is outside the class list"):
        open_source("mnist", data_root=str(tmp_path)).labels("test")


def test_missing_paths_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST data_root not found"):
        open_source("mnist", data_root=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"MNIST train images file not found; looked for: .*train-images"):
        open_source("mnist", data_root=str(tmp_path))
    with pytest.raises(ValueError, match="needs data_root"):
        SourceSpec(dataset="cifar10")
    with pytest.raises(ValueError, match="accepted: digits, mnist"):
        SourceSpec(dataset="svhn")


# ----------------------------------------------------------------------------------------------------------
# CIFAR pickles


def test_cifar10_pickles_hwc_and_names(tmp_path):
    written = write_cifar10(tmp_path)
    src = open_source("cifar10", data_root=str(tmp_path))
    assert src.classes == ["cat", "dog", "emu"]
    t = rows(src, "train")
    assert t.num_rows == 30 and t["sample_id"].to_pylist() == list(range(30))
    assert t["label"].to_pylist() == sum((lab for _, lab in written["train"]), [])
    data0 = written["train"][0][0][0]
    px = np.frombuffer(t["pixels"][0].as_py(), np.uint8).reshape(32, 32, 3)
    np.testing.assert_array_equal(px[..., 0], data0[:1024].reshape(32, 32))  # red plane
    np.testing.assert_array_equal(px[..., 2], data0[2048:].reshape(32, 32))  # blue plane
    te = rows(src, "test")
    assert te["sample_id"].to_pylist() == list(range(30, 35))
    # chunks never straddle batch files
    assert open_source(SourceSpec("cifar10", str(tmp_path), chunk_rows=4)).chunks("train")[:3] == [(0, 4), (4, 6),
                                                                                                      (6, 10)]


def test_cifar100_fine_and_coarse(tmp_path):
    written = write_cifar100(tmp_path)
    fine = open_source("cifar100", data_root=str(tmp_path / "cifar-100-python"))
    assert fine.classes == ["f0", "f1", "f2", "f3"]
    assert fine.labels("train")["label"].to_pylist() == written["train"][1]
    coarse = open_source("cifar100", data_root=str(tmp_path), label_kind="coarse")
    assert coarse.classes == ["c0", "c1"]
    assert coarse.labels("test")["label"].to_pylist() == [v // 2 for v in written["test"][1]]


def test_cifar_bad_inputs(tmp_path):
    write_cifar10(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    (d / "data_batch_3").write_bytes(b"garbage, not a pickle")
    with pytest.raises(SourceError, match="data_batch_3: not a readable CIFAR python batch"):
        open_source("cifar10", data_root=str(tmp_path)).labels("train")
    (d / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        open_source("cifar10", data_root=str(tmp_path))
    write_cifar10(tmp_path)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 7]}, f)
    with pytest.raises(SourceError, match=r"test_batch field 'labels': label 7 .* outside the class list"):
        open_source("cifar10", data_root=str(tmp_path)).labels("test")
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(SourceError, match=r"test_batch: field 'labels' missing"):
        open_source("cifar10", data_root=str(tmp_path)).labels("test")


# ----------------------------------------------------------------------------------------------------------
# ImageFolder and ImageNet-LT lists


def test_imagefolder_sorted_classes_and_files(tmp_path):
    write_imagefolder(tmp_path)
    src = open_source("imagefolder", data_root=str(tmp_path))
    assert src.classes == ["n01", "n02", "n03"] and src.splits == ("train", "test")
    t = rows(src, "train")
    assert t["path"].to_pylist()[:4] == ["train/n01/n01_0000.JPEG", "train/n01/n01_0001.JPEG",
                                         "train/n01/n01_0002.JPEG", "train/n02/n02_0000.JPEG"]
    assert t["label"].to_pylist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert t["image"][0].as_py() == (tmp_path / "train/n01/n01_0000.JPEG").read_bytes()
    te = rows(src, "test")  # the official held-out split is the "val" folder
    assert te["sample_id"].to_pylist() == list(range(9, 15)) and te["path"][0].as_py().startswith("val/")


def test_imagenet_lt_lists_select_and_label_exactly(tmp_path):
    write_imagefolder(tmp_path)
    lists = write_lt_lists(tmp_path)
    src = open_source(SourceSpec("imagefolder", str(tmp_path), train_list=str(lists["train"]),
                                 val_list=str(lists["val"]), test_list=str(lists["test"])))
    assert src.splits == ("train", "val", "test")
    t = rows(src, "train")
    assert t["path"].to_pylist() == [line.split()[0] for line in lists["train"].read_text().splitlines()]
    assert t["label"].to_pylist() == [0, 0, 1, 2]
    assert rows(src, "val")["sample_id"].to_pylist() == [4, 5, 6]
    assert rows(src, "test")["sample_id"].to_pylist() == [7, 8, 9, 10]


def test_imagenet_lt_list_errors(tmp_path):
    write_imagefolder(tmp_path)
    bad = tmp_path / "missing.txt"
    bad.write_text("train/n01/n01_0000.JPEG 0\ntrain/n01/n01_9999.JPEG 0\n")
    src = open_source(SourceSpec("imagefolder", str(tmp_path), train_list=str(bad)))
    with pytest.raises(FileNotFoundError, match=r"missing.txt: 1 listed file\(s\) missing .*n01_9999.JPEG"):
        src.labels("train")
    bad.write_text("train/n01/n01_0000.JPEG 5\n")
    with pytest.raises(SourceError, match=r"missing.txt:1: label 5 is outside the class list \(accepted: 0..2"):
        open_source(SourceSpec("imagefolder", str(tmp_path), train_list=str(bad))).labels("train")
    bad.write_text("train/n01/n01_0000.JPEG\n")
    with pytest.raises(SourceError, match=r"missing.txt:1: expected 'relative/path label'"):
        open_source(SourceSpec("imagefolder", str(tmp_path), train_list=str(bad))).labels("train")
    with pytest.raises(FileNotFoundError, match="ImageNet-LT list file not found"):
        open_source(SourceSpec("imagefolder", str(tmp_path), train_list=str(tmp_path / "nope.txt"))).labels("train")


def test_imagefolder_unknown_class_folder(tmp_path):
    write_imagefolder(tmp_path)
    (tmp_path / "val" / "n99").mkdir()
    with pytest.raises(SourceError, match=r"val/n99: class folder 'n99' is outside the class list"):
        open_source("imagefolder", data_root=str(tmp_path)).labels("test")


def test_inspect_image_flags_corrupt_and_truncated():
    good = jpeg_bytes(1, size=(16, 16))
    assert ingest.inspect_image(good).shape == (16, 16, 3)
    assert ingest.inspect_image(jpeg_bytes(2, mode="L", fmt="PNG")).shape == (5, 6, 1)
    assert ingest.inspect_image(good[: len(good) // 2]).error  # truncated: detected by the full decode
    assert ingest.inspect_image(b"\xff\xd8garbage").error


# ----------------------------------------------------------------------------------------------------------
# Parquet image tables


def test_parquet_image_table(tmp_path):
    write_image_parquet(tmp_path)
    src = open_source("parquet", data_root=str(tmp_path))
    assert src.classes == ["a", "b", "c"] and src.payload["kind"] == "image"
    assert src.chunks("train") == [(0, 5), (5, 10), (10, 12)]  # one chunk per row group
    t = pa.concat_tables(list(src.iter_batches("train", np.array([1, 6, 7]))))
    assert t.column_names == ["sample_id", "label", "image"] and t["sample_id"].to_pylist() == [1, 6, 7]
    assert t["image"][0].as_py() == pq.read_table(tmp_path / "train.parquet")["image_jpeg"][1].as_py()
    assert src.labels("test")["sample_id"].to_pylist() == list(range(12, 18))


def test_parquet_raw_pixels_and_bad_tables(tmp_path):
    meta = {b"classes": b'["x", "y"]', b"shape": b"[2, 2, 1]"}
    t = pa.table({"pixels": pa.array([bytes(4)] * 3, pa.binary()), "label": [0, 1, 2]})
    pq.write_table(t.replace_schema_metadata(meta), tmp_path / "train.parquet")
    pq.write_table(t.slice(0, 2).replace_schema_metadata(meta), tmp_path / "test.parquet")
    src = open_source("parquet", data_root=str(tmp_path))
    assert src.payload["kind"] == "pixels" and src.payload["shape"] == [2, 2, 1]
    with pytest.raises(SourceError, match=r"train.parquet column 'label': label 2 \(row 2\) is outside the class"):
        src.labels("train")
    pq.write_table(pa.table({"img": pa.array([b"x"]), "label": [0]}), tmp_path / "train.parquet")
    with pytest.raises(SourceError, match=r"train.parquet: payload column \(auto-detected\) not found"):
        open_source("parquet", data_root=str(tmp_path))
    (tmp_path / "train.parquet").write_bytes(b"not parquet")
    with pytest.raises(SourceError, match="train.parquet: not a readable Parquet file"):
        open_source("parquet", data_root=str(tmp_path))


# ----------------------------------------------------------------------------------------------------------
# 20 Newsgroups


def test_newsgroups_tarball_and_folder_agree(tmp_path):
    tar = write_newsgroups(tmp_path / "tar")
    folder = write_newsgroups(tmp_path / "dir", tar=False)
    a, b = open_source("newsgroups", data_root=str(tar)), open_source("newsgroups", data_root=str(folder))
    assert a.classes == ["alt.atheism", "comp.graphics", "sci.space"]
    ta, tb = rows(a, "train"), rows(b, "train")
    assert ta.equals(tb)
    # groups sorted, then file names sorted as strings (scikit-learn's load_files order)
    assert ta["path"].to_pylist() == ["20news-bydate-train/alt.atheism/101", "20news-bydate-train/alt.atheism/99",
                                      "20news-bydate-train/comp.graphics/5", "20news-bydate-train/sci.space/200",
                                      "20news-bydate-train/sci.space/7"]
    assert ta["text"][0].as_py().startswith("From: a@b")
    te = rows(a, "test")
    assert te["sample_id"].to_pylist() == [5, 6, 7, 8, 9, 10] and te["text"][2].as_py().endswith("\xe9t\xe9")
    stripped = rows(open_source("newsgroups", data_root=str(tmp_path / "tar"), strip_headers=True), "train")
    assert stripped["text"][0].as_py() == "zeus zeus hera"


def test_newsgroups_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="20 Newsgroups not found"):
        open_source("newsgroups", data_root=str(tmp_path))
    tar = write_newsgroups(tmp_path)
    tar.write_bytes(tar.read_bytes()[:-40])
    with pytest.raises(SourceError, match="20news-bydate.tar.gz: unreadable or truncated tarball"):
        open_source("newsgroups", data_root=str(tar))


# ----------------------------------------------------------------------------------------------------------
# The source registry: a new format is one registered Source subclass


class ToySource(ingest.Source):
    """3 classes of 2x2x1 pixels (each row's bytes are its sample_id): train 8/4/2 rows, test 4 per class."""

    dataset = "toy"
    splits = ("train", "test")
    needs_data_root = False  # it reads no files

    def __init__(self, spec):
        super().__init__(spec)
        self.classes = ["a", "b", "c"]
        self.payload = {"kind": "pixels", "column": "pixels", "shape": [2, 2, 1], "dtype": "uint8", "layout": "HWC"}

    def _load_labels(self, split):
        y = np.repeat(np.arange(3), (8, 4, 2) if split == "train" else (4, 4, 4))
        self._set_labels(split, np.arange(len(y)) + (0 if split == "train" else 14), y, "toy labels")

    def _read(self, split, rows):
        return {"pixels": pa.array([bytes([int(i)] * 4) for i in self._ids[split][rows]], type=pa.binary())}


def test_registered_source_builds_long_tailed_splits(tmp_path):
    from stages import sources
    from stages.longtail import LongTailConfig, build

    with pytest.raises(ValueError, match="'digits' is already registered"):
        sources.register_source("digits", ToySource)
    sources.register_source("toy", ToySource)
    try:
        assert ingest.DATASETS[-1] == "toy" and sources.source_names()[:2] == ("digits", "mnist")
        s = build(LongTailConfig(dataset="toy", out=str(tmp_path / "t"), imbalance_factor=4, val_fraction=0.5))
        assert s.train_counts == [8, 4, 2] and s.manifest["dataset"] == "toy"
        assert s.manifest["counts"]["val"] == [2, 2, 2] and s.manifest["counts"]["pool"] == [2, 2, 2]
        train = s.read_table("train")
        assert [b[0] for b in train["pixels"].to_pylist()] == train["sample_id"].to_pylist()
    finally:
        sources.unregister_source("toy")
    assert "toy" not in ingest.DATASETS
    with pytest.raises(ValueError, match="dataset='toy' is not supported; accepted: digits, mnist"):
        SourceSpec("toy", str(tmp_path))


# ----------------------------------------------------------------------------------------------------------
# Ray Dataset path


@pytest.mark.ray
def test_read_source_as_ray_dataset(ray_cluster, tmp_path):
    write_mnist(tmp_path, n_train=(3, 3, 3))
    spec = SourceSpec("mnist", str(tmp_path), chunk_rows=1)  # MNIST raises chunks to 10000 rows
    ds = ingest.read_source(spec, "train")
    got = ds.take_all()
    assert [r["sample_id"] for r in got] == list(range(9))
    assert set(got[0]) == {"sample_id", "label", "pixels"} and len(got[0]["pixels"]) == 12
    write_cifar10(tmp_path / "c")
    ds = ingest.read_source(SourceSpec("cifar10", str(tmp_path / "c")), "train")  # 5 read tasks, one per batch
    assert sorted(r["sample_id"] for r in ds.take_all()) == list(range(30))
    # The written splits feed Ray Data directly; decode() takes its numpy batches.
    from stages.longtail import LongTailConfig, build
    from stages.payload import decode

    s = build(LongTailConfig(dataset="newsgroups", data_root=str(write_newsgroups(tmp_path / "n")),
                             out=str(tmp_path / "ng"), imbalance_factor=2, n_max=2, val_fraction=0.5,
                             vocab_min_count=1))
    d = build(LongTailConfig(dataset="digits", out=str(tmp_path / "dg"), imbalance_factor=10))
    for splits, shape in ((s, (4, 6)), (d, (sum(d.train_counts), 1, 8, 8))):
        ds = ray_cluster.data.read_parquet(str(splits.path("train")))
        batch = next(iter(ds.iter_batches(batch_size=None, batch_format="numpy")))
        assert tuple(decode(batch, splits.payload).shape) == shape


def test_digits_source_reads_what_load_digits_gives():
    """The embedded source reads scikit-learn's digits file itself (importing scikit-learn took 3.5 s of the
    demo): the same images and labels as ``load_digits``."""
    from sklearn.datasets import load_digits

    from stages.sources import open_source

    d = load_digits()
    src = open_source(SourceSpec())
    np.testing.assert_array_equal(src._pix[..., 0], np.rint(d.images * (255.0 / 16.0)).astype(np.uint8))
    labels = {s: src.labels(s) for s in src.splits}
    for t in labels.values():
        np.testing.assert_array_equal(t["label"].to_numpy(), d.target[t["sample_id"].to_numpy()])
    assert src.classes == [str(c) for c in d.target_names]
