"""Smooth operators: the differentiable quantile (torchsort) and soft sets."""
from __future__ import annotations

import pytest
import torch
import torchsort

from cact_ops.smooth import smooth_threshold_level, soft_quantile, soft_sets, soft_size

QS = (0.05, 0.1, 0.5, 0.9)
NS = (5, 64, 512)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("q", QS)
def test_soft_quantile_approaches_torch_quantile_as_strength_goes_to_zero(n, q):
    # Values spread wide enough (sd 20) that a large strength visibly smooths; float64 because torchsort
    # offsets the values by ranks / strength, which costs float32 precision when the strength is tiny.
    v = 20 * torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    hard = torch.quantile(v, q)
    errors = [abs(float(soft_quantile(v, q, eps) - hard)) for eps in (100.0, 1.0, 1e-2, 1e-4)]
    assert errors[-1] < 1e-8
    assert errors[-1] <= errors[0] + 1e-8
    # torchsort's l2 soft sort is exact once every gap between neighbours is below 1/strength.
    max_gap = float(v.sort().values.diff().max())
    assert float(soft_quantile(v, q, 0.5 / max_gap) - hard) == pytest.approx(0.0, abs=1e-9)


def test_strength_is_in_inverse_data_units():
    """Documented behaviour of torchsort's l2 regularisation that the training defaults depend on: the soft sort
    equals the hard sort whenever neighbouring gaps are below 1/strength, so strength 0.1 on log-probability
    scores (gaps well under 10 nats) is the hard quantile, with gradient on the two interpolation neighbours
    only; real smoothing needs strength of order 1/gap."""
    v = torch.tensor([-3.0, -2.2, -1.5, -0.9, -0.4, -0.1], dtype=torch.float64, requires_grad=True)
    soft_quantile(v, 0.3, 0.1).backward()
    hard_grad = v.grad.clone()
    assert int((hard_grad != 0).sum()) == 2
    v.grad = None
    soft_quantile(v, 0.3, 10.0).backward()
    assert int((v.grad.abs() > 1e-12).sum()) > 2
    row = v.detach()[None]
    torch.testing.assert_close(torchsort.soft_sort(row, regularization_strength=0.1), row.sort().values)


def test_soft_quantile_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    for strength in (0.3, 3.0):
        v = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: soft_quantile(t, 0.3, strength), (v,))
        vb = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: soft_quantile(t, 0.8, strength), (vb,))


