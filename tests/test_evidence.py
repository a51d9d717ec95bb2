"""benchmarks/results/evidence.py's backbone cache, and the CE backbone's route on a machine without torchsort
(a bare GPU machine trains the CIFAR-10-LT backbones there; the heads are evaluated elsewhere)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def evidence():
    spec = importlib.util.spec_from_file_location("results_evidence", ROOT / "benchmarks" / "results" / "evidence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _splits(digest: str):
    return SimpleNamespace(manifest={"selection_digest": {"train": digest}, "model_family": None},
                           payload={"shape": [32, 32, 3]}, num_classes=10)


def _cache(evidence, work: Path, **facts) -> None:
    torch.manual_seed(0)
    from cact_ops.models import build_model

    model = build_model(evidence.BACKBONES["cifar10"]["family"], 10, in_channels=3)
    torch.save(model.state_dict(), work / "backbone-s0.pt")
    (work / "backbone-s0.json").write_text(json.dumps({"seconds": 1.0, "device": "test", **facts}))


def test_a_cached_backbone_is_reused_with_its_facts(evidence, tmp_path):
    _cache(evidence, tmp_path, loop=evidence.BACKBONES["cifar10"]["loop"], train_digest="abc")
    model, facts = evidence._backbone("cifar10", _splits("abc"), 0, tmp_path)
    assert facts["device"] == "test" and not model.training


@pytest.mark.parametrize("facts, field", [({"train_digest": "other"}, "train_digest"),
                                          ({"loop": {"epochs": 1}}, "loop")])
def test_a_backbone_of_another_split_or_a_smoke_loop_is_refused(evidence, tmp_path, facts, field):
    _cache(evidence, tmp_path, **facts)
    with pytest.raises(ValueError, match=f"backbone-s0.pt: cached backbone has {field}"):
        evidence._backbone("cifar10", _splits("abc"), 0, tmp_path)


def test_the_cifar10_ce_backbone_trains_without_torchsort(evidence, monkeypatch):
    from cact_ops import smooth
    from cact_ops.models import build_model
    from cact_ops.training import TrainConfig, fit_in_process

    monkeypatch.setattr(smooth, "torchsort", None)
    with pytest.raises(ImportError, match="needs torchsort"):
        smooth.soft_quantile(torch.randn(8), 0.9)
    loop = {**evidence.BACKBONES["cifar10"]["loop"], "epochs": 1, "batch_size": 16}
    model = build_model("cifar_resnet32", 10)
    x, y = torch.randn(32, 3, 32, 32), torch.arange(32) % 10
    result = fit_in_process(model, TrainConfig(method="ce", seed=0, **loop), (x, y), (x, y))
    assert len(result.metrics) == 1  # one epoch ran, its soft-size diagnostics by the sigmoid operator


def test_the_gpu_backbone_script_parses_and_refuses_a_missing_argument():
    import subprocess

    script = ROOT / "benchmarks" / "results" / "evidence_backbones_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr
