"""Long-tailed split builds: exact counts, determinism, idempotent rebuilds, atomic writes, bad inputs."""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages import longtail
from stages.ingest import SourceError
from stages.longtail import LongTailConfig, ManifestError, build, load, plan
from tests.stages.test_ingest import (jpeg_bytes, write_cifar10, write_image_parquet, write_imagefolder,
                                      write_lt_lists, write_mnist, write_newsgroups)

CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
MNIST_TRAIN = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def tree(path):
    """Every file under ``path`` (relative names) with its bytes: a folder's complete state."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------
# Profiles


def test_exponential_matches_published_subsets():
    assert longtail.exponential_counts(5000, 10, 100) == CIFAR10_LT_100
    assert sum(longtail.exponential_counts(5000, 10, 10)) == 20431
    assert sum(longtail.exponential_counts(5000, 10, 50)) == 13996
    assert sum(longtail.exponential_counts(500, 100, 100)) == 10847  # CIFAR-100-LT
    assert longtail.exponential_counts(7, 5, 1) == [7] * 5  # IF = 1: balanced


def test_step_profile_and_largest_n_max():
    assert longtail.step_counts(100, 5, 10, 0.4) == [100, 100, 100, 10, 10]
    assert longtail.largest_n_max(MNIST_TRAIN, "exponential", 100) == 5923  # class 0 must supply n_max itself
    assert longtail.largest_n_max([50, 10], "step", 2) == 21  # floor(21 / 2) = 10 still fits
    rank = longtail.class_rank(np.array([2, 0, 2, 0, 2]), 3, np.random.default_rng(0))
    assert sorted(rank[[0, 2, 4]].tolist()) == [0, 1, 2] and sorted(rank[[1, 3]].tolist()) == [0, 1]


# ----------------------------------------------------------------------------------------------------------
# The embedded default: digits


def test_digits_build_counts_splits_and_contract(tmp_path):
    s = build(LongTailConfig(dataset="digits", out=str(tmp_path / "d"), imbalance_factor=10))
    m = s.manifest
    assert s.train_counts == [89, 68, 53, 41, 31, 24, 19, 14, 11, 8]
    assert s.train_counts == longtail.exponential_counts(89, 10, 10) and m["n_max"] == 89
    avail_test = m["available"]["test"]
    assert [v + p for v, p in zip(m["counts"]["val"], m["counts"]["pool"])] == avail_test
    assert m["counts"]["val"] == [int(np.floor(0.2 * a + 0.5)) for a in avail_test]
    tables = {k: s.read_table(k) for k in longtail.SPLITS}
    ids = {k: set(t["sample_id"].to_pylist()) for k, t in tables.items()}
    assert not (ids["train"] & ids["val"]) and not (ids["val"] & ids["pool"]) and not (ids["train"] & ids["pool"])
    for k, t in tables.items():
        assert t.column_names == ["sample_id", "label", "pixels"]
        assert str(t.schema.field("sample_id").type) == "int64" and str(t.schema.field("label").type) == "int64"
        assert np.bincount(t["label"].to_numpy(), minlength=10).tolist() == m["counts"][k]
        assert t["sample_id"].to_pylist() == sorted(t["sample_id"].to_pylist())  # official order
        meta = json.loads(t.schema.metadata[b"cact"])
        assert meta["classes"] == s.classes and meta["payload"]["kind"] == "pixels" and meta["split"] == k
    # first n_k in official order: class 1's rows are its first 68 training ids
    train_src = longtail.ingest.open_source("digits").labels("train")
    first1 = train_src.filter(train_src["label"].to_numpy() == 1)["sample_id"].to_pylist()[:68]
    t = tables["train"]
    assert t.filter(t["label"].to_numpy() == 1)["sample_id"].to_pylist() == first1
    for key in ("dataset", "classes", "num_classes", "profile", "imbalance_factor", "seed", "val_fraction",
                "counts", "payload", "sources", "checksums", "code_version", "model_family"):
        assert key in m, key
    assert (m["dataset"], m["model_family"], m["payload"]["shape"]) == ("digits", "small_cnn", [8, 8, 1])
    for k in longtail.SPLITS:
        assert [f.relative_to(s.root).as_posix() for f in s.files(k)] == [f"{k}/part-00000.parquet"]
        assert m["checksums"]["splits"][f"{k}/part-00000.parquet"] == longtail.sha256_file(s.files(k)[0])
    assert set(os.listdir(tmp_path)) == {"d"}  # no temporary leftovers beside the folder


def test_determinism_and_seeds(tmp_path):
    cfg = dict(dataset="digits", imbalance_factor=5, selection="random", seed=3)
    a = build(LongTailConfig(out=str(tmp_path / "a"), **cfg))
    b = build(LongTailConfig(out=str(tmp_path / "b"), **cfg))
    assert tree(a.root) == tree(b.root)  # byte-identical manifest and files
    c = build(LongTailConfig(out=str(tmp_path / "c"), **{**cfg, "seed": 4}))
    assert c.train_counts == a.train_counts
    assert c.read_table("train")["sample_id"] != a.read_table("train")["sample_id"]
    assert c.manifest["selection_digest"]["val"] != a.manifest["selection_digest"]["val"]


def test_rebuild_reuses_or_refuses(tmp_path):
    out = tmp_path / "d"
    cfg = LongTailConfig(out=str(out), imbalance_factor=10)
    build(cfg)
    before = tree(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    again = build(cfg)  # same build: reused, nothing rewritten, no duplicate rows
    assert tree(out) == before and {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert again.read_table("train").num_rows == sum(again.train_counts)
    build(LongTailConfig(out=str(out), imbalance_factor=np.float64(10.0)))  # the same build spelled otherwise
    assert tree(out) == before
    with pytest.raises(FileExistsError, match=r"holds a different split build \(manifest differs in: "
                                              r"imbalance_factor.*planned_counts"):
        build(LongTailConfig(out=str(out), imbalance_factor=20))
    assert tree(out) == before
    shard = out / "val" / "part-00000.parquet"
    pq.write_table(pq.read_table(shard).slice(0, 3), shard)
    with pytest.raises(FileExistsError, match=r"val/part-00000.parquet has \d+ bytes, not \d+ \(per .*manifest"):
        build(cfg)
    # a build written before sizes were recorded is checked by its files' hashes
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["checksums"]["bytes"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileExistsError, match="val/part-00000.parquet: sha256 differs"):
        build(cfg)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="has no manifest.json: not a split build"):
        build(LongTailConfig(out=str(other), imbalance_factor=10))
    assert os.listdir(other) == ["notes.txt"]


def _crash_after(monkeypatch, shards_written):
    """Make the build fail on its next shard once ``shards_written`` shards are written; returns the calls."""
    real, calls = longtail.shards.ShardWriter.write, []

    def write(self, split, index):
        calls.append((split, index))
        if len(calls) > shards_written:
            raise RuntimeError("simulated crash mid-build")
        return real(self, split, index)

    monkeypatch.setattr(longtail.shards.ShardWriter, "write", write)
    return calls


def test_interrupted_build_resumes_with_the_missing_shards_only(tmp_path, monkeypatch):
    cfg = dict(imbalance_factor=10, shard_rows=64, executor="local")  # 6 + 3 + 12 shards
    fresh = build(LongTailConfig(out=str(tmp_path / "fresh"), **cfg))
    assert [len(fresh.files(s)) for s in longtail.SPLITS] == [6, 3, 12]
    assert fresh.read_table("pool").num_rows == 717

    with monkeypatch.context() as m:
        _crash_after(m, 5)
        with pytest.raises(RuntimeError, match="simulated crash"):
            build(LongTailConfig(out=str(tmp_path / "d"), **cfg))
    assert not (tmp_path / "d").exists()  # nothing is committed before the last shard
    partial = tmp_path / ".d.partial"
    kept = {p.relative_to(partial): p.stat().st_mtime_ns for p in partial.rglob("*.parquet")}
    assert len(kept) == 5
    with monkeypatch.context() as m:
        calls = _crash_after(m, 10**6)
        s = build(LongTailConfig(out=str(tmp_path / "d"), **cfg))
    assert len(calls) == 21 - 5  # the finished shards were not written again
    assert {p: (s.root / p).stat().st_mtime_ns for p in kept} == kept  # moved into place, not rewritten
    assert tree(s.root) == tree(fresh.root)  # byte-identical to the uninterrupted build
    assert sorted(os.listdir(tmp_path)) == ["d", "fresh"]  # the partial folders are gone

    # A finished shard changed between the crash and the rerun: an error naming it, nothing overwritten.
    with monkeypatch.context() as m:
        _crash_after(m, 2)
        with pytest.raises(RuntimeError, match="simulated crash"):
            build(LongTailConfig(out=str(tmp_path / "e"), **cfg))
    shard = tmp_path / ".e.partial" / "train" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    damaged = shard.read_bytes()
    with pytest.raises(FileExistsError, match=r"\.e\.partial/train/part-00001\.parquet: shard changed since it "
                                              r"was written .* refusing to overwrite it"):
        build(LongTailConfig(out=str(tmp_path / "e"), **cfg))
    assert shard.read_bytes() == damaged and not (tmp_path / "e").exists()

    # An interrupted build of another plan is ours to replace; a folder that is not a build's is refused.
    s = build(LongTailConfig(out=str(tmp_path / "e"), **{**cfg, "seed": 1, "selection": "random"}))
    assert s.manifest["seed"] == 1 and not (tmp_path / ".e.partial").exists()
    (tmp_path / ".f.partial").mkdir()
    with pytest.raises(FileExistsError, match=r"\.f\.partial exists but holds no build plan"):
        build(LongTailConfig(out=str(tmp_path / "f"), **cfg))


def test_ray_data_build_is_byte_identical_at_any_parallelism(tmp_path, ray_cluster, capfd):
    """The shards are written by Ray Data tasks, one or two at a time: the same bytes as this process writes."""
    cfg = dict(imbalance_factor=10, shard_rows=64)
    local = build(LongTailConfig(out=str(tmp_path / "local"), executor="local", **cfg))
    one = build(LongTailConfig(out=str(tmp_path / "one"), executor="ray", max_cpus=1, **cfg))
    capfd.readouterr()
    two = build(LongTailConfig(out=str(tmp_path / "two"), executor="auto", max_cpus=2, **cfg))  # 21 shards: Ray
    err = capfd.readouterr().err
    assert re.search(r"split build: pool: 717 rows in 12 shard\(s\), .* MiB \(0 resumed, 12 written by ray on "
                     r"1 node\(s\)\)", err)
    assert "concurrency" not in err  # no deprecation warning from Ray Data
    assert tree(one.root) == tree(local.root) == tree(two.root)
    assert len(two.manifest["checksums"]["splits"]) == 21


@pytest.mark.parametrize("field,value,match", [
    ("imbalance_factor", 0.5, r"imbalance_factor=0.5; accepted: a finite number >= 1"),
    ("val_fraction", 0.0, r"val_fraction=0.0; accepted: a number in the open interval \(0, 1\)"),
    ("val_fraction", 1.0, r"val_fraction=1.0"),
    ("profile", "linear", r"profile='linear'; accepted: exponential, step, lists"),
    ("selection", "best", r"selection='best'; accepted: first, random"),
    ("on_corrupt", "ignore", r"on_corrupt='ignore'; accepted: fail, skip"),
    ("n_max", 0, r"n_max=0"),
    ("profile", "lists", r"profile='lists' needs dataset='imagefolder' and train_list"),
])
def test_bad_config_writes_nothing(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        build(LongTailConfig(out=str(tmp_path / "d"), **{field: value}))
    assert os.listdir(tmp_path) == []


def test_request_exceeding_source_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"class '0' \(index 0\) needs 90 training examples .* has only 89; "
                                         r"lower n_max \(accepted: <= 87\)"):
        build(LongTailConfig(out=str(tmp_path / "d"), imbalance_factor=1, n_max=90))
    with pytest.raises(ValueError, match="would get 0 training examples"):
        build(LongTailConfig(out=str(tmp_path / "d"), imbalance_factor=1000))
    assert os.listdir(tmp_path) == []


def test_a_split_without_some_class_is_refused_before_anything_is_written(tmp_path):
    """An empty pool gave an all-NaN summary; a class missing from D_val never moves its multiplier; one missing
    from the pool drops out of CovGap. Each is refused, naming the split, the classes and the flag."""
    tar = write_newsgroups(tmp_path / "src")  # 2 test documents per class
    cfg = dict(dataset="newsgroups", data_root=str(tar), imbalance_factor=2, n_max=2, vocab_min_count=1)
    with pytest.raises(ValueError, match=r"the pool split \(the rest of the official test split\) would hold no "
                                         r"example of class 'alt.atheism' \(index 0\), .* \(3 of 3 classes\); use a "
                                         r"smaller val_fraction \(--val-fraction\)"):
        build(LongTailConfig(out=str(tmp_path / "a"), val_fraction=0.9, **cfg))
    with pytest.raises(ValueError, match=r"the val split .* use a larger val_fraction"):
        build(LongTailConfig(out=str(tmp_path / "b"), val_fraction=0.2, **cfg))
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_load_errors_name_the_file(tmp_path):
    s = build(LongTailConfig(out=str(tmp_path / "d"), imbalance_factor=10))
    os.remove(s.files("pool")[0])
    with pytest.raises(FileNotFoundError, match=r"split file not found: .*pool/part-00000.parquet"):
        load(s.root)
    (s.root / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest.json: unreadable manifest"):
        load(s.root)
    (s.root / "manifest.json").write_text(json.dumps({"dataset": "x"}))
    with pytest.raises(ManifestError, match=r"manifest.json: missing key\(s\) classes"):
        load(s.root)
    os.remove(s.root / "manifest.json")
    with pytest.raises(FileNotFoundError, match=r"manifest not found: .*manifest.json"):
        load(s.root)


# ----------------------------------------------------------------------------------------------------------
# Every official format through the build


def test_mnist_build_exact_rows(tmp_path):
    arrays = write_mnist(tmp_path / "src", n_train=(9, 8) + (6,) * 8, n_test=(5,) * 10)
    s = build(LongTailConfig(dataset="mnist", data_root=str(tmp_path / "src"), out=str(tmp_path / "o"),
                             imbalance_factor=2, val_fraction=0.4))
    # n_max = 9 would need floor(9 * 2^(-2/9)) = 7 of class 2, which has 6: the default n_max is 8
    assert s.train_counts == [8, 7, 6, 6, 5, 5, 5, 4, 4, 4] and s.manifest["n_max"] == 8
    assert s.manifest["counts"]["val"] == [2] * 10 and s.manifest["counts"]["pool"] == [3] * 10
    x, y = arrays["train"]
    t = s.read_table("train")
    for sid, lab, px in zip(t["sample_id"].to_pylist(), t["label"].to_pylist(), t["pixels"].to_pylist()):
        assert y[sid] == lab and px == x[sid].tobytes()
    for k, c in enumerate(s.train_counts):  # first n_k of each class in file order
        assert [i for i in t["sample_id"].to_pylist() if y[i] == k] == list(np.flatnonzero(y == k)[:c])
    assert set(s.manifest["checksums"]["sources"]) == {str(p.resolve()) for p in (tmp_path / "src").iterdir()}


def test_mnist_truncated_file_writes_nothing(tmp_path):
    write_mnist(tmp_path / "src")
    p = tmp_path / "src" / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(SourceError, match="train-images-idx3-ubyte.gz: truncated"):
        build(LongTailConfig(dataset="mnist", data_root=str(tmp_path / "src"), out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_cifar10_build(tmp_path):
    write_cifar10(tmp_path / "src", per_batch=20, n_test=30)
    s = build(LongTailConfig(dataset="cifar10", data_root=str(tmp_path / "src"), out=str(tmp_path / "o"),
                             imbalance_factor=4, n_max=8))
    assert s.train_counts == [8, 4, 2] and s.classes == ["cat", "dog", "emu"]
    assert s.manifest["model_family"] == "cifar_resnet" and s.payload["shape"] == [32, 32, 3]
    assert len(s.manifest["checksums"]["sources"]) == 7  # 5 train batches, the test batch, batches.meta
    assert min(s.read_table("pool")["sample_id"].to_pylist()) >= 100


def test_imagenet_lt_lists_build(tmp_path):
    write_imagefolder(tmp_path)
    lists = write_lt_lists(tmp_path)
    s = build(LongTailConfig(dataset="imagefolder", data_root=str(tmp_path), out=str(tmp_path / "o"),
                             profile="lists", train_list=str(lists["train"]), val_list=str(lists["val"]),
                             test_list=str(lists["test"])))
    assert s.manifest["counts"] == {"train": [2, 1, 1], "val": [1, 1, 1], "pool": [2, 1, 1]}
    assert s.manifest["imbalance_factor"] == 2.0 and s.manifest["profile"] == "lists"
    assert s.read_table("train")["path"].to_pylist() == [  # rows in list order, nothing re-sampled
        "train/n01/n01_0002.JPEG", "train/n01/n01_0000.JPEG", "train/n02/n02_0003.JPEG", "train/n03/n03_0001.JPEG"]
    assert s.payload == {"kind": "image", "column": "image", "shape": [5, 6, 3], "channels": 3, "format": "jpeg",
                         "mode": "RGB"}
    assert s.manifest["model_family"] == "cifar_resnet"
    assert str(lists["train"].resolve()) in s.manifest["checksums"]["sources"]


def test_imagefolder_exponential_and_corrupt_jpeg(tmp_path, caplog):
    src = write_imagefolder(tmp_path / "src", train=(4, 3, 2))
    bad = src / "train" / "n02" / "n02_0001.JPEG"
    bad.write_bytes(jpeg_bytes(99)[:60])  # truncated JPEG
    cfg = dict(dataset="imagefolder", data_root=str(src), imbalance_factor=2, n_max=3, val_fraction=0.5)
    with pytest.raises(SourceError, match=r"corrupt image .*train/n02/n02_0001.JPEG .*on_corrupt='skip'"):
        build(LongTailConfig(out=str(tmp_path / "fail"), **cfg))
    assert not (tmp_path / "fail").exists()
    with caplog.at_level(logging.WARNING, logger="stages.longtail"):
        s = build(LongTailConfig(out=str(tmp_path / "skip"), on_corrupt="skip", **cfg))
    assert "skipped 1 corrupt image" in caplog.text
    assert s.manifest["planned_counts"]["train"] == [3, 2, 1] and s.train_counts == [3, 1, 1]
    assert [d["where"].endswith("n02_0001.JPEG") for d in s.manifest["skipped"]] == [True]


def test_parquet_table_build(tmp_path):
    write_image_parquet(tmp_path / "src", n_train=30, n_test=15)
    s = build(LongTailConfig(dataset="parquet", data_root=str(tmp_path / "src"), out=str(tmp_path / "o"),
                             imbalance_factor=5, row_group_rows=4))
    assert s.train_counts == [10, 4, 2] and s.classes == ["a", "b", "c"]
    assert s.payload["format"] == "png" and s.read_table("train").column_names == ["sample_id", "label", "image"]
    assert pq.ParquetFile(s.files("train")[0]).metadata.num_row_groups == 4  # 16 rows in row groups of 4
    src_tab = pq.read_table(tmp_path / "src" / "train.parquet")
    t = s.read_table("train")
    assert t["image"].to_pylist() == [src_tab["image_jpeg"][i].as_py() for i in t["sample_id"].to_pylist()]


def test_newsgroups_build_vocab_fit_on_train_only(tmp_path):
    tar = write_newsgroups(tmp_path / "src")
    s = build(LongTailConfig(dataset="newsgroups", data_root=str(tar), out=str(tmp_path / "o"),
                             imbalance_factor=2, n_max=2, val_fraction=0.5, vocab_min_count=1))
    assert s.train_counts == [2, 1, 1] and s.manifest["model_family"] == "text"
    vocab = s.vocab
    assert "unseenword" not in vocab and "zeus" in vocab and "moon" in vocab  # headers kept by default
    assert s.payload["vocab_size"] == len(vocab) + 2
    assert s.manifest["counts"]["val"] == [1, 1, 1] and s.manifest["counts"]["pool"] == [1, 1, 1]
    assert s.read_table("pool").column_names == ["sample_id", "label", "text", "tokens", "path"]
    all_test = {r["text"]: r["tokens"] for k in ("val", "pool") for r in s.read_table(k).to_pylist()}
    toks = all_test["From: g\n\nzeus unseenword"]
    index = {w: i + 2 for i, w in enumerate(vocab)}
    assert toks == [index["from"], index["zeus"], 1]  # "g" is one character: not a token; unknown -> 1
    assert s.read_table("train").schema.field("tokens").type.value_type == pa.int32()


# ----------------------------------------------------------------------------------------------------------
# Real data (skips without ../shared/data)


@pytest.mark.realdata
def test_real_cifar10_lt_and_mnist_counts(shared_data, tmp_path):
    cifar = shared_data / "cifar10-jpeg"
    p = plan(LongTailConfig(dataset="parquet", data_root=str(cifar), out="unused", imbalance_factor=100))
    assert p.manifest["counts"]["train"] == CIFAR10_LT_100 and sum(CIFAR10_LT_100) == 12406
    assert p.manifest["counts"]["val"] == [200] * 10 and p.manifest["counts"]["pool"] == [800] * 10
    p10 = plan(LongTailConfig(dataset="parquet", data_root=str(cifar), out="unused", imbalance_factor=10))
    assert sum(p10.manifest["counts"]["train"]) == 20431
    m = plan(LongTailConfig(dataset="mnist", data_root=str(shared_data / "mnist"), out="unused", imbalance_factor=1))
    assert m.manifest["available"] == {"train": MNIST_TRAIN, "test": MNIST_TEST}
    assert [v + q for v, q in zip(m.manifest["counts"]["val"], m.manifest["counts"]["pool"])] == MNIST_TEST
    assert m.manifest["counts"]["train"] == [5421] * 10  # balanced at the smallest class
    s = build(LongTailConfig(dataset="mnist", data_root=str(shared_data / "mnist"), out=str(tmp_path / "m"),
                             imbalance_factor=100))
    assert s.train_counts == longtail.exponential_counts(5923, 10, 100)
    assert s.read_table("train").num_rows == sum(s.train_counts)


def test_image_folder_listing_is_stat_once_and_cached_per_folder(tmp_path, monkeypatch):
    """Each image is stat'ed once per plan (not twice), and not at all on a rerun whose folders did not change:
    only the folders are (their modification time keys the cache). A file added to one class folder re-lists
    that folder alone and changes the source's digest."""
    from stages.sources import listing

    monkeypatch.setenv("CACT_CACHE_DIR", str(tmp_path / "cache"))
    root = write_imagefolder(tmp_path / "src")  # 9 train + 6 val images in 6 class folders
    calls = []
    real = listing._stat
    monkeypatch.setattr(listing, "_stat", lambda p: calls.append(Path(p)) or real(p))
    cfg = LongTailConfig(dataset="imagefolder", data_root=str(root), out=str(tmp_path / "o"), imbalance_factor=2,
                         val_fraction=0.5)
    first = plan(cfg).manifest["checksums"]["sources"]
    images = [p for p in calls if p.suffix == ".JPEG"]
    assert len(images) == len(set(images)) == 15
    calls.clear()
    assert plan(cfg).manifest["checksums"]["sources"] == first
    assert sorted(p.relative_to(root).as_posix() for p in calls) == [
        f"{s}/{c}" for s in ("train", "val") for c in ("n01", "n02", "n03")]  # folders only
    calls.clear()
    (root / "val" / "n02" / "n02_0009.JPEG").write_bytes(jpeg_bytes(99))
    assert plan(cfg).manifest["checksums"]["sources"] != first
    assert sum(p.suffix == ".JPEG" for p in calls) == 3  # val/n02 only: its 2 images and the new one