@pytest.mark.parametrize("strength", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("n", NS)
def test_soft_quantile_gradients_finite_nonzero_and_sum_to_one(n, strength):
    # float32 as in training; log-probability-like values. Shifting every value by c shifts the quantile by c,
    # so the gradient sums to 1.
    v = torch.log_softmax(torch.randn(n, 5, generator=torch.Generator().manual_seed(1)) * 3, dim=1)[:, 0]
    v.requires_grad_(True)
    soft_quantile(v, smooth_threshold_level(0.1, n), strength).backward()
    assert torch.isfinite(v.grad).all()
    assert (v.grad != 0).any()
    assert float(v.grad.sum()) == pytest.approx(1.0, abs=1e-4)


def test_soft_quantile_batched_equals_rows():
    v = torch.randn(4, 33, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for strength in (0.1, 5.0):
        out = soft_quantile(v, 0.2, strength)
        assert out.shape == (4,)
        torch.testing.assert_close(out, torch.stack([soft_quantile(r, 0.2, strength) for r in v]))
    assert soft_quantile(v[0], 0.2).dim() == 0


def test_soft_quantile_endpoints_and_single_value():
    v = torch.tensor([3.0, 1.0, 2.0])
    assert float(soft_quantile(v, 0.0, 1e-3)) == pytest.approx(1.0)
    assert float(soft_quantile(v, 1.0, 1e-3)) == pytest.approx(3.0)
    assert float(soft_quantile(torch.tensor([4.0]), 0.5)) == pytest.approx(4.0)


def test_smooth_threshold_level():
    assert smooth_threshold_level(0.1, 9) == pytest.approx(0.1 * 10 / 9)
    assert smooth_threshold_level(0.5, 1) == 1.0  # capped
    assert smooth_threshold_level(0.1, 0) == pytest.approx(0.2)  # n_cal clamped to 1


def test_soft_sets_limit_equals_hard_sets():
    g = torch.Generator().manual_seed(3)
    conf = torch.log_softmax(torch.randn(40, 5, generator=g) * 2, dim=1).double()
    tau = -1.3
    assert not torch.isclose(conf, torch.tensor(tau, dtype=torch.float64), atol=1e-3).any()
    hard = conf >= tau
    soft = soft_sets(conf, tau, temperature=1e-5)
    torch.testing.assert_close(soft, hard.double(), atol=1e-12, rtol=0)
    torch.testing.assert_close(soft_size(conf, tau, 1e-5), hard.sum(dim=1).double(), atol=1e-10, rtol=0)
    # class-wise thresholds, one per column
    taus = torch.tensor([-0.5, -1.0, -1.5, -2.0, -2.5], dtype=torch.float64)
    torch.testing.assert_close(soft_sets(conf, taus, 1e-5), (conf >= taus).double(), atol=1e-12, rtol=0)
    # T = 1 is genuinely soft; membership is 1/2 at the threshold and monotone in the score
    c = torch.tensor([[-2.0, -1.3, -0.5]], dtype=torch.float64)
    s = soft_sets(c, tau, 1.0)
    assert s[0, 1] == 0.5 and s[0, 0] < s[0, 1] < s[0, 2]


def test_soft_size_gradient_flows_to_scores_and_threshold():
    conf = torch.log_softmax(torch.randn(8, 4, generator=torch.Generator().manual_seed(4)), dim=1).requires_grad_(True)
    tau = torch.tensor(-1.2, requires_grad=True)
    soft_size(conf, tau, 0.5).sum().backward()
    assert (conf.grad > 0).all() and tau.grad < 0


# --- bad inputs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "values,q,strength,match",
    [(torch.tensor([1.0, float("nan")]), 0.5, 0.1, "values contain NaN or inf"),
     (torch.tensor([1.0, float("inf")]), 0.5, 0.1, "values contain NaN or inf"),
     (torch.zeros(2, 2, 2), 0.5, 0.1, r"values must be a non-empty tensor of shape \[n\] or \[B, n\]"),
     (torch.zeros(0), 0.5, 0.1, "values must be a non-empty tensor"),
     (torch.tensor([1, 2]), 0.5, 0.1, "values must be floating point"),
     (torch.tensor([1.0, 2.0]), 1.5, 0.1, r"q must lie in \[0, 1\]"),
     (torch.tensor([1.0, 2.0]), -0.1, 0.1, r"q must lie in \[0, 1\]"),
     (torch.tensor([1.0, 2.0]), 0.5, 0.0, "regularization_strength must be > 0")],
)
def test_soft_quantile_rejects_bad_inputs(values, q, strength, match):
    with pytest.raises(ValueError, match=match):
        soft_quantile(values, q, strength)


def test_soft_sets_rejects_bad_inputs():
    conf = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        soft_sets(conf, 0.0, temperature=0)
    with pytest.raises(ValueError, match=r"conformity must have shape \[m, K\]"):
        soft_size(conf[0], 0.0)
    with pytest.raises(ValueError, match="conformity contains NaN"):
        soft_sets(torch.tensor([[0.0, float("nan")]]), 0.0)
    with pytest.raises(ValueError, match=r"tau must be a scalar or shape \[4\]"):
        soft_sets(conf, torch.zeros(3))
    with pytest.raises(ValueError, match="tau contains NaN"):
        soft_sets(conf, float("nan"))


@pytest.mark.parametrize("operator", ["kl", "sigmoid"])
def test_other_quantile_operators_approach_the_hard_quantile_with_finite_gradients(operator):
    """kl (torchsort in float64) and sigmoid (a smoothed CDF, no sort) tend to the hard quantile as the strength
    shrinks; the gradient is finite, sums to 1 (a quantile moves with a common shift) and, for the sigmoid,
    spreads over the values near the quantile."""
    torch.manual_seed(0)
    v = (torch.randn(300) * 2).requires_grad_()
    hard = float(torch.quantile(v.detach(), 0.1))
    q = soft_quantile(v, 0.1, 1e-3, operator=operator).detach()
    assert abs(float(q) - hard) < 0.05
    (g,) = torch.autograd.grad(soft_quantile(v, 0.1, 0.2, operator=operator), v)
    assert torch.isfinite(g).all() and abs(float(g.sum()) - 1.0) < 1e-4
    if operator == "sigmoid":
        assert int((g.abs() > 1e-6).sum()) > 5
        w = torch.ones(300)
        w[v.detach() < hard] = 3.0  # weight below the quantile: the weighted quantile moves down
        assert float(soft_quantile(v, 0.1, 1e-3, weights=w, operator=operator)) < hard


def test_an_unknown_operator_is_refused():
    with pytest.raises(ValueError, match="operator must be one of"):
        soft_quantile(torch.arange(5.0), 0.5, operator="bogus")
