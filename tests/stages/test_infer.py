"""Inference stage: Ray Data map_batches logits equal the model run directly; evaluate reads them end to end."""
from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cact_ops.models import build_model
from stages import evaluate as E
from stages import infer as I
from stages.payload import decode

K, SHAPE = 3, [8, 8, 1]
COUNTS = {"train": [20, 10, 5], "val": [6, 6, 6], "pool": [14, 14, 14]}
PAYLOAD = {"kind": "pixels", "column": "pixels", "shape": SHAPE}


def write_splits(root):
    """A split folder by hand: pixels payload, shuffled rows, the manifest keys stages.longtail.load checks."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    next_id = 0
    for split, counts in COUNTS.items():
        labels = np.repeat(np.arange(K), counts)
        n = len(labels)
        ids = next_id + rng.permutation(n)  # not sorted: the logits files must come out sorted
        next_id += n
        pixels = [rng.integers(0, 256, size=int(np.prod(SHAPE)), dtype=np.uint8).tobytes() for _ in range(n)]
        pq.write_table(pa.table({"sample_id": pa.array(ids, pa.int64()), "label": pa.array(labels, pa.int64()),
                                 "pixels": pa.array(pixels, pa.binary())}), root / f"{split}.parquet")
    manifest = {"dataset": "toy", "classes": ["a", "b", "c"], "num_classes": K, "profile": "exponential",
                "counts": COUNTS, "payload": PAYLOAD, "model_family": "small_cnn", "checksums": {},
                "files": {s: f"{s}.parquet" for s in COUNTS}}
    (root / "manifest.json").write_text(json.dumps(manifest))


def save_model(path, seed):
    torch.manual_seed(seed)
    spec = {"family": "small_cnn", "num_classes": K, "kwargs": {"in_channels": 1}}
    model = build_model(spec["family"], spec["num_classes"], **spec["kwargs"])
    path.parent.mkdir(parents=True)
    torch.save({"model_spec": spec, "model": model.state_dict(), "image_size": None}, path)
    return model.eval()


@pytest.mark.ray
@pytest.mark.parametrize("local_max_bytes", [0, 64 << 20], ids=["ray-data", "in-process"])
def test_infer_matches_direct_model_and_feeds_evaluate(tmp_path, ray_cluster, caplog, local_max_bytes):
    """Both paths (Ray Data actors; the same predictor in this process for small splits) write these logits.

    The Ray Data pass runs with 0.5 of the test cluster's 2 CPUs held (a finished stage's leftovers, another
    job): sized for an idle cluster (an actor of 1 CPU beside Ray Data's own file-listing task of 1) it would
    never start; it shrinks its actor to what is free."""
    import logging

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    run = tmp_path / "run"
    write_splits(run / "splits")
    models = {m: save_model(run / "train" / m / "model.pt", seed) for seed, m in enumerate(("cact", "ce"))}
    # An earlier test's actors are released asynchronously (the shared cluster): start from an idle cluster, so
    # that exactly the 0.5 CPUs held below are missing
    total, deadline = ray.cluster_resources().get("CPU", 0.0), time.time() + 60
    while ray.available_resources().get("CPU", 0.0) < total and time.time() < deadline:
        time.sleep(0.2)
    busy = placement_group([{"CPU": 0.5}])
    ray.get(busy.ready(), timeout=60)
    try:
        with caplog.at_level(logging.INFO, logger="stages.infer"):
            res = I.run(I.InferConfig(run, batch_size=16, local_max_bytes=local_max_bytes))
    finally:
        remove_placement_group(busy)
    if local_max_bytes == 0:
        assert "1 model actor(s) x 0.5 CPUs" in caplog.text
    assert list(res.paths) == ["ce", "cact"]  # canonical order
    assert res.rows == {"val": 18, "pool": 42}
    for m, model in models.items():
        for split in ("val", "pool"):
            path = res.paths[m][split]
            assert path == run / "logits" / m / f"{split}.parquet"
            got = pq.read_table(path)
            assert got.schema.field("logits").type == pa.list_(pa.float32(), K)
            ids = got.column("sample_id").to_numpy()
            assert (np.diff(ids) > 0).all()
            src = pq.read_table(run / "splits" / f"{split}.parquet")
            src = src.take(np.argsort(src.column("sample_id").to_numpy()))
            assert np.array_equal(ids, src.column("sample_id").to_numpy())
            assert np.array_equal(got.column("label").to_numpy(), src.column("label").to_numpy())
            with torch.no_grad():
                want = model(decode(src, PAYLOAD)).numpy()
            logits = np.asarray(got.column("logits").combine_chunks().flatten()).reshape(-1, K)
            np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
        info = json.loads((run / "logits" / m / "manifest.json").read_text())
        assert info["split_files"]["pool"]["rows"] == 42 and len(info["model_sha256"]) == 64
    ev = E.run(E.EvalConfig(run, n_splits=2, alphas=(0.2,), scores=("lac",), report=False))
    assert ev.summary["method"].to_list() == ["ce", "ce", "cact", "cact"]


@pytest.mark.ray
def test_infer_runs_in_the_driver_when_too_few_cpus_are_free(tmp_path, ray_cluster, caplog):
    """With 1.5 of the 2 CPUs held no Ray Data pass fits (its listing task alone needs one): the driver runs
    it, and says so."""
    import logging

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    run = tmp_path / "run"
    write_splits(run / "splits")
    save_model(run / "train" / "ce" / "model.pt", 0)
    busy = placement_group([{"CPU": 1.5}])
    ray.get(busy.ready(), timeout=60)
    try:
        with caplog.at_level(logging.INFO, logger="stages.infer"):
            res = I.run(I.InferConfig(run, local_max_bytes=0))
    finally:
        remove_placement_group(busy)
    assert res.rows == {"val": 18, "pool": 42} and "it runs in this process" in caplog.text


def test_infer_needs_models(tmp_path):
    write_splits(tmp_path / "run" / "splits")
    with pytest.raises(FileNotFoundError, match="no trained model"):
        I.run(I.InferConfig(tmp_path / "run"))