def test_a_list_naming_missing_images_is_refused_naming_them(tmp_path, monkeypatch):
    monkeypatch.setenv("CACT_CACHE_DIR", str(tmp_path / "cache"))
    root = write_imagefolder(tmp_path / "src")
    lists = write_lt_lists(root)
    cfg = LongTailConfig(dataset="imagefolder", data_root=str(root), out=str(tmp_path / "o"), profile="lists",
                         train_list=str(lists["train"]), val_list=str(lists["val"]), test_list=str(lists["test"]))
    plan(cfg)  # fills the cache
    (root / "train" / "n02" / "n02_0003.JPEG").unlink()
    with pytest.raises(FileNotFoundError, match=r"ImageNet_LT_train.txt: 1 listed file\(s\) missing under .*src, "
                                                r"e.g. train/n02/n02_0003.JPEG"):
        plan(cfg)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("field", ["data_root", "train_list"])
def test_a_uri_for_a_dataset_file_is_refused_naming_the_field_and_nothing_is_written(tmp_path, monkeypatch, field):
    """A dataset's files are read from a local or mounted path (split and run folders may be URIs): pathlib would
    turn s3://bucket/x into a local folder named "s3:", so it is refused up front."""
    monkeypatch.chdir(tmp_path)
    cfg = {"out": str(tmp_path / "o"), "dataset": "imagefolder", "data_root": str(tmp_path)}
    cfg[field] = "s3://bucket/x"
    with pytest.raises(ValueError, match=rf"^{field}='s3://bucket/x' is a URI: .* a path every node mounts"):
        build(LongTailConfig(**cfg))
    assert os.listdir(tmp_path) == []


