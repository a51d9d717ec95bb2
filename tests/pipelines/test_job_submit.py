"""Issue 6: ``ray job submit --working-dir . -- python pipelines/imagenet_lt.py ...`` against a running cluster.

The test starts its own head node (``ray start --head --block`` on free ports with its own temp dir, see
``_ray_head.py``), submits the ImageFolder pipeline on a tiny generated tree through the jobs CLI, waits for
SUCCEEDED and checks the run folder, which the job writes to an object store (``--out s3://...``, the test's
in-process S3 server), as on a cluster without a shared filesystem. It does not use the session
``ray_cluster`` fixture and never calls ``ray stop``: it stops exactly the processes of the cluster it started.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from ._ray_head import RayHead

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("ant", "bee", "cat")


def _write_tree(root: Path, n_train: int = 30, n_val: int = 30, side: int = 16) -> Path:
    """root/{train,val}/<class>/*.png: each class a different mean colour plus noise (learnable)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for k, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            base = np.zeros(3)
            base[k] = 180
            for i in range(n):
                img = np.clip(base + rng.normal(40, 30, (side, side, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{cls}_{i:03d}.png")
    return root


@pytest.mark.ray
def test_job_submit_imagenet_lt(tmp_path, s3_uri):
    from stages import _io
    from stages.storage import as_path

    data = _write_tree(tmp_path / "data")
    out = as_path(s3_uri)
    sid = f"cact-test-{uuid.uuid4().hex[:12]}"
    t0 = time.monotonic()
    head = RayHead(num_cpus=2, log_path=tmp_path / "ray-start.log")
    try:
        head.start(timeout=120)  # 3-10 s on a quiet machine, 50 s seen under heavy load
        t_up = time.monotonic() - t0
        sub = head.cli(
            "job", "submit", "--address", head.dashboard_url, "--working-dir", str(REPO),
            "--submission-id", sid, "--no-wait", "--",
            "python", "pipelines/imagenet_lt.py", "--data-root", str(data), "--imbalance-factor", "2",
            "--val-fraction", "0.4", "--train-alpha", "0.2",
            "--image-size", "16", "--model", "small_cnn", "--methods", "ce,cact", "--epochs", "1",
            "--finetune-epochs", "1", "--batch-size", "32", "--n-splits", "2", "--alpha", "0.2",
            "--out", str(out), timeout=120)
        t_submit = time.monotonic() - t0 - t_up
        assert sub.returncode == 0, f"ray job submit failed ({sub.returncode}):\n{sub.stdout}\n{sub.stderr}"
        info = head.wait_job(sid, timeout=480)  # about 90 s on a quiet machine; 250 s seen under heavy load
        status = info.get("status")
        if status != "SUCCEEDED":
            pytest.fail(f"job {sid} ended {status!r} ({info.get('message')}); logs:\n{head.job_logs(sid)[-8000:]}")
        t_job = time.monotonic() - t0 - t_up

        logs = head.job_logs(sid)
        (tmp_path / "job.log").write_text(logs)

        # The upload honoured .gitignore: the code is there, the virtual environment (GBs) and runs/ are not.
        pkgs = [p for p in Path(head.temp_dir).glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
                if p.is_dir()]
        assert len(pkgs) == 1, pkgs
        assert (pkgs[0] / "pipelines" / "imagenet_lt.py").is_file()
        assert not (pkgs[0] / ".venv").exists() and not (pkgs[0] / "runs").exists()

        summary_path = out / "eval" / "summary.parquet"
        assert summary_path.is_file(), head.job_logs(sid)[-4000:]
        summary = _io.read_frame(summary_path)
        assert set(summary["method"].unique()) == {"ce", "cact"}
        assert set(summary["alpha"].unique()) == {0.2}
        assert (out / "report.md").is_file()
        assert (out / "train" / "cact" / "history.parquet").is_file()
        assert (out / "train" / "ce" / "history.parquet").is_file()
        stages = [line for line in logs.splitlines() if line.startswith("== ")]
        print(f"\nhead node up in {t_up:.1f}s, ray job submit {t_submit:.1f}s, job {sid} SUCCEEDED "
              f"{t_job:.1f}s after the head was up; "
              f"stages:\n" + "\n".join(stages))
    finally:
        t_stop = time.monotonic()
        leftover = head.stop()
        t_stop = time.monotonic() - t_stop
        remaining = head.remaining_pids()
        head.cleanup()
    assert not remaining, f"processes of the test's Ray cluster still alive after stop: {remaining}"
    print(f"stopped in {t_stop:.1f}s, {time.monotonic() - t0:.1f}s in all; SIGKILLed stragglers: {leftover}")
