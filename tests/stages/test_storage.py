"""Split and run folders at a URI (stages.storage, stages._io): the pathlib subset over pyarrow.fs, the atomic
contract on an object store, and the errors before any work when a URI cannot be reached or written. The S3
tests use an in-process S3 server (moto); the write-permission case a read-only fsspec filesystem."""
from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from stages import _io
from stages.storage import UriPath, as_path


def test_a_uri_path_reads_writes_and_lists_like_a_local_one(s3_uri):
    root = as_path(s3_uri)
    assert isinstance(root, UriPath) and not root.exists()
    (root / "train" / "cact" / "config.json").write_text("{}")
    (root / "report.md").write_text("# r")
    assert root.is_dir() and (root / "report.md").is_file() and not (root / "train").is_file()
    assert [p.name for p in root.iterdir()] == ["report.md", "train"]
    assert [p.parent.name for p in root.glob("train/*/config.json")] == ["cact"]
    assert [p.parent.name for p in (root / "train").glob("*/config.json")] == ["cact"]
    assert (root / "report.md").read_text() == "# r" and (root / "report.md").stat().st_size == 3
    assert (root / "train" / "cact" / "config.json").relative_to(root).as_posix() == "train/cact/config.json"
    assert str(root / "x").startswith(s3_uri.split("?")[0] + "/x?endpoint_override=")
    with pytest.raises(TypeError, match="is a URI"):
        open(root / "report.md")  # noqa: SIM115 - a local open of a URI fails loudly, not as a file named s3:
    with pytest.raises(FileNotFoundError, match="missing"):
        (root / "missing").read_bytes()


def test_atomic_writes_to_an_object_store_replace_whole_and_commit_a_folder_by_its_manifest(s3_uri):
    root = as_path(s3_uri)
    table = pa.table({"x": [1, 2, 3]})
    assert _io.read_parquet(_io.write_parquet(table, root / "t.parquet")).equals(table)
    _io.write_json({"a": 1}, root / "a.json")
    _io.write_json({"a": 2}, root / "a.json")
    assert json.loads((root / "a.json").read_text()) == {"a": 2}
    with _io.atomic_path(root / "folder") as tmp:
        tmp.mkdir()
        for name in ("manifest.json", "part-0.parquet", "part-1.parquet"):
            (tmp / name).write_text(name)
    assert sorted(p.name for p in (root / "folder").iterdir()) == ["manifest.json", "part-0.parquet",
                                                                 "part-1.parquet"]
    # the replacement holds one part: the old second part does not survive beside the new manifest
    with _io.atomic_path(root / "folder") as tmp:
        tmp.mkdir()
        (tmp / "part-0.parquet").write_text("new")
        (tmp / "manifest.json").write_text("new")
    assert sorted(p.name for p in (root / "folder").iterdir()) == ["manifest.json", "part-0.parquet"]
    # a failed write leaves the old content
    with pytest.raises(RuntimeError), _io.atomic_path(root / "a.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert json.loads((root / "a.json").read_text()) == {"a": 2}


def test_a_run_folder_at_a_uri_is_claimed_and_a_foreign_one_refused(s3_uri):
    root = as_path(s3_uri)
    assert _io.claim_run_folder(s3_uri) == root and _io.is_run_folder(root)
    assert _io.claim_run_folder(s3_uri) == root  # ours: reused
    foreign = root.parent / (root.name + "-foreign")
    (foreign / "data.csv").write_text("1,2")
    with pytest.raises(FileExistsError, match="not created by CaCT"):
        _io.claim_run_folder(foreign)
    assert (foreign / "data.csv").read_text() == "1,2" and not (foreign / _io.RUN_MARKER).exists()


def test_an_unreachable_uri_is_refused_naming_it(tmp_path, monkeypatch):
    from stages import longtail

    monkeypatch.chdir(tmp_path)  # nothing local is made of the URI (pathlib would make a folder named s3:)
    # (the client retries for a few seconds; a pipeline's claim of its run folder wraps the same error)
    uri = "s3://cact-test/splits?endpoint_override=127.0.0.1:9&scheme=http"
    with pytest.raises(OSError, match=r"^s3://cact-test/splits\?endpoint_override=127.0.0.1:9&scheme=http: .*"):
        longtail.build(longtail.LongTailConfig(out=uri, imbalance_factor=10))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match=r"run folder s3://cact-test/run\?colour=red.*Unexpected query parameter"):
        _io.claim_run_folder("s3://cact-test/run?colour=red")


