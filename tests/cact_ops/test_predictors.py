"""Predictors: SplitPredictor / ClasswisePredictor against the evaluation engine, their coverage guarantee as a
statistic, and their input checks.

Coverage data: exchangeable draws from a known model, Y ~ pi over K = 5 classes, X | Y=k ~ N(s_k e_k, I_5), and a
fixed, imperfect classifier with logits 1.2 x (continuous: no ties, which the upper bound of the guarantee needs).
For n calibration points and rank k = ceil((n+1)(1-alpha)), the coverage of a fresh test point given the
calibration set is Beta(k, n+1-k), mean mu = k/(n+1) in [1-alpha, 1-alpha+1/(n+1)); averaged over m test points
it gains Binomial(m)/m noise. So one split's coverage has variance v = var_B + (mu - mu^2 - var_B)/m exactly, and
the mean of R independent splits has standard error sqrt(v/R): the tolerance is Z = 4 of those, derived from
n, m and R (a correct predictor fails a check with probability 6e-5; an off-by-one rank moves the mean by
1/(n+1), about 8 standard errors here).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from cact_ops.cp import conformal_rank
from cact_ops.engine import draw_u, evaluate_pool, split_indices
from cact_ops.metrics import METRIC_REGISTRY
from cact_ops.predictors import ClasswisePredictor, SplitPredictor
from cact_ops.scores import Score, score_object

K = 5
ALPHA = 0.1
Z = 4.0
PRIOR = torch.tensor([0.35, 0.25, 0.2, 0.12, 0.08])
MEANS = torch.diag(torch.tensor([2.5, 2.0, 1.5, 1.0, 0.7], dtype=torch.float64))
RAPS_PARAMS = {"lam": 0.05, "k_reg": 1}  # k_reg=1 so the penalty acts with K = 5


def draw_logits(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Logits of the fixed classifier on fresh X | Y."""
    x = MEANS[labels] + torch.randn(labels.shape[0], K, generator=g, dtype=torch.float64)
    return 1.2 * x


def predictor(cls, score: str, seed: int):
    return cls(score, ALPHA, seed=seed, score_params=RAPS_PARAMS if score == "raps" else None)


