"""Fixtures of the cact_ops tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_intraop_thread():
    """Run this package's tests on one intra-op thread and restore the setting afterwards.

    Package scope, so it is in place before any module-scoped fixture (those are set up before function-scoped
    ones) and does not leak into other test packages.

    Every tensor here is tiny: with more threads, synchronisation costs more than the work (on a loaded 2-core
    machine a 64x10 linear forward and backward took 6x longer with 2 threads than with 1).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_probs(n: int, num_classes: int, seed: int = 0, scale: float = 2.0, dtype=torch.float32) -> torch.Tensor:
    """Continuous (tie-free with probability 1) class probabilities: softmax of Gaussian logits."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(n, num_classes, generator=g, dtype=dtype), dim=1)
