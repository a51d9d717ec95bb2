"""A pipeline killed at any point continues: the digits pipeline's driver is killed (SIGKILL, the whole process
group) at a random point of each stage in turn (splits, training, inference, evaluation), each time rerun with the
same command, and the last rerun's summary equals, byte for byte, that of an unbroken run. Nothing of a killed
run stays alive on the cluster (its Ray Train controller, workers, dual coordinator and inference actors)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "pipelines" / "digits_lt.py"
ARGV = ["--methods", "ce,cact", "--epochs", "30", "--finetune-epochs", "3", "--n-splits", "3", "--alpha", "0.1"]
# Ray process titles of a pipeline's own work (a killed driver's must not outlive it)
RUN_PROCESSES = ("ray::TrainController", "ray::RayTrainWorker", "ray::DualCoordinator", "ray::MapWorker",
                 "ray::_MapWorker", "ray::LogitsPredictor")


def _registered_checkpoints(storage: Path) -> int:
    """Checkpoints Ray Train's controller has committed (its checkpoint_manager_snapshot.json), 0 if none yet."""
    n = 0
    for snap in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            n += len(json.loads(snap.read_text()).get("checkpoint_results", []))
        except (OSError, ValueError):  # being written
            pass
    return n


def _run_processes() -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text.startswith(RUN_PROCESSES):
            found.append(text[:80])
    return found


class _Driver:
    """The pipeline as a subprocess on the test's Ray cluster, its output read line by line."""

    def __init__(self, out: Path, env: dict):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), *ARGV], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)

    def wait_for(self, text: str, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise AssertionError(f"the pipeline ended (rc {self.proc.returncode}) before {text!r}:\n"
                                     + "".join(self.lines[-40:]))
            self.lines.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} within {timeout} s:\n" + "".join(self.lines[-40:]))

    def kill(self) -> None:
        assert self.proc.poll() is None, "the pipeline finished before it could be killed:\n" + "".join(self.lines)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def finish(self, timeout: float = 300) -> str:
        rest, _ = self.proc.communicate(timeout=timeout)
        text = "".join(self.lines) + rest
        assert self.proc.returncode == 0, text[-4000:]
        return text


def test_a_pipeline_killed_in_every_stage_in_turn_finishes_with_the_unbroken_summary(ray_cluster, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT)}
    rng = random.Random(0)
    killed = tmp_path / "killed"
    # splits: killed while the split build runs (or right after it)
    d = _Driver(killed, env)
    d.wait_for("== ray ready")
    time.sleep(rng.uniform(0, 0.5))
    d.kill()
    # training: killed once Ray Train has committed a checkpoint of the CE backbone (a folder on disk may not be
    # resumable yet: the controller polls the workers' reports every 2 s)
    d = _Driver(killed, env)
    d.wait_for("== long-tailed splits")
    deadline = time.time() + 180
    while time.time() < deadline and not _registered_checkpoints(killed / "ray_storage"):
        time.sleep(0.2)
    time.sleep(rng.uniform(0, 0.5))
    d.kill()
    assert not (killed / "train" / "ce" / "model.pt").exists(), "the CE backbone finished before the kill"
    # inference, then evaluation
    d = _Driver(killed, env)
    d.wait_for("== training")
    resumed = "".join(d.lines)
    time.sleep(rng.uniform(0, 0.3))
    d.kill()
    d = _Driver(killed, env)
    d.wait_for("== inference")
    time.sleep(rng.uniform(0, 0.3))
    d.kill()
    printed = _Driver(killed, env).finish()
    # the interrupted CE backbone continued from its checkpoint instead of starting over
    assert "resumed from epoch" in resumed, resumed
    assert pl.read_parquet(killed / "train" / "ce" / "metrics.parquet")["epoch"].to_list() == list(range(30))
    assert "summary:" in printed
    unbroken = tmp_path / "unbroken"
    _Driver(unbroken, env).finish()
    for name in ("summary.parquet", "per_class.parquet", "per_split.parquet"):
        a, b = pl.read_parquet(killed / "eval" / name), pl.read_parquet(unbroken / "eval" / name)
        assert a.equals(b), name
    assert (killed / "eval" / "summary.csv").read_bytes() == (unbroken / "eval" / "summary.csv").read_bytes()
    deadline = time.time() + 30
    while _run_processes() and time.time() < deadline:
        time.sleep(0.5)
    assert not _run_processes(), _run_processes()
