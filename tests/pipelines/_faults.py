"""Fault injection for the pipeline tests: the digits pipeline as a subprocess whose driver is killed in every
stage in turn (tests/pipelines/test_digits_lt.py compares the outcome with its unbroken run)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from stages.train_worker import LOCAL_CHECKPOINT

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "pipelines" / "digits_lt.py"
# Ray process titles of a pipeline's own work (a killed driver's must not outlive it)
RUN_PROCESSES = ("ray::TrainController", "ray::RayTrainWorker", "ray::DualCoordinator", "ray::MapWorker",
                 "ray::_MapWorker", "ray::LogitsPredictor")


def _registered_checkpoints(storage: Path) -> int:
    """Checkpoints Ray Train's controller has committed (its checkpoint_manager_snapshot.json), or in local mode
    (num_workers=0) the run's own checkpoint files; 0 if none yet."""
    n = len(list(storage.glob(f"*/{LOCAL_CHECKPOINT}")))
    for snap in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            n += len(json.loads(snap.read_text()).get("checkpoint_results", []))
        except (OSError, ValueError):  # being written
            pass
    return n


def run_processes() -> dict[int, str]:
    """pid -> title of every live Ray process doing a pipeline's work."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text.startswith(RUN_PROCESSES):
            found[int(cmdline.parent.name)] = text[:60].strip()
    return found


class _Driver:
    """The pipeline as a subprocess on the test's Ray cluster, its output read line by line."""

    def __init__(self, argv: list[str], env: dict):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), *argv], cwd=ROOT, env=env,
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


def kill_in_every_stage(argv: list[str], out: Path, gcs_address: str, seed: int = 0) -> tuple[str, str]:
    """Run the digits pipeline with ``argv`` into ``out`` as a subprocess on the cluster at ``gcs_address``,
    SIGKILL its driver (the whole process group) at a random point of each stage in turn (splits; training once
    Ray Train has committed a checkpoint; inference; evaluation), rerunning the same command each time, then let
    a last rerun finish. Returns what the rerun after the training kill printed up to the end of training, and
    what the last rerun printed. Fails if a Ray process of the killed runs outlives them."""
    env = {**os.environ, "RAY_ADDRESS": gcs_address, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    argv = [*argv, "--out", str(out)]
    rng, before = random.Random(seed), set(run_processes())
    d = _Driver(argv, env)  # splits: killed while the split build runs (or right after it)
    d.wait_for("== ray ready")
    time.sleep(rng.uniform(0, 0.5))
    d.kill()
    d = _Driver(argv, env)  # training: a checkpoint on disk may not be resumable until the controller polls it
    d.wait_for("== long-tailed splits")
    deadline = time.time() + 180
    while time.time() < deadline and not _registered_checkpoints(out / "ray_storage"):
        time.sleep(0.2)
    time.sleep(rng.uniform(0, 0.5))
    d.kill()
    assert not (out / "train" / "ce" / "model.pt").exists(), "the CE backbone finished before the kill"
    d = _Driver(argv, env)  # inference
    d.wait_for("== training")
    resumed = "".join(d.lines)
    time.sleep(rng.uniform(0, 0.3))
    d.kill()
    d = _Driver(argv, env)  # evaluation
    d.wait_for("== inference")
    time.sleep(rng.uniform(0, 0.3))
    d.kill()
    printed = _Driver(argv, env).finish()
    deadline = time.time() + 60
    while set(run_processes()) - before and time.time() < deadline:
        time.sleep(0.5)
    left = {p: t for p, t in run_processes().items() if p not in before}
    assert not left, f"Ray processes of the killed runs still alive: {left}"
    return resumed, printed
