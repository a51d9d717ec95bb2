"""Set metrics against straightforward NumPy / loop references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cact_ops.metrics import (
    DEFAULT_SIZE_BINS,
    SHOT_GROUPS,
    accuracy,
    average_size,
    class_coverage,
    class_size,
    coverage,
    covgap,
    paired_difference,
    shot_group_sizes,
    shot_groups,
    sscv,
    t_cdf,
    t_quantile,
    undercovered_ratio,
)

K = 6


@pytest.fixture
def sets_and_labels():
    """Random sets with sizes 0..K and labels where class K-1 is absent."""
    g = torch.Generator().manual_seed(0)
    sets = torch.rand(300, K, generator=g) < torch.rand(300, 1, generator=g)
    labels = torch.randint(0, K - 1, (300,), generator=g)
    return sets, labels


def ref_class_coverage(sets, labels, num_classes):
    s, y = sets.numpy(), labels.numpy()
    out = []
    for k in range(num_classes):
        rows = np.flatnonzero(y == k)
        out.append(np.mean([s[i, k] for i in rows]) if len(rows) else np.nan)
    return np.array(out)


def ref_class_size(sets, labels, num_classes):
    s, y = sets.numpy(), labels.numpy()
    return np.array([s[y == k].sum(axis=1).mean() if (y == k).any() else np.nan for k in range(num_classes)])


def test_coverage_and_average_size(sets_and_labels):
    sets, labels = sets_and_labels
    s, y = sets.numpy(), labels.numpy()
    assert coverage(sets, labels).item() == pytest.approx(np.mean([s[i, y[i]] for i in range(len(y))]))
    assert average_size(sets).item() == pytest.approx(s.sum(axis=1).mean())


def test_class_coverage_and_class_size(sets_and_labels):
    sets, labels = sets_and_labels
    np.testing.assert_allclose(class_coverage(sets, labels, K).numpy(), ref_class_coverage(sets, labels, K), rtol=1e-6)
    np.testing.assert_allclose(class_size(sets, labels, K).numpy(), ref_class_size(sets, labels, K), rtol=1e-6)
    assert math.isnan(class_coverage(sets, labels, K)[K - 1])  # absent class


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.3])
def test_covgap_and_undercovered_ratio(sets_and_labels, alpha):
    sets, labels = sets_and_labels
    cov = ref_class_coverage(sets, labels, K)
    present = ~np.isnan(cov)
    assert covgap(sets, labels, alpha, K).item() == pytest.approx(100 * np.abs(cov[present] - (1 - alpha)).mean(), rel=1e-5)
    for tol in (0.0, 0.05):
        expected = np.mean(cov[present] < 1 - alpha - tol)
        assert undercovered_ratio(sets, labels, alpha, K, tolerance=tol).item() == pytest.approx(expected)


def test_sscv_against_loop(sets_and_labels):
    sets, labels = sets_and_labels
    alpha = 0.1
    s, y = sets.numpy(), labels.numpy()
    sizes = s.sum(axis=1)
    covered = np.array([s[i, y[i]] for i in range(len(y))])
    edges = [-1, *DEFAULT_SIZE_BINS, np.inf]  # strata (edges[i], edges[i+1]]: [0,1], [2,3], [4,10], ...
    viol = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        rows = (sizes > lo) & (sizes <= hi)
        if rows.any():
            viol.append(abs(covered[rows].mean() - (1 - alpha)))
    assert sscv(sets, labels, alpha).item() == pytest.approx(max(viol), rel=1e-6)
    # Custom bins: one stratum per size.
    per_size = [abs(covered[sizes == z].mean() - (1 - alpha)) for z in np.unique(sizes)]
    assert sscv(sets, labels, alpha, size_bins=tuple(range(K))).item() == pytest.approx(max(per_size), rel=1e-6)


def test_sscv_hand_example():
    sets = torch.tensor([[True, False], [True, True], [True, True], [False, False]])
    labels = torch.tensor([0, 1, 0, 1])
    # stratum [0,1]: rows 0 (covered) and 3 (empty, not covered) -> 0.5; stratum [2,3]: rows 1, 2 -> 1.0
    assert sscv(sets, labels, 0.1).item() == pytest.approx(0.4)


def test_shot_groups_small_k_thirds():
    # K <= 10: thirds by training count (largest first), first third rounded up; input order does not matter.
    assert shot_groups([400, 200, 100, 50, 25, 12]).tolist() == [0, 0, 1, 1, 2, 2]
    assert shot_groups([12, 400, 50, 25, 200, 100]).tolist() == [2, 0, 1, 2, 0, 1]
    assert shot_groups([5000, 4000, 3000, 2000, 1000, 500, 300, 200, 100, 50]).tolist() == [0] * 4 + [1] * 3 + [2] * 3
    assert shot_groups([10, 5, 1]).tolist() == [0, 1, 2]
    counts = torch.randint(1, 1000, (7,), generator=torch.Generator().manual_seed(1))
    groups = shot_groups(counts)
    assert torch.bincount(groups, minlength=3).tolist() == [3, 2, 2]
    # every many-shot class has at least the count of every few-shot class
    assert counts[groups == 0].min() >= counts[groups == 2].max()


def test_shot_groups_large_k_imagenet_lt_thresholds():
    counts = [1280, 101, 100, 20, 19, 1, 500, 50, 5, 150, 20, 99]
    expected = [0 if c > 100 else (1 if c >= 20 else 2) for c in counts]
    assert shot_groups(counts).tolist() == expected
    assert shot_groups(torch.tensor(counts)).tolist() == expected


def test_shot_group_sizes_against_loop(sets_and_labels):
    sets, labels = sets_and_labels
    counts = [300, 120, 60, 30, 10, 5]  # thirds: classes {0,1}, {2,3}, {4,5}
    groups = shot_groups(counts).tolist()
    out = shot_group_sizes(sets, labels, counts)
    assert list(out) == list(SHOT_GROUPS)
    sizes = sets.sum(dim=1).numpy()
    y = labels.numpy()
    for g, name in enumerate(SHOT_GROUPS):
        rows = np.isin(y, [k for k in range(K) if groups[k] == g])
        assert out[name].item() == pytest.approx(sizes[rows].mean())
    # an empty group is NaN
    only_head = shot_group_sizes(sets[labels < 2], labels[labels < 2], counts)
    assert math.isnan(only_head["few"]) and math.isnan(only_head["medium"]) and not math.isnan(only_head["many"])


def test_accuracy():
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(3))
    assert accuracy(logits, labels).item() == pytest.approx(np.mean(logits.numpy().argmax(1) == labels.numpy()))


# --- bad inputs -------------------------------------------------------------------------------------------------

def test_metrics_reject_bad_inputs():
    sets = torch.tensor([[True, False], [True, True]])
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="sets must be a bool tensor"):
        coverage(sets.float(), labels)
    with pytest.raises(ValueError, match="sets must be a bool tensor"):
        average_size(sets[0])
    with pytest.raises(ValueError, match=r"labels must have shape \[2\]"):
        coverage(sets, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        class_coverage(sets, torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        class_size(sets, labels.float(), 2)
    with pytest.raises(ValueError, match="sets have 2 classes but num_classes=3"):
        class_coverage(sets, labels, 3)
    with pytest.raises(ValueError, match="sets have 2 classes but num_classes=3"):
        class_size(sets, labels, 3)
    for alpha in (0, 1, -0.1, 1.5):
        for fn in (lambda a: covgap(sets, labels, a, 2), lambda a: undercovered_ratio(sets, labels, a, 2),
                   lambda a: sscv(sets, labels, a)):
            with pytest.raises(ValueError, match="alpha must lie in the open interval"):
                fn(alpha)
    with pytest.raises(ValueError, match="train_counts has 3 classes but sets have 2"):
        shot_group_sizes(sets, labels, [10, 5, 1])
    with pytest.raises(ValueError, match="train_counts is empty"):
        shot_groups([])
    with pytest.raises(ValueError, match="train_counts must be >= 0"):
        shot_groups([5, -1, 3])
    with pytest.raises(ValueError, match="logits contains NaN or inf"):
        accuracy(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="logits contains NaN or inf"):
        accuracy(torch.tensor([[0.0, float("inf")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        accuracy(torch.zeros(2, 2), torch.tensor([0, 5]))


# --- paired comparisons -----------------------------------------------------------------------------------------

def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 201):
        for p in (0.5, 0.6, 0.9, 0.95, 0.975, 0.99, 0.995, 0.9995, 0.025, 0.001):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), abs=1e-4), (p, df)
    for df in (0.5, 2.5, 1e5):  # non-integer and large df
        assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4)
    for t in (-40.0, -2.0, -0.1, 0.0, 0.3, 3.0, 200.0):
        for df in (1, 4, 30, 500):
            assert t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-10)


def test_paired_difference_against_numpy():
    rng = np.random.default_rng(0)
    for r in (2, 5, 20):
        a, b = rng.normal(size=r), rng.normal(size=r)
        d = a - b
        half = {2: 12.706204736, 5: 2.776445105, 20: 2.093024054}[r] * d.std(ddof=1) / np.sqrt(r)
        mean, lo, hi = paired_difference(a, b)
        assert (mean, lo, hi) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half), abs=1e-9)
        mean90, lo90, hi90 = paired_difference(torch.tensor(a), torch.tensor(b), confidence=0.9)
        assert mean90 == pytest.approx(mean) and lo < lo90 < hi90 < hi


def test_paired_difference_edge_cases():
    assert paired_difference([0.3, 0.5, 0.7], [0.3, 0.5, 0.7]) == (0.0, 0.0, 0.0)  # identical: zero width
    mean, lo, hi = paired_difference([1.0, 2.0], [0.0, 1.0])  # constant difference: zero-width interval at 1
    assert (mean, lo, hi) == (1.0, 1.0, 1.0)
    mean, lo, hi = paired_difference([2.5], [1.0])  # R = 1: no interval
    assert mean == 1.5 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in paired_difference([1.0, float("nan")], [0.0, 0.0]))
    with pytest.raises(ValueError, match="at least one pair"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="as many control values"):
        paired_difference([1.0, 2.0, 3.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1.0, 2.0], [0.0, 0.0], confidence=1.0)
    with pytest.raises(ValueError, match="open interval"):
        t_quantile(1.0, 3)
