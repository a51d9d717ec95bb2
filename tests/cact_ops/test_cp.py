"""Hard split CP: the finite-sample rank, calibration (standard and class-wise), set construction."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from cact_ops.cp import (
    calibrate,
    classwise_quantile,
    conformal_quantile,
    conformal_rank,
    predict_sets,
    true_class_scores,
)

from .conftest import random_probs


def exact_rank(n: int, alpha_percent: int) -> int:
    """ceil((n+1)(1-alpha)) in exact integer arithmetic, alpha = alpha_percent / 100."""
    return -(-(n + 1) * (100 - alpha_percent) // 100)


@pytest.mark.parametrize(
    "n,alpha,expected",
    [(99, 0.1, 90),  # (n+1)(1-alpha) = 90 exactly, but 100 * 0.9 = 90.00000000000001 in floating point
     (9, 0.1, 9), (10, 0.1, 10), (100, 0.1, 91), (4, 0.2, 4), (19, 0.05, 19), (1000, 0.01, 991), (1, 0.5, 1),
     (5, 0.1, 6)],
)
def test_conformal_rank_hand_counts(n, alpha, expected):
    assert conformal_rank(n, alpha) == expected


def test_conformal_rank_matches_exact_arithmetic_everywhere():
    # Every alpha = a/100 and n up to 400: no floating-point off-by-one in either direction.
    mismatches = [(n, a) for n in range(1, 401) for a in range(1, 100) if conformal_rank(n, a / 100) != exact_rank(n, a)]
    assert mismatches == []


def test_conformal_quantile_is_the_kth_smallest():
    g = torch.Generator().manual_seed(0)
    for n in (1, 9, 10, 37, 99, 250):
        s = torch.rand(n, generator=g, dtype=torch.float64)
        for alpha in (0.05, 0.1, 0.2, 0.5):
            k = conformal_rank(n, alpha)
            if k > n:
                continue
            assert conformal_quantile(s, alpha) == torch.sort(s).values[k - 1]


def test_conformal_quantile_n99_alpha01_picks_the_90th_score():
    s = torch.arange(1.0, 100.0)[torch.randperm(99, generator=torch.Generator().manual_seed(0))]
    assert conformal_quantile(s, 0.1) == 90.0


def test_conformal_quantile_is_inf_with_a_warning_when_the_rank_exceeds_n():
    s = torch.arange(5.0, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"rank 6 > n=5.*\+inf"):
        q = conformal_quantile(s, 0.1)
    assert math.isinf(q) and q > 0 and q.dtype == torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # n = 9 is exactly enough for alpha = 0.1: no warning
        assert conformal_quantile(torch.arange(9.0), 0.1) == 8.0


def test_conformal_quantile_handles_ties_and_infinite_scores():
    s = torch.tensor([0.5, 0.5, 0.5, float("inf"), 0.1])
    assert conformal_quantile(s, 0.4) == 0.5  # rank ceil(6 * 0.6) = 4 -> sorted [0.1, .5, .5, .5, inf][3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rank exists (ceil(4 * 0.75) = 3 <= 3): an infinite score, no warning
        assert conformal_quantile(torch.tensor([0.2, float("inf"), 0.1]), 0.25) == float("inf")


@pytest.mark.parametrize("n,alpha", [(9, 0.1), (19, 0.1), (30, 0.1), (49, 0.05), (20, 0.3)])
def test_exact_finite_sample_coverage_over_all_exchangeable_positions(n, alpha):
    """The combinatorial core of the guarantee, with no randomness: for n+1 distinct scores, leaving each one out
    in turn as the test point and calibrating on the other n covers the test point in exactly
    ceil((n+1)(1-alpha)) of the n+1 cases, i.e. coverage k/(n+1) in [1-alpha, 1-alpha+1/(n+1))."""
    g = torch.Generator().manual_seed(n)
    true_scores = torch.rand(n + 1, generator=g, dtype=torch.float64)
    scores = torch.stack([true_scores, torch.rand(n + 1, generator=g, dtype=torch.float64)], dim=1)  # [n+1, 2]
    labels = torch.zeros(n + 1, dtype=torch.long)
    covered = 0
    for j in range(n + 1):
        keep = torch.arange(n + 1) != j
        q = calibrate(scores[keep], labels[keep], alpha)
        covered += int(predict_sets(scores[j:j + 1], q)[0, 0])
    k = conformal_rank(n, alpha)
    assert covered == k
    assert 1 - alpha - 1e-12 <= covered / (n + 1) < 1 - alpha + 1 / (n + 1)


def test_calibrate_standard_equals_conformal_quantile_of_true_class_scores():
    p = random_probs(40, 4, seed=1)
    y = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(2))
    s = 1 - p
    assert calibrate(s, y, 0.1) == conformal_quantile(true_class_scores(s, y), 0.1)
    assert torch.equal(true_class_scores(s, y), torch.tensor([float(s[i, y[i]]) for i in range(40)]))


def test_classwise_quantile_equals_a_per_class_loop():
    g = torch.Generator().manual_seed(3)
    K = 5
    counts = [30, 12, 9, 3, 0]  # class 3 too small for alpha=0.1, class 4 empty
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    labels = labels[torch.randperm(labels.shape[0], generator=g)]
    s = torch.rand(labels.shape[0], generator=g)
    s[:4] = 0.5  # some ties
    with pytest.warns(UserWarning, match=r"2 classes have too few calibration points.*of them 1 have none.*\[3, 4\]"):
        q = classwise_quantile(s, labels, K, 0.1)
    expected = []
    for k in range(K):
        if counts[k] == 0:
            expected.append(float("inf"))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected.append(float(conformal_quantile(s[labels == k], 0.1)))
    torch.testing.assert_close(q, torch.tensor(expected))


def test_calibrate_classwise_uses_classwise_quantile():
    p = random_probs(200, 3, seed=4)
    y = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(5))
    s = 1 - p
    q = calibrate(s, y, 0.2, classwise=True)
    assert q.shape == (3,)
    torch.testing.assert_close(q, classwise_quantile(true_class_scores(s, y), y, 3, 0.2))


def test_predict_sets_scalar_and_per_class_thresholds():
    scores = torch.tensor([[0.1, 0.5, 0.9], [0.4, 0.2, 0.3], [0.6, 0.6, 0.6]])
    expected_scalar = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    assert torch.equal(predict_sets(scores, 0.5), expected_scalar)
    assert torch.equal(predict_sets(scores, torch.tensor(0.5)), expected_scalar)
    per_class = torch.tensor([0.2, 0.6, 0.3])
    expected = torch.tensor([[s <= t for s, t in zip(row, per_class.tolist())] for row in scores.tolist()])
    assert torch.equal(predict_sets(scores, per_class), expected)
    assert predict_sets(scores, float("inf")).all()
    assert predict_sets(scores, torch.tensor([float("inf"), -1.0, -1.0]))[:, 0].all()


# --- bad inputs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, 0.0, 1.0, float("nan")])
def test_every_cp_function_rejects_alpha_outside_the_open_unit_interval(alpha):
    s = torch.rand(20, 3)
    y = torch.randint(0, 3, (20,))
    match = r"alpha must lie in the open interval \(0, 1\)"
    for call in (lambda: conformal_rank(20, alpha), lambda: conformal_quantile(s[:, 0], alpha),
                 lambda: calibrate(s, y, alpha), lambda: calibrate(s, y, alpha, classwise=True),
                 lambda: classwise_quantile(s[:, 0], y, 3, alpha)):
        with pytest.raises(ValueError, match=match):
            call()


def test_calibrate_rejects_bad_inputs():
    s, y = torch.rand(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    cases = [
        ((torch.full((6, 3), float("nan")), y), "cal_scores contains NaN"),
        ((torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), "empty calibration set"),
        ((s, torch.tensor([0, 1, 2, 0, 1, 3])), r"cal_labels must lie in \[0, 3\)"),
        ((s, torch.tensor([0, 1, 2, 0, 1, -1])), r"cal_labels must lie in \[0, 3\)"),
        ((s, y.float()), "cal_labels must be an integer tensor"),
        ((s, y[:5]), r"cal_labels must have shape \[6\]"),
        ((s, y[:, None]), r"cal_labels must have shape \[6\]"),
        ((s[:, 0], y), r"cal_scores must have shape \[n, K\]"),
        ((s, y.tolist()), "cal_labels must be a torch.Tensor"),
    ]
    for (scores, labels), match in cases:
        with pytest.raises(ValueError, match=match):
            calibrate(scores, labels, 0.1)


def test_conformal_quantile_and_classwise_reject_bad_inputs():
    with pytest.raises(ValueError, match="empty calibration set"):
        conformal_quantile(torch.zeros(0), 0.1)
    with pytest.raises(ValueError, match="true_class_scores must be a 1-D tensor"):
        conformal_quantile(torch.zeros(3, 2), 0.1)
    with pytest.raises(ValueError, match="true_class_scores contains NaN"):
        conformal_quantile(torch.tensor([0.1, float("nan")]), 0.1)
    with pytest.raises(ValueError, match="empty calibration set: s has no elements"):
        classwise_quantile(torch.zeros(0), torch.zeros(0, dtype=torch.long), 2, 0.1)
    with pytest.raises(ValueError, match="s contains NaN"):
        classwise_quantile(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), 2, 0.1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        classwise_quantile(torch.tensor([0.1, 0.2]), torch.tensor([0, 2]), 2, 0.1)
    with pytest.raises(ValueError, match=r"labels must have shape \[2\]"):
        classwise_quantile(torch.tensor([0.1, 0.2]), torch.tensor([0, 1, 1]), 2, 0.1)
    with pytest.raises(ValueError, match="s must be a 1-D tensor"):
        classwise_quantile(torch.rand(2, 2), torch.tensor([0, 1]), 2, 0.1)


def test_predict_sets_rejects_bad_inputs():
    s = torch.rand(4, 3)
    with pytest.raises(ValueError, match="threshold has 2 entries but scores have 3 classes"):
        predict_sets(s, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"threshold must be a scalar or shape \[K\]"):
        predict_sets(s, torch.rand(3, 1))
    with pytest.raises(ValueError, match=r"scores must have shape \[n, K\]"):
        predict_sets(s[0], 0.5)
    with pytest.raises(ValueError, match="scores contains NaN"):
        predict_sets(torch.tensor([[float("nan"), 0.1]]), 0.5)
    with pytest.raises(ValueError, match="threshold contains NaN"):
        predict_sets(s, float("nan"))