_SLOW_BUILD = """
import sys, time
sys.path.insert(0, {repo!r})
from stages import longtail, shards
real = shards.ShardWriter.write
def slow(self, split, index):
    time.sleep(0.2)
    return real(self, split, index)
shards.ShardWriter.write = slow
longtail.build(longtail.LongTailConfig(out={out!r}, imbalance_factor=10, shard_rows=64, executor="local"))
"""


def test_a_build_killed_mid_way_resumes_and_gives_the_same_files(tmp_path):
    """SIGKILL while shards are being written (no exception handler runs), then the same build again: it writes
    only the shards without a record and ends with the files of an uninterrupted build."""
    import signal
    import subprocess
    import sys
    import time

    repo = str(Path(__file__).resolve().parents[2])
    out = tmp_path / "d"
    records = tmp_path / ".d.records"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD.format(repo=repo, out=str(out))],
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(records.glob("*.json"))) < 6 and time.monotonic() < deadline:  # plan.json + 5 shards
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(records.glob("*-*.json")))
    assert 5 <= done < 21 and not out.exists(), done
    fresh = build(LongTailConfig(out=str(tmp_path / "fresh"), imbalance_factor=10, shard_rows=64, executor="local"))
    resumed = build(LongTailConfig(out=str(out), imbalance_factor=10, shard_rows=64, executor="local"))
    assert tree(resumed.root) == tree(fresh.root)
    assert not records.exists() and not (tmp_path / ".d.partial").exists()
