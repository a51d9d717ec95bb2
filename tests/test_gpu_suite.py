"""The GPU suite's CPU smoke form (benchmarks/gpu_suite.py --device cpu --smoke) and its driver's syntax: the
suite that a GPU machine runs (benchmarks/gpu_suite.sh) stays runnable where no GPU is lent."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("torchsort", "step", "engine", "inference")


def _numbers(x):
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield float(x)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _numbers(v)


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_suite") / "smoke.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--device", "cpu", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_smoke_has_every_section_with_finite_numbers(smoke):
    assert smoke["smoke"] is True and smoke["device"] == "cpu"
    assert smoke["errors"] == {}
    for name in SECTIONS:
        assert name in smoke, name
        values = list(_numbers(smoke[name]))
        assert values and all(math.isfinite(v) for v in values), name
        assert _finite_positive(smoke["section_s"][name]), name
    assert _finite_positive(smoke["total_s"])

    ts = smoke["torchsort"]
    assert ts["backend"] == "cpu" and ts["works_on_device"] is True
    assert ts["max_abs_diff_vs_cpu"] < 1e-5
    assert all(_finite_positive(v) for v in ts["fwd_bwd_us"].values())

    for label in ("resnet18", "resnet32"):
        s = smoke["step"][label]
        assert s["what"] and s["clock"] == "cpu"
        for key in ("ce_ms", "cact_ms", "ratio", "ratio_of_minima"):
            assert _finite_positive(s[key]), (label, key)
        assert s["target"] == "<= 1.1" and s["target_met"] is None  # smoke figures are not judged

    e = smoke["engine"]
    assert (e["n"], e["k"], e["n_splits"]) == (2000, 10, 20)
    assert e["agree"] is True and e["summary_values_compared"] > 0 and e["max_abs_diff"] <= 1e-6
    for key in ("device_s", "cpu_s", "device_over_cpu"):
        assert _finite_positive(e[key]), key

    for label in ("resnet18", "resnet32"):
        r = smoke["inference"][label]
        assert r["what"] and _finite_positive(r["fp32"]["images_per_s"])
        assert "bf16_autocast" not in r  # CUDA only


def test_gpu_suite_sh_syntax():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not found")
    proc = subprocess.run([bash, "-n", str(ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_suite_sh_refuses_without_gpu(tmp_path):
    """Without nvidia-smi on PATH the driver stops at its first check, with a message, before building anything."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not found")
    if shutil.which("nvidia-smi", path="/usr/bin:/bin"):
        pytest.skip("nvidia-smi present: the driver would go on to build torchsort and run the full suite")
    proc = subprocess.run([bash, "benchmarks/gpu_suite.sh", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PY": sys.executable}, timeout=60)
    assert proc.returncode == 2
    assert "nvidia-smi not found" in proc.stderr
