"""Frozen features: the stage writes a split folder of penultimate features that train, infer and evaluate read;
the feature is the input of the model's last nn.Linear; reuse and refusal of the output folder."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cact_ops.models import Head, TfidfMLP, build_model, last_linear, penultimate_features
from stages import features as F
from stages import longtail
from stages.payload import decode, inverse_document_frequency, read_split_tensors

from .test_infer import PAYLOAD, save_model, write_splits


def _extract(tmp_path, local_max_bytes, **kw):
    write_splits(tmp_path / "splits")
    model = save_model(tmp_path / "train" / "ce" / "model.pt", seed=0)
    cfg = F.FeatureConfig(splits_root=tmp_path / "splits", out=tmp_path / "features", batch_size=8,
                          local_max_bytes=local_max_bytes, model=tmp_path / "train" / "ce" / "model.pt", **kw)
    return model, F.extract(cfg), cfg


def _check_features(tmp_path, model, feats):
    src = longtail.load(tmp_path / "splits")
    dim = last_linear(model).in_features
    assert feats.payload == {"kind": "features", "column": "features", "dim": dim, "shape": None}
    assert feats.manifest["model_family"] == "head" and feats.manifest["counts"] == src.manifest["counts"]
    for split in ("train", "val", "pool"):
        table = pq.read_table(src.path(split))
        got = feats.read_table(split)
        # the source's rows in the source's order
        assert got.column("sample_id").to_pylist() == table.column("sample_id").to_pylist()
        assert got.column("label").to_pylist() == table.column("label").to_pylist()
        want, _ = penultimate_features(model, decode(table, PAYLOAD))
        np.testing.assert_allclose(decode(got, feats.payload).numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    # the features reproduce the model's logits through its last layer
    x, _ = read_split_tensors(feats, "pool")
    with torch.no_grad():
        np.testing.assert_allclose(last_linear(model)(x).numpy(),
                                   model(decode(pq.read_table(src.path("pool")), PAYLOAD)).numpy(), rtol=1e-4,
                                   atol=1e-5)


def test_extract_in_process_writes_a_feature_split_folder(tmp_path):
    model, feats, cfg = _extract(tmp_path, local_max_bytes=64 << 20)
    _check_features(tmp_path, model, feats)
    info = feats.manifest["features_from"]
    assert info["model"] == str(cfg.model) and len(info["model_sha256"]) == 64
    # same inputs: reused as is; another model: refused, nothing overwritten
    before = (tmp_path / "features" / "train.parquet").stat().st_mtime_ns
    assert F.extract(cfg).root == feats.root
    assert (tmp_path / "features" / "train.parquet").stat().st_mtime_ns == before
    save_model(tmp_path / "other" / "model.pt", seed=1)
    with pytest.raises(FileExistsError, match="features of another model"):
        F.extract(F.FeatureConfig(splits_root=tmp_path / "splits", out=tmp_path / "features",
                                  model=tmp_path / "other" / "model.pt"))
    assert (tmp_path / "features" / "train.parquet").stat().st_mtime_ns == before
    # a run folder moved elsewhere keeps its features: paths are not compared, contents are (SHA-256)
    import shutil

    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("splits", "features", "train"):
        shutil.copytree(tmp_path / name, moved / name)
    again = F.extract(F.FeatureConfig(splits_root=moved / "splits", out=moved / "features",
                                      model=moved / "train" / "ce" / "model.pt"))
    assert again.root == moved / "features" and again.manifest == feats.manifest


@pytest.mark.ray
def test_extract_through_ray_data_gives_the_same_features(tmp_path, ray_cluster):
    model, feats, _ = _extract(tmp_path, local_max_bytes=0)
    _check_features(tmp_path, model, feats)


def test_a_user_model_object_and_bad_inputs(tmp_path):
    write_splits(tmp_path / "splits")
    torch.manual_seed(0)
    mine = build_model("small_cnn", 3, in_channels=1).eval()
    feats = F.extract(F.FeatureConfig(splits_root=tmp_path / "splits", out=tmp_path / "f"), model=mine)
    assert feats.payload["dim"] == 128 and feats.manifest["features_from"]["model"].endswith("SmallCNN")
    with pytest.raises(ValueError, match="exactly one"):
        F.extract(F.FeatureConfig(splits_root=tmp_path / "splits", out=tmp_path / "g"))
    with pytest.raises(FileNotFoundError, match="FeatureConfig.model"):
        F.extract(F.FeatureConfig(splits_root=tmp_path / "splits", out=tmp_path / "g", model=tmp_path / "no.pt"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="no manifest.json"):
        F.extract(F.FeatureConfig(splits_root=tmp_path / "splits", out=tmp_path / "busy"), model=mine)
    assert (tmp_path / "busy" / "mine.txt").read_text() == "user file"
    with pytest.raises(ValueError, match="no nn.Linear"):
        penultimate_features(torch.nn.Conv2d(1, 2, 3), torch.zeros(1, 1, 4, 4))


def test_head_and_tfidf_models():
    h = Head(4, 6, hidden=0)
    assert last_linear(h) is h.fc and h(torch.zeros(3, 6)).shape == (3, 4)
    idf = [0.0, 0.0, 1.0, 2.0, 3.0]
    m = TfidfMLP(2, idf=idf, hidden=4).eval()
    tokens = torch.tensor([[2, 3, 3, 0, 0], [4, 1, 0, 0, 0]])
    tfidf = m.tfidf(tokens)
    # scikit-learn's sublinear tf-idf: (1 + ln count) * idf, rows L2-normalised; padding and unknown ids weigh 0
    row0 = torch.tensor([0, 0, 1.0, (1 + float(np.log(2))) * 2, 0])
    torch.testing.assert_close(tfidf[0], row0 / row0.norm())
    torch.testing.assert_close(tfidf[1], torch.tensor([0, 0, 0, 0, 1.0]))
    f, z = penultimate_features(m, tokens)
    assert f.shape == (2, 4) and z.shape == (2, 2)


def test_inverse_document_frequency_formula(tmp_path):
    import pyarrow as pa

    root = tmp_path / "s"
    root.mkdir()
    docs = {"train": [[2, 3], [2], [4, 4, 2]], "val": [[5]], "pool": [[5, 5]]}
    for split, rows in docs.items():
        pq.write_table(pa.table({"sample_id": pa.array(range(len(rows)), pa.int64()),
                                 "label": pa.array([0] * len(rows), pa.int64()),
                                 "tokens": pa.array(rows, pa.list_(pa.int64()))}), root / f"{split}.parquet")
    manifest = {"dataset": "toy", "classes": ["a", "b"], "num_classes": 2, "profile": "exponential",
                "counts": {"train": [3, 0], "val": [1, 0], "pool": [1, 0]}, "checksums": {},
                "payload": {"kind": "tokens", "column": "tokens", "vocab_size": 6},
                "files": {s: f"{s}.parquet" for s in docs}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    idf = inverse_document_frequency(longtail.load(root))
    n = 3
    df = [0, 0, 3, 1, 1, 0]  # id 5 appears only outside the training split: df 0
    np.testing.assert_allclose(idf, [np.log((1 + n) / (1 + d)) + 1 for d in df])