class _ReadOnlyMemory(MemoryFileSystem):
    """A bucket the credentials may read but not write."""

    protocol = "cactro"

    def _open(self, path, mode="rb", **kwargs):
        if "r" not in mode:
            raise PermissionError(13, "Access Denied", path)
        return super()._open(path, mode=mode, **kwargs)

    def mkdir(self, path, *args, **kwargs):
        raise PermissionError(13, "Access Denied", path)

    makedirs = mkdir


def test_a_folder_without_write_permission_is_refused_before_anything_is_written():
    fsspec.register_implementation("cactro", _ReadOnlyMemory, clobber=True)
    with pytest.raises(OSError, match=r"run folder cactro://bucket/run.*cannot be read or written.*Access Denied"):
        _io.claim_run_folder("cactro://bucket/run")
    assert not _ReadOnlyMemory().exists("bucket/run")


def _objects(root: UriPath) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")}


def test_a_split_build_at_a_uri_resumes_and_equals_the_local_build_byte_for_byte(s3_uri, tmp_path, monkeypatch):
    from stages import longtail, splits
    from tests.stages.test_longtail import _crash_after

    cfg = dict(imbalance_factor=10, shard_rows=64, executor="local")  # 6 + 3 + 12 shards
    local = longtail.build(longtail.LongTailConfig(out=str(tmp_path / "local"), **cfg))
    out = as_path(s3_uri) / "splits"
    with monkeypatch.context() as m:
        _crash_after(m, 5)
        with pytest.raises(RuntimeError, match="simulated crash"):
            longtail.build(longtail.LongTailConfig(out=str(out), **cfg))
    assert not out.exists()  # nothing committed before the last shard
    with monkeypatch.context() as m:
        calls = _crash_after(m, 10**6)
        remote = longtail.build(longtail.LongTailConfig(out=str(out), **cfg))
    assert len(calls) == 21 - 5  # resumed with the missing shards only
    assert remote.root == out and [p.name for p in out.parent.iterdir()] == ["splits"]  # partial folders gone
    want = {p.relative_to(local.root).as_posix(): p.read_bytes() for p in local.root.rglob("*") if p.is_file()}
    assert _objects(out) == want
    again = splits.load(str(out))
    assert again.read_table("pool").equals(local.read_table("pool")) and again.digest("train") == local.digest("train")
    assert longtail.build(longtail.LongTailConfig(out=str(out), **cfg)).manifest == local.manifest  # reused
    (out / "val" / "part-00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"split file not found: s3://.*/splits/val/part-00001\.parquet"):
        splits.load(str(out))


def _upload_tree(local, dest: UriPath) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            (dest / p.relative_to(local).as_posix()).write_bytes(p.read_bytes())


@pytest.mark.ray
def test_ray_data_tasks_build_and_read_splits_at_a_uri(s3_uri, tmp_path, ray_cluster):
    """Ray Data tasks (other processes, on a cluster other nodes) write a build's shards and read a run's splits
    straight from the object store; both match the local results."""
    import numpy as np
    import pyarrow.parquet as pq

    from stages import infer, longtail
    from tests.stages.test_infer import save_model, write_splits

    cfg = dict(imbalance_factor=10, shard_rows=128, executor="ray", max_cpus=2)
    remote = longtail.build(longtail.LongTailConfig(out=str(as_path(s3_uri) / "splits"), **cfg))
    local = longtail.build(longtail.LongTailConfig(out=str(tmp_path / "splits"), **{**cfg, "executor": "local"}))
    assert remote.manifest["checksums"] == local.manifest["checksums"] and len(remote.files("pool")) == 6

    run = tmp_path / "run"
    write_splits(run / "splits")
    for seed, m in enumerate(("cact", "ce")):
        save_model(run / "train" / m / "model.pt", seed)
    run_uri = as_path(s3_uri) / "run"
    _upload_tree(run, run_uri)
    want = infer.run(infer.InferConfig(run))  # in this process
    got = infer.run(infer.InferConfig(str(run_uri), local_max_bytes=0))  # a Ray Data pass over the URIs
    assert got.rows == want.rows == {"val": 18, "pool": 42}
    for m in ("ce", "cact"):
        for split in ("val", "pool"):
            a, b = pq.read_table(want.paths[m][split]), _io.read_parquet(got.paths[m][split])
            assert a.column("sample_id").equals(b.column("sample_id"))
            np.testing.assert_allclose(np.stack(b.column("logits").to_numpy(zero_copy_only=False)),
                                       np.stack(a.column("logits").to_numpy(zero_copy_only=False)), rtol=1e-5,
                                       atol=1e-6)


def test_mlflow_logging_of_a_run_folder_at_a_uri_is_refused_naming_it():
    from stages import tracking

    with pytest.raises(ValueError, match=r"run_dir='s3://b/run' is a URI: MLflow logs local files"):
        tracking.log_run("s3://b/run", "file:/tmp/mlruns")
