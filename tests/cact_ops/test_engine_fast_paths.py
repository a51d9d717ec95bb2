"""The engine's CPU fast paths give the same numbers, bit for bit, as the paths they shortcut: NumPy thresholds
vs torch's, NumPy tie detection vs torch's, class order for the test rows only vs every row."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cact_ops import cp, engine, ranking


@pytest.fixture
def torch_only(monkeypatch):
    """Run the torch code on the CPU (the reference the NumPy paths must match)."""
    def run(fn):
        monkeypatch.setattr(ranking, "_NUMPY_ON_CPU", False)
        try:
            return fn()
        finally:
            monkeypatch.setattr(ranking, "_NUMPY_ON_CPU", True)
    return run


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("num_classes", [1, 3, 40, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thresholds_numpy_equals_torch(torch_only, grouped, num_classes, dtype):
    gen = torch.Generator().manual_seed(num_classes)
    for n in (1, 7, 300):
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        if grouped:
            labels = labels.sort().values
        for scores in (torch.rand(3, n, generator=gen, dtype=dtype),
                       torch.randint(0, 4, (3, n), generator=gen).to(dtype)):  # many ties
            for classwise in (False, True):
                alphas = [0.1, 0.05, 0.5]
                q, frac = cp.thresholds(scores, labels, alphas, num_classes, classwise)
                q_ref, frac_ref = torch_only(lambda: cp.thresholds(scores, labels, alphas, num_classes, classwise))
                assert q.dtype == q_ref.dtype and q.shape == q_ref.shape
                assert torch.equal(q, q_ref) and torch.equal(frac, frac_ref)


@pytest.mark.parametrize("need_order", [False, True])
def test_rank_pool_numpy_ties_equal_torch(torch_only, need_order):
    gen = torch.Generator().manual_seed(1)
    p = torch.randint(0, 4, (300, 17), generator=gen).float()  # ties in almost every row
    p = p / p.sum(1, keepdim=True).clamp(min=1)
    y = torch.randint(0, 17, (300,), generator=gen)
    a = ranking.rank_pool(p, y, need_order)
    b = torch_only(lambda: ranking.rank_pool(p, y, need_order))
    for field in ("desc", "rank_y", "tie_rows", "tie_cols", "tie_start"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_rank_pool_order_rows_equals_every_row():
    gen = torch.Generator().manual_seed(2)
    p = torch.randint(0, 5, (400, 9), generator=gen).float() + torch.rand(400, 9, generator=gen).round()
    p = p / p.sum(1, keepdim=True)
    y = torch.randint(0, 9, (400,), generator=gen)
    rows = torch.unique(torch.randint(0, 400, (150,), generator=gen))
    full = ranking.rank_pool(p, y, True)
    part = ranking.rank_pool(p, y, True, order_rows=rows)
    assert torch.equal(full.desc, part.desc) and torch.equal(full.rank_y, part.rank_y)
    s = full.share_ties(torch.rand(400, 9, generator=gen))
    assert torch.equal(full.to_class_order(s)[rows], part.to_class_order(s.clone()))


@pytest.mark.parametrize("n_splits", [1, 2, 5])
def test_evaluate_pool_few_splits_path_equals_full_path(monkeypatch, n_splits):
    """Class order for the test rows only (few splits) and LAC's direct count give the sorted path's numbers."""
    gen = torch.Generator().manual_seed(n_splits)
    logits = torch.randn(600, 12, generator=gen) * 2
    logits[:50, :6] = 0.0  # tied probabilities
    labels = torch.randint(0, 12, (600,), generator=gen)
    counts = torch.randint(1, 300, (12,), generator=gen).tolist()

    def run():
        return engine.evaluate_pool(logits, labels, counts, n_splits=n_splits, alphas=(0.1, 0.05), seed=3)

    acc, fast = run()
    monkeypatch.setattr(engine, "_FEW_SPLITS", 0)
    monkeypatch.setattr(engine, "_DIRECT_COUNT_MAX", 0)
    acc_ref, ref = run()
    assert torch.equal(acc, acc_ref)
    for a, b in zip(fast, ref):
        assert (a.score, a.predictor) == (b.score, b.predictor)
        assert torch.equal(a.inf_frac, b.inf_frac)
        for key in a.metrics:
            assert torch.equal(a.metrics[key].nan_to_num(-1.0), b.metrics[key].nan_to_num(-1.0)), (a.score, key)
