"""The conformal guarantee, checked statistically over many independent calibration/test splits.

Data: exchangeable draws from a known model. Y ~ pi over K = 5 classes, X | Y=k ~ N(s_k e_k, I_5) with class
separations s = (2.5, 2, 1.5, 1, 0.7) (easy to hard classes), and a fixed, deliberately imperfect classifier
p(x) = softmax(1.2 x). Its probabilities are continuous, so scores have no
ties (APS and RAPS randomised with a seeded generator), which is what the upper bound needs.

For a split with n calibration points, rank k = ceil((n+1)(1-alpha)), the coverage of a fresh test point,
conditional on the calibration set, is Beta(k, n+1-k) distributed; averaged over m test points it gets extra
Binomial(m)/m noise. Its mean is exactly k/(n+1), inside [1-alpha, 1-alpha+1/(n+1)). Each test draws R fresh
splits (independent, so the R per-split coverages are i.i.d.) and calls the library per split: calibrate,
predict_sets and the coverage metrics. The Monte-Carlo standard error of the mean coverage is sd/sqrt(R), sd the
sample standard deviation of the per-split coverages (about 0.067 for n=30, m=50: SE about 0.002). We accept the
mean within Z = 4 standard errors of the guarantee's interval and of its exact value k/(n+1): a correct
implementation fails one such check with probability 6e-5 (about 1e-3 over this module's checks), while an
off-by-one rank moves the mean by 1/(n+1) = 0.032 = 15 SE and fails for sure.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from cact_ops.cp import calibrate, conformal_rank, predict_sets
from cact_ops.metrics import class_coverage, coverage
from cact_ops.scores import aps, lac, raps

pytestmark = pytest.mark.statistical

K = 5
ALPHA = 0.1
R = 1000  # splits per check
Z = 4.0
PRIOR = torch.tensor([0.35, 0.25, 0.2, 0.12, 0.08])
MEANS = torch.diag(torch.tensor([2.5, 2.0, 1.5, 1.0, 0.7], dtype=torch.float64))


def draw(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Class probabilities of the fixed classifier on fresh X | Y."""
    x = MEANS[labels] + torch.randn(labels.shape[0], K, generator=g, dtype=torch.float64)
    return torch.softmax(1.2 * x, dim=1)


def score_matrix(name: str, probs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if name == "lac":
        return lac(probs)
    if name == "aps":
        return aps(probs, generator=g)
    return raps(probs, lam=0.05, k_reg=1, generator=g)  # k_reg=1 so the penalty acts with K=5


def mc_se(values: torch.Tensor) -> float:
    return float(values.std()) / values.shape[0] ** 0.5


@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_standard_predictor_marginal_coverage(score):
    n, m = 30, 50
    g = torch.Generator().manual_seed(1)
    labels = torch.multinomial(PRIOR, R * (n + m), replacement=True, generator=g)
    scores = score_matrix(score, draw(labels, g), g).view(R, n + m, K)
    labels = labels.view(R, n + m)
    cov = torch.empty(R, dtype=torch.float64)
    for r in range(R):
        q = calibrate(scores[r, :n], labels[r, :n], ALPHA)
        cov[r] = coverage(predict_sets(scores[r, n:], q), labels[r, n:])
    mean, se = float(cov.mean()), mc_se(cov)
    exact = conformal_rank(n, ALPHA) / (n + 1)
    assert 1 - ALPHA - Z * se <= mean <= 1 - ALPHA + 1 / (n + 1) + Z * se, (mean, se)
    assert abs(mean - exact) <= Z * se, (mean, exact, se)


@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_classwise_predictor_coverage_per_class(score):
    """Mondrian CP with n_k calibration points of class k: for every class, mean coverage of class-k test points
    lies in [1-alpha, 1-alpha+1/(n_k+1)] (exactly ceil((n_k+1)(1-alpha))/(n_k+1)) within Z standard errors."""
    n_cal = [50, 30, 20, 12, 9]  # 9 is the least that gives a finite threshold at alpha = 0.1
    m_test = 20
    g = torch.Generator().manual_seed(2)
    one = torch.cat([torch.full((c,), k) for k, c in enumerate(n_cal)] + [torch.arange(K).repeat(m_test)])
    n = sum(n_cal)
    labels = one.repeat(R)
    scores = score_matrix(score, draw(labels, g), g).view(R, -1, K)
    labels = labels.view(R, -1)
    cov = torch.empty(R, K, dtype=torch.float64)
    std_cov = torch.empty(R, K, dtype=torch.float64)
    for r in range(R):
        q = calibrate(scores[r, :n], labels[r, :n], ALPHA, classwise=True)
        cov[r] = class_coverage(predict_sets(scores[r, n:], q), labels[r, n:], K)
        if score == "lac":
            q_std = calibrate(scores[r, :n], labels[r, :n], ALPHA)
            std_cov[r] = class_coverage(predict_sets(scores[r, n:], q_std), labels[r, n:], K)
    for k in range(K):
        mean, se = float(cov[:, k].mean()), mc_se(cov[:, k])
        exact = conformal_rank(n_cal[k], ALPHA) / (n_cal[k] + 1)
        assert 1 - ALPHA - Z * se <= mean <= 1 - ALPHA + 1 / (n_cal[k] + 1) + Z * se, (k, mean, se)
        assert abs(mean - exact) <= Z * se, (k, mean, exact, se)
    if score == "lac":
        # Power check: the same test catches the class-conditional failure of the standard predictor, which
        # (with LAC on this imperfect classifier) undercovers its hardest class by far more than Z SE.
        worst = std_cov.mean(0).argmin()
        assert float(std_cov[:, worst].mean()) < 1 - ALPHA - Z * mc_se(std_cov[:, worst])


def test_too_small_classes_get_full_sets_and_still_cover():
    """A class with fewer than ceil((n_k+1)(1-alpha)) points gets an infinite threshold (with a warning), so its
    test points are always covered: the guarantee holds trivially rather than failing silently."""
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0] * 40 + [1] * 40 + [2] * 3 + [3] * 40 + [4] * 40)
    probs = draw(labels, g)
    with pytest.warns(UserWarning, match="too few calibration points"):
        q = calibrate(lac(probs), labels, ALPHA, classwise=True)
    assert torch.isinf(q[2]) and torch.isfinite(q[[0, 1, 3, 4]]).all()
    test_labels = torch.full((50,), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sets = predict_sets(lac(draw(test_labels, g)), q)
    assert coverage(sets, test_labels) == 1.0
