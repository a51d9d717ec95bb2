"""Scores: LAC, APS, RAPS against straightforward loop references, and their input checks."""
from __future__ import annotations

import pytest
import torch

from cact_ops.engine import evaluate_pool
from cact_ops.ranking import rank_pool
from cact_ops.scores import SCORES, Score, aps, get_score, lac, logprob, raps, score_object, softmax

from .conftest import random_probs


def aps_loop(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Textbook APS: for each (i, k), the mass of classes with strictly larger probability plus u_i * p_ik."""
    out = torch.empty_like(probs)
    for i in range(probs.shape[0]):
        for k in range(probs.shape[1]):
            above = sum(float(p) for p in probs[i] if p > probs[i, k])
            out[i, k] = above + float(u[i]) * float(probs[i, k])
    return out


def rank_loop(probs: torch.Tensor) -> torch.Tensor:
    """1-based rank of each class by descending probability (no ties in the test data)."""
    return torch.tensor([[1 + sum(int(q > p) for q in row) for p in row] for row in probs.tolist()])


def test_lac_is_one_minus_probability():
    p = random_probs(7, 4)
    torch.testing.assert_close(lac(p), 1 - p)


@pytest.mark.parametrize("u_kind", ["one", "tensor_n", "tensor_n1"])
def test_aps_matches_loop_reference(u_kind):
    p = random_probs(12, 5, seed=1, dtype=torch.float64)
    u = torch.rand(12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    if u_kind == "one":
        u_arg, u_ref = 1.0, torch.ones(12, dtype=torch.float64)
    elif u_kind == "tensor_n":
        u_arg, u_ref = u, u
    else:
        u_arg, u_ref = u[:, None], u
    torch.testing.assert_close(aps(p, u=u_arg), aps_loop(p, u_ref))


def test_aps_non_randomised_extremes():
    p = random_probs(20, 6, seed=2, dtype=torch.float64)
    s = aps(p, u=1.0)
    top = p.argmax(dim=1, keepdim=True)
    # The most likely class scores its own probability; the least likely scores the total mass 1.
    torch.testing.assert_close(s.gather(1, top), p.gather(1, top))
    torch.testing.assert_close(s.max(dim=1).values, torch.ones(20, dtype=torch.float64))
    # u = 0 removes the own-mass term: the top class scores 0.
    assert torch.all(aps(p, u=0.0).gather(1, top) == 0)


def test_aps_and_raps_break_ties_by_class_index():
    p = torch.tensor([[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(aps(p, u=1.0), torch.tensor([[0.75, 0.5, 1.0], [1 / 3, 2 / 3, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(raps(p, lam=1.0, k_reg=0, u=0.0) - aps(p, u=0.0),
                               torch.tensor([[2.0, 1.0, 3.0], [1.0, 2.0, 3.0]], dtype=torch.float64))
    # bfloat16 probabilities tie often; the scores must not depend on the sort's whims
    wide = torch.softmax(torch.randn(64, 100, generator=torch.Generator().manual_seed(0)), 1).bfloat16().double()
    wide = wide / wide.sum(dim=1, keepdim=True)
    assert torch.equal(aps(wide, u=1.0), aps(wide, u=1.0))


def test_randomised_aps_is_reproducible_with_a_generator_and_uses_one_u_per_sample():
    p = random_probs(50, 4, seed=4)
    a = aps(p, generator=torch.Generator().manual_seed(7))
    b = aps(p, generator=torch.Generator().manual_seed(7))
    c = aps(p, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # The same draws, reconstructed: one U per row, broadcast over classes.
    u = torch.rand(50, 1, generator=torch.Generator().manual_seed(7), dtype=p.dtype)
    torch.testing.assert_close(a, aps(p, u=u))
    # Randomised scores lie between the u=0 and u=1 versions.
    assert torch.all(aps(p, u=0.0) <= a) and torch.all(a <= aps(p, u=1.0) + 1e-7)


@pytest.mark.parametrize("lam,k_reg", [(0.01, 5), (0.001, 1), (0.5, 2), (0.0, 0)])
def test_raps_matches_loop_reference(lam, k_reg):
    p = random_probs(10, 8, seed=5, dtype=torch.float64)
    u = torch.rand(10, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    expected = aps_loop(p, u) + lam * (rank_loop(p) - k_reg).clamp(min=0).to(torch.float64)
    torch.testing.assert_close(raps(p, lam=lam, k_reg=k_reg, u=u), expected)


def test_raps_with_zero_lambda_is_aps_and_randomised_raps_reproducible():
    p = random_probs(30, 6, seed=9)
    torch.testing.assert_close(raps(p, lam=0.0, u=0.3), aps(p, u=0.3))
    a = raps(p, generator=torch.Generator().manual_seed(1))
    b = raps(p, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_logprob_is_log_softmax_and_normalised():
    logits = torch.randn(9, 5, generator=torch.Generator().manual_seed(0)) * 10
    lp = logprob(logits)
    torch.testing.assert_close(lp, torch.log_softmax(logits, dim=1))
    torch.testing.assert_close(lp.exp().sum(dim=1), torch.ones(9))


def test_get_score_registry():
    assert set(SCORES) == {"lac", "aps", "raps"}
    assert get_score("lac") is lac and get_score("aps") is aps and get_score("raps") is raps
    with pytest.raises(ValueError, match="unknown score 'thr'"):
        get_score("thr")


# --- scores from logits ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lac", "aps", "raps"])
def test_from_logits_is_the_score_of_the_softmax_and_the_engines_numbers_bit_for_bit(name):
    logits = 2 * torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    u = torch.rand(40, generator=torch.Generator().manual_seed(1))
    score, probs = score_object(name), softmax(logits)  # the engine's softmax
    torch.testing.assert_close(probs, torch.softmax(logits, dim=1))
    got = score.from_logits(logits, u=u)
    # The definition, on the probabilities (no ties here: equal up to the order of floating-point sums).
    torch.testing.assert_close(got, {"lac": lambda: lac(probs), "aps": lambda: aps(probs, u=u),
                                     "raps": lambda: raps(probs, u=u)}[name]())
    # What the engine computes from its own sort of every row.
    ranked = rank_pool(probs, torch.zeros(40, dtype=torch.long), need_order=True)
    assert torch.equal(got, score.class_scores(probs, u, ranked=ranked))
    assert got.dtype == logits.dtype and not got.requires_grad


def test_from_logits_u_none_draws_one_u_per_row_from_the_generator_and_u_1_is_deterministic():
    logits = torch.randn(30, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    aps_score = score_object("aps")
    a = aps_score.from_logits(logits, generator=torch.Generator().manual_seed(7))
    u = torch.rand(30, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.equal(a, aps_score.from_logits(logits, u=u))
    assert torch.equal(aps_score.from_logits(logits, u=1.0), aps_score.from_logits(logits, u=torch.ones(30)))
    torch.testing.assert_close(aps_score.from_logits(logits, u=1.0), aps(torch.softmax(logits, 1), u=1.0))
    # Deterministic scores ignore u; a custom score gets the softmax (the engine's).
    assert torch.equal(score_object("lac").from_logits(logits, u=0.3), 1 - softmax(logits))
    sq = Score("sq", lambda p: 1.0 - p ** 2)
    assert torch.equal(sq.from_logits(logits), 1.0 - softmax(logits) ** 2)


def test_from_logits_ties_share_the_score_as_in_the_engine():
    """Tied probabilities: the engine (and from_logits) give a tied class its group's score, where aps() breaks
    the tie by class index; the engine's coverage of a tied pool is what from_logits' scores give."""
    logits = torch.tensor([[2.0, 0.0, 0.0]] * 4)
    s = score_object("aps").from_logits(logits, u=1.0)
    assert torch.equal(s[:, 1], s[:, 2])
    assert aps(torch.softmax(logits, 1), u=1.0)[0, 2] > s[0, 1]
    labels = torch.tensor([1, 1, 1, 1])  # q_hat = the score of class 1
    _, (res,) = evaluate_pool(logits, labels, [1, 1, 1], scores=["aps"], predictors=["standard"], alphas=[0.4],
                              n_splits=1, randomized=False)
    assert float(res.metrics["size"][0, 0]) == 3.0  # class 2, tied with 1, enters with it (aps() would stop at 2)


def test_from_logits_rejects_bad_logits_and_u():
    with pytest.raises(ValueError, match=r"logits must have shape \[n, K\]"):
        score_object("lac").from_logits(torch.zeros(3))
    with pytest.raises(ValueError, match="logits contains NaN or inf"):
        score_object("aps").from_logits(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"u must be a scalar or have shape \[2\]"):
        score_object("aps").from_logits(torch.zeros(2, 3), u=torch.rand(3))


# --- bad inputs -------------------------------------------------------------------------------------------------

BAD_PROBS = [
    (torch.tensor([[0.5, float("nan")], [0.5, 0.5]]), "probs contains NaN or inf"),
    (torch.tensor([[0.5, float("inf")], [0.5, 0.5]]), "probs contains NaN or inf"),
    (torch.tensor([0.5, 0.5]), r"probs must have shape \[n, K\]"),
    (torch.ones(2, 3, 1) / 3, r"probs must have shape \[n, K\]"),
    (torch.tensor([[1, 0], [0, 1]]), "probs must be a floating-point tensor"),
    (torch.ones(3, 1), "probs must have at least 2 classes"),
    (torch.tensor([[2.0, -1.0]]), r"probs must lie in \[0, 1\].*not logits"),
    (torch.tensor([[0.2, 0.2]]), "probs rows must sum to 1"),
    ([[0.5, 0.5]], "probs must be a torch.Tensor"),
]


@pytest.mark.parametrize("fn", [lac, aps, raps], ids=["lac", "aps", "raps"])
@pytest.mark.parametrize("probs,match", BAD_PROBS)
def test_scores_reject_bad_probs(fn, probs, match):
    with pytest.raises(ValueError, match=match):
        fn(probs)


@pytest.mark.parametrize("fn", [aps, raps], ids=["aps", "raps"])
@pytest.mark.parametrize(
    "u,match",
    [(1.5, r"u must lie in \[0, 1\]"), (-0.1, r"u must lie in \[0, 1\]"), (float("nan"), r"u must lie in \[0, 1\]"),
     (torch.rand(3), r"u must be a scalar or have shape \[4\]"), (torch.rand(4, 2), r"u must be a scalar"),
     (torch.rand(4, 1, 1), r"u must be a scalar")],
)
def test_aps_raps_reject_bad_u(fn, u, match):
    with pytest.raises(ValueError, match=match):
        fn(random_probs(4, 3), u=u)


def test_raps_rejects_bad_regularisation():
    p = random_probs(4, 3)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        raps(p, lam=-0.1)
    with pytest.raises(ValueError, match="k_reg must be >= 0"):
        raps(p, k_reg=-1)


@pytest.mark.parametrize(
    "logits,match",
    [(torch.tensor([[0.0, float("nan")]]), "logits contains NaN or inf"),
     (torch.tensor([[0.0, float("-inf")]]), "logits contains NaN or inf"),
     (torch.zeros(3), r"logits must have shape \[n, K\]"),
     (torch.zeros(3, 2, dtype=torch.long), "logits must be a floating-point tensor")],
)
def test_logprob_rejects_bad_logits(logits, match):
    with pytest.raises(ValueError, match=match):
        logprob(logits)