def split_cp_se(n: int, m: int, r: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Exact mean coverage k/(n+1) of split CP with n calibration points, and the standard error of the mean
    coverage of r independent splits with m test points each."""
    k = conformal_rank(n, alpha)
    mu = k / (n + 1)
    var_b = k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2))
    return mu, math.sqrt((var_b + (mu - mu * mu - var_b) / m) / r)


# --- the coverage guarantee, as a statistic -----------------------------------------------------------------------


@pytest.mark.statistical
@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_split_predictor_covers_1_minus_alpha_on_average(score):
    n, m, r = 40, 60, 400
    g = torch.Generator().manual_seed(1)
    labels = torch.multinomial(PRIOR, r * (n + m), replacement=True, generator=g).view(r, n + m)
    logits = draw_logits(labels.flatten(), g).view(r, n + m, K)
    cp = predictor(SplitPredictor, score, seed=3)
    cov = torch.tensor([cp.calibrate(logits[i, :n], labels[i, :n]).evaluate(logits[i, n:], labels[i, n:])["coverage"]
                        for i in range(r)], dtype=torch.float64)
    mu, se = split_cp_se(n, m, r)
    mean = float(cov.mean())
    assert 1 - ALPHA - Z * se <= mean <= 1 - ALPHA + 1 / (n + 1) + Z * se, (mean, se)
    assert abs(mean - mu) <= Z * se, (mean, mu, se)


@pytest.mark.statistical
@pytest.mark.parametrize("score", ["lac", "aps"])
def test_classwise_predictor_covers_every_class(score):
    """n_k calibration points of class k: the mean coverage of class-k test points is ceil((n_k+1)(1-alpha))/(n_k+1)
    within Z standard errors, for every class; the standard predictor, on the same data, misses the hard class."""
    n_cal, m_test, r = [40, 30, 20, 12, 9], 20, 300  # 9: the least that gives a finite q_hat at alpha = 0.1
    g = torch.Generator().manual_seed(2)
    cal_labels = torch.repeat_interleave(torch.arange(K), torch.tensor(n_cal))
    test_labels = torch.arange(K).repeat_interleave(m_test)
    cw, std = predictor(ClasswisePredictor, score, seed=4), predictor(SplitPredictor, score, seed=4)
    per_class, per_class_std = torch.empty(r, K, dtype=torch.float64), torch.empty(r, K, dtype=torch.float64)
    for i in range(r):
        x_cal, x_test = draw_logits(cal_labels, g), draw_logits(test_labels, g)
        per_class[i] = cw.calibrate(x_cal, cal_labels).evaluate(x_test, test_labels)["class_coverage"]
        per_class_std[i] = std.calibrate(x_cal, cal_labels).evaluate(x_test, test_labels)["class_coverage"]
    for k in range(K):
        mu, se = split_cp_se(n_cal[k], m_test, r)
        mean = float(per_class[:, k].mean())
        assert abs(mean - mu) <= Z * se, (k, mean, mu, se)
        assert mean >= 1 - ALPHA - Z * se, (k, mean, se)
    # The hardest class (separation 0.7) is under-covered by one threshold for all classes: what class-wise fixes.
    assert float(per_class_std[:, K - 1].mean()) < 1 - ALPHA - 0.05


# --- the same numbers as the evaluation engine --------------------------------------------------------------------


def pool(n: int = 600, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(PRIOR, n, replacement=True, generator=g)
    return draw_logits(labels, g).to(dtype), labels


@pytest.mark.parametrize("classwise", [False, True], ids=["standard", "classwise"])
@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
@pytest.mark.parametrize("randomized", [True, False], ids=["random_u", "u_1"])
def test_evaluate_equals_the_engine_on_the_same_split(score, classwise, randomized):
    logits, labels = pool()
    train_counts = [500, 300, 100, 30, 8]
    seed = 7
    cal, test = split_indices(labels, 1, 0.5, seed)
    _, (res,) = evaluate_pool(logits, labels, train_counts, scores=[score], alphas=[ALPHA], splits=(cal, test),
                              predictors=["classwise" if classwise else "standard"], seed=seed,
                              randomized=randomized, score_params={"raps": RAPS_PARAMS})
    u = draw_u(len(labels), seed) if randomized else torch.ones(len(labels), dtype=torch.float64)
    cp = SplitPredictor(score, ALPHA, classwise=classwise, score_params=RAPS_PARAMS if score == "raps" else None)
    cp.calibrate(logits[cal[0]], labels[cal[0]], u=u[cal[0]])
    got = cp.evaluate(logits[test[0]], labels[test[0]], u=u[test[0]], train_counts=train_counts)
    assert set(got) == set(METRIC_REGISTRY) | {"class_coverage", "class_size"}
    for name, value in res.metrics.items():
        want = value[0, 0]
        if want.dim():  # class_coverage, class_size: [K]
            assert torch.equal(got[name], want), name
        else:
            assert got[name] == float(want) or (math.isnan(got[name]) and math.isnan(float(want))), name


def test_predict_test_rows_in_any_order_and_by_themselves():
    """A row's set depends on that row alone (and its U): shuffling or splitting the test rows changes nothing."""
    logits, labels = pool(300)
    u = torch.rand(300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for cls in (SplitPredictor, ClasswisePredictor):
        cp = cls("raps", ALPHA).calibrate(logits[:150], labels[:150], u=u[:150])
        sets = cp.predict(logits[150:], u=u[150:])
        perm = torch.randperm(150, generator=torch.Generator().manual_seed(1))
        assert torch.equal(cp.predict(logits[150:][perm], u=u[150:][perm]), sets[perm])
        assert torch.equal(torch.cat([cp.predict(logits[150:200], u=u[150:200]), cp.predict(logits[200:], u=u[200:])]),
                           sets)


def test_seed_makes_randomized_sets_reproducible_and_randomized_false_is_u_1():
    logits, labels = pool(200)
    a = SplitPredictor("aps", ALPHA, seed=5).calibrate(logits[:100], labels[:100])
    b = SplitPredictor("aps", ALPHA, generator=torch.Generator().manual_seed(5)).calibrate(logits[:100], labels[:100])
    assert torch.equal(a.q_hat, b.q_hat) and torch.equal(a.predict(logits[100:]), b.predict(logits[100:]))
    det = SplitPredictor("aps", ALPHA, randomized=False).calibrate(logits[:100], labels[:100])
    one = SplitPredictor("aps", ALPHA).calibrate(logits[:100], labels[:100], u=1.0)
    assert torch.equal(det.q_hat, one.q_hat)
    assert torch.equal(det.predict(logits[100:]), one.predict(logits[100:], u=1.0))


def test_sets_are_the_threshold_rule_and_lac_classwise_q_hat_is_the_per_class_quantile():
    logits, labels = pool(400, dtype=torch.float64)
    cp = ClasswisePredictor("lac", ALPHA).calibrate(logits[:200], labels[:200])
    s_cal = 1 - torch.softmax(logits[:200], 1)
    for k in range(K):
        s_k = s_cal[labels[:200] == k, k].sort().values
        rank = conformal_rank(s_k.numel(), ALPHA)
        assert cp.q_hat[k] == (s_k[rank - 1] if rank <= s_k.numel() else float("inf"))
    s_test = 1 - torch.softmax(logits[200:], 1)
    assert torch.equal(cp.predict(logits[200:]), s_test <= cp.q_hat)


def test_score_objects_and_custom_scores():
    logits, labels = pool(200)
    square = Score("square", lambda p: 1.0 - p ** 2)  # not registered: passed as an object
    by_name = SplitPredictor("lac", ALPHA).calibrate(logits[:100], labels[:100])
    by_obj = SplitPredictor(score_object("lac"), ALPHA).calibrate(logits[:100], labels[:100])
    assert torch.equal(by_name.q_hat, by_obj.q_hat)
    # 1 - p^2 is increasing in 1 - p: the same sets as LAC.
    sq = SplitPredictor(square, ALPHA).calibrate(logits[:100], labels[:100])
    assert torch.equal(sq.predict(logits[100:]), by_name.predict(logits[100:]))
    assert "square" in repr(sq) and "classwise=False" in repr(sq)


def test_evaluate_leaves_out_shot_group_sizes_without_train_counts():
    logits, labels = pool(200)
    m = SplitPredictor("lac", ALPHA).calibrate(logits[:100], labels[:100]).evaluate(logits[100:], labels[100:])
    assert "few_size" not in m and {"coverage", "size", "covgap", "accuracy", "sscv", "undercovered"} <= set(m)
    assert m["class_coverage"].shape == (K,) and m["class_size"].dtype == torch.float64


def test_too_few_calibration_points_warn_and_give_full_sets():
    logits, labels = pool(60)
    with pytest.warns(UserWarning, match=r"calibration set too small for alpha=0.1.*q_hat is \+inf"):
        cp = SplitPredictor("lac", ALPHA).calibrate(logits[:5], labels[:5])
    assert bool(cp.predict(logits[5:]).all())
    with pytest.warns(UserWarning, match="class-wise calibration: .* classes have too few calibration points"):
        cw = ClasswisePredictor("lac", ALPHA).calibrate(logits[:30], labels[:30])
    assert torch.isinf(cw.q_hat).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SplitPredictor("lac", ALPHA).calibrate(logits, labels)  # enough points: no warning


# --- bad inputs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [({"score": "thr"}, r"score must be a registered score name \(aps, lac, raps\).*got 'thr'"),
     ({"score": 3}, "score must be a registered score name"),
     ({"alpha": 0.0}, r"alpha must lie in the open interval \(0, 1\)"),
     ({"alpha": 1.5}, r"alpha must lie in the open interval \(0, 1\)"),
     ({"seed": 1, "generator": torch.Generator()}, "give seed or generator, not both"),
     ({"seed": 1.5}, "seed must be an int"),
     ({"generator": 0}, "generator must be a torch.Generator"),
     ({"score_params": [("lam", 0.1)]}, "score_params must be a mapping")],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    kwargs = {"score": "aps", "alpha": ALPHA, **kwargs}
    with pytest.raises(ValueError, match=match):
        SplitPredictor(**kwargs)


def test_calls_reject_bad_inputs_naming_the_argument():
    logits, labels = pool(40)
    cp = SplitPredictor("aps", ALPHA, seed=0)
    with pytest.raises(RuntimeError, match=r"not calibrated: call calibrate\(logits, labels\) first"):
        cp.predict(logits)
    cases = [
        ((logits[:, 0], labels), r"logits must have shape \[n, K\]"),
        ((logits.long(), labels), "logits must be a floating-point tensor"),
        ((torch.where(logits > 2, float("nan"), logits), labels), "logits contains NaN or inf"),
        ((logits[:0], labels[:0]), "empty calibration set: logits has 0 rows"),
        ((logits, labels.float()), "labels must be an integer tensor"),
        ((logits, labels[:-1]), r"labels must have shape \[40\]"),
        ((logits, torch.full((40,), K)), rf"labels must lie in \[0, {K}\)"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            cp.calibrate(*args)
    with pytest.raises(ValueError, match=r"u must be a scalar or have shape \[40\]"):
        cp.calibrate(logits, labels, u=torch.rand(39))
    with pytest.raises(ValueError, match=r"u must lie in \[0, 1\]"):
        cp.calibrate(logits, labels, u=2.0)
    cp.calibrate(logits, labels)
    with pytest.raises(ValueError, match=f"logits have 3 classes but the predictor was calibrated on {K}"):
        cp.predict(logits[:, :3])
    with pytest.raises(ValueError, match=r"labels must have shape \[40\]"):
        cp.evaluate(logits, labels[:-1])
    with pytest.raises(ValueError, match="empty test set"):
        cp.evaluate(logits[:0], labels[:0])
    with pytest.raises(ValueError, match=f"train_counts has 3 classes but logits have {K}"):
        cp.evaluate(logits, labels, train_counts=[10, 5, 1])
    with pytest.raises(ValueError, match="lam and k_reg must be >= 0"):
        SplitPredictor("raps", ALPHA, score_params={"lam": -1.0}).calibrate(logits, labels)
