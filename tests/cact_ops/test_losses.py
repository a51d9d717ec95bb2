"""Losses: CE, ConfTr (and ConfTr-class), CaCT; the batch split."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cact_ops.alm import DualConfig, DualState, phr, phr_grad
from cact_ops.losses import METHODS, CaCTLoss, CELoss, ConfTrLoss, check_method, split_batch
from cact_ops.smooth import smooth_threshold_level, soft_quantile

K = 4
CONFTR_KEYS = {"ce", "penalty", "coverage_loss", "soft_size", "tau", "class_soft_size", "class_penalty",
               "class_size_sums", "class_counts"}
CACT_KEYS = {"ce", "penalty", "soft_size", "tau", "class_soft_size", "class_penalty", "class_size_sums", "class_counts"}


def batch(n=32, num_classes=K, seed=0, absent=None):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, num_classes, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    if absent is not None:
        labels[labels == absent] = (absent + 1) % num_classes
    return logits, labels


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def manual_soft_sizes(logits, labels, alpha=0.1, temperature=1.0, strength=0.1, seed=0, stratified=False):
    """The ConfTr/CaCT forward written out: split, smooth threshold on B_cal, soft sizes on B_pred."""
    conf = torch.log_softmax(logits, dim=1)
    cal, pred = split_batch(labels, 0.5, stratified, gen(seed))
    true_cal = conf[cal].gather(1, labels[cal, None]).squeeze(1)
    tau = soft_quantile(true_cal, smooth_threshold_level(alpha, cal.shape[0]), strength)
    sets = torch.sigmoid((conf[pred] - tau) / temperature)
    return sets.sum(dim=1), labels[pred], tau, sets


# --- split_batch --------------------------------------------------------------------------------------------------

def test_split_batch_partitions_the_batch():
    labels = torch.randint(0, 3, (25,), generator=gen(1))
    for stratified in (False, True):
        cal, pred = split_batch(labels, 0.4, stratified, gen(2))
        assert sorted(torch.cat([cal, pred]).tolist()) == list(range(25))
    cal, pred = split_batch(labels, 0.4, False, gen(2))
    assert cal.shape[0] == 10  # round(0.4 * 25)
    a, b = split_batch(labels, 0.4, True, gen(3)), split_batch(labels, 0.4, True, gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_split_batch_stratified_counts():
    labels = torch.tensor([0] * 4 + [1] * 6 + [2] * 2 + [3] * 3 + [5] * 5)
    labels = labels[torch.randperm(labels.shape[0], generator=gen(4))]
    cal, pred = split_batch(labels, 0.5, stratified=True, generator=gen(5))
    per_class = torch.bincount(labels[cal], minlength=6).tolist()
    # round(0.5 * n_k) per class (round half to even, as torch.round: 1.5 -> 2, 2.5 -> 2)
    assert per_class == [2, 3, 1, 2, 0, 2]
    cal, _ = split_batch(labels, 0.2, stratified=True, generator=gen(6))
    assert torch.bincount(labels[cal], minlength=6).tolist() == [1, 1, 0, 1, 0, 1]


def test_split_batch_tiny_batches_keep_both_parts():
    for labels in (torch.tensor([0, 1]), torch.tensor([3, 3]), torch.tensor([0, 1, 2])):
        for stratified in (False, True):
            cal, pred = split_batch(labels, 0.5, stratified, gen(0))
            assert cal.numel() >= 1 and pred.numel() >= 1


# --- CE and ConfTr ------------------------------------------------------------------------------------------------

def test_ce_loss():
    logits, labels = batch()
    loss, diag = CELoss()(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    assert set(diag) == {"ce", "penalty"} and diag["penalty"] == 0


def test_conftr_returns_finite_loss_documented_diagnostics_and_gradient():
    logits, labels = batch()
    logits.requires_grad_(True)
    loss, diag = ConfTrLoss(alpha=0.1, generator=gen())(logits, labels)
    assert torch.isfinite(loss) and set(diag) == CONFTR_KEYS
    assert all(not v.requires_grad for v in diag.values())
    assert diag["class_soft_size"].shape == (K,) and diag["tau"].dim() == 0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad != 0).any()


def test_conftr_matches_manual_computation():
    logits, labels = batch(seed=1)
    for kappa, transform in ((1.0, "none"), (0.0, "none"), (1.0, "log")):
        loss_fn = ConfTrLoss(alpha=0.1, lam=0.7, kappa=kappa, size_transform=transform, temperature=0.5,
                             generator=gen(9))
        loss, diag = loss_fn(logits, labels)
        size, y, tau, sets = manual_soft_sizes(logits, labels, 0.1, 0.5, seed=9)
        size_loss = (size - kappa).clamp(min=0).mean()
        if transform == "log":
            size_loss = torch.log(size_loss + 1e-8)
        torch.testing.assert_close(loss, F.cross_entropy(logits, labels) + 0.7 * size_loss)
        torch.testing.assert_close(diag["tau"], tau)
        torch.testing.assert_close(diag["soft_size"], size.mean())
        # identity loss matrix: coverage loss = mean over B_pred of 1 - C_y(x)
        torch.testing.assert_close(diag["coverage_loss"], (1 - sets.gather(1, y[:, None])).mean())


def test_conftr_with_lambda_zero_is_cross_entropy():
    logits, labels = batch(seed=2)
    logits.requires_grad_(True)
    loss, _ = ConfTrLoss(lam=0.0, generator=gen())(logits, labels)
    ce = F.cross_entropy(logits, labels)
    torch.testing.assert_close(loss, ce)
    g1, = torch.autograd.grad(loss, logits)
    g2, = torch.autograd.grad(ce, logits)
    torch.testing.assert_close(g1, g2)


def test_conftr_coverage_loss_with_a_loss_matrix():
    logits, labels = batch(seed=3)
    L = torch.ones(K, K)
    loss, diag = ConfTrLoss(lam=0.0, coverage_weight=2.0, loss_matrix=L, generator=gen(4))(logits, labels)
    _, y, _, sets = manual_soft_sizes(logits, labels, seed=4)
    onehot = F.one_hot(y, K).float()
    expected = (onehot * (1 - sets) + (1 - onehot) * sets).sum(dim=1).mean()
    torch.testing.assert_close(diag["coverage_loss"], expected)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels) + 2.0 * expected)


def test_conftr_class_has_one_threshold_per_class_and_falls_back_for_rare_classes():
    logits, labels = batch(n=64, seed=4)
    labels[labels == 3] = 0
    labels[0] = 3  # class 3 has a single sample: fewer than 2 in B_cal, falls back to the global tau
    loss, diag = ConfTrLoss(classwise_tau=True, stratified=True, generator=gen(5))(logits, labels)
    assert torch.isfinite(loss) and diag["tau"].shape == (K,)
    _, _, global_tau, _ = manual_soft_sizes(logits, labels, seed=5, stratified=True)
    torch.testing.assert_close(diag["tau"][3], global_tau)
    assert not torch.allclose(diag["tau"][:3], global_tau.expand(3))


def test_absent_class_gives_nan_class_diagnostics_and_finite_loss():
    logits, labels = batch(absent=2, seed=5)
    for loss_fn in (ConfTrLoss(generator=gen()), CaCTLoss(DualState(K), generator=gen()),
                    CaCTLoss(DualState(K), reduction="class", generator=gen())):
        loss, diag = loss_fn(logits, labels)
        assert torch.isfinite(loss)
        assert torch.isnan(diag["class_soft_size"][2]) and torch.isnan(diag["class_penalty"][2])
        assert torch.isfinite(diag["class_soft_size"][[0, 1, 3]]).all()


# --- CaCT ---------------------------------------------------------------------------------------------------------

def dual_with(lam, rho):
    d = DualState(K, DualConfig(lambda_max=100.0, rho_max=100.0))
    d.lam = torch.tensor(lam, dtype=torch.float64)
    d.rho = torch.tensor(rho, dtype=torch.float64)
    return d


def test_cact_returns_finite_loss_documented_diagnostics_and_gradient():
    logits, labels = batch(seed=6)
    logits.requires_grad_(True)
    d = dual_with([0.5, 2.0, 1.0, 3.0], [1.0, 1.0, 2.0, 1.0])
    loss, diag = CaCTLoss(d, eta=1.0, generator=gen())(logits, labels)
    assert torch.isfinite(loss) and set(diag) == CACT_KEYS
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad != 0).any()


@pytest.mark.parametrize("reduction", ["sample", "class"])
def test_cact_matches_manual_phr_penalty(reduction):
    logits, labels = batch(seed=7)
    lam, rho = [0.5, 2.0, 1.0, 3.0], [1.0, 1.5, 2.0, 1.0]
    loss, diag = CaCTLoss(dual_with(lam, rho), eta=1.2, reduction=reduction, temperature=0.7, generator=gen(3))(
        logits, labels)
    size, y, _, _ = manual_soft_sizes(logits, labels, temperature=0.7, seed=3)
    per_sample = phr(size - 1.2, torch.tensor(rho)[y], torch.tensor(lam)[y])
    if reduction == "sample":
        penalty = per_sample.mean()
    else:
        penalty = torch.stack([per_sample[y == k].mean() for k in range(K) if (y == k).any()]).mean()
    torch.testing.assert_close(diag["penalty"], penalty)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels) + penalty)


def test_cact_reads_the_current_multipliers_of_its_dual_state():
    logits, labels = batch(seed=8)
    d = dual_with([0.1] * K, [1.0] * K)
    loss_fn = CaCTLoss(d, eta=1.0, generator=gen(0), reduction="sample")
    loss1, _ = loss_fn(logits, labels)
    d.lam = torch.tensor([0.1, 0.1, 5.0, 0.1], dtype=torch.float64)  # what a dual step does
    loss_fn.generator.manual_seed(0)  # same split
    loss2, _ = loss_fn(logits, labels)
    size, y, _, _ = manual_soft_sizes(logits, labels, seed=0)
    h, rho = size - 1.0, torch.ones_like(size)
    expected = (phr(h, rho, d.lam.float()[y]) - phr(h, rho, torch.full_like(h, 0.1))).mean()
    torch.testing.assert_close(loss2 - loss1, expected)
    assert expected != 0  # class 2 is in B_pred and its multiplier changed


def test_cact_with_tiny_multipliers_and_small_sets_is_cross_entropy_up_to_a_constant():
    logits, _ = batch(seed=9)
    labels = logits.argmax(dim=1)  # confident and right: every soft size is below eta = 3, so lambda + rho h < 0
    logits.requires_grad_(True)
    loss, diag = CaCTLoss(DualState(K), eta=3.0, generator=gen())(logits, labels)
    assert float(diag["penalty"]) == pytest.approx(-(1e-6**2) / 2, abs=1e-12)
    g1, = torch.autograd.grad(loss, logits)
    g2, = torch.autograd.grad(F.cross_entropy(logits, labels), logits)
    torch.testing.assert_close(g1, g2)


# --- the scalar loss and the dual step in one call ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["ce", "conftr", "cact"])
def test_return_diagnostics_false_gives_the_same_scalar_loss_and_gradient(name):
    make = {"ce": lambda **kw: CELoss(**kw), "conftr": lambda **kw: ConfTrLoss(generator=gen(4), **kw),
            "cact": lambda **kw: CaCTLoss(dual_with([0.5, 2.0, 1.0, 3.0], [1.0] * K), generator=gen(4), **kw)}[name]
    logits, labels = batch(seed=11)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    loss, diag = make()(a, labels)  # the default: (loss, diagnostics), what cact_ops.training reads
    scalar = make(return_diagnostics=False)(b, labels)
    assert isinstance(diag, dict) and isinstance(scalar, torch.Tensor) and scalar.dim() == 0
    assert torch.equal(scalar, loss)
    loss.backward()
    scalar.backward()
    assert torch.equal(a.grad, b.grad)


def test_dual_step_is_the_documented_protocol_on_validation_logits():
    g = torch.Generator().manual_seed(12)
    logits, labels = 2 * torch.randn(200, K, generator=g), torch.arange(K).repeat(50)
    lam, rho = [0.5, 2.0, 1.0, 3.0], [1.0, 1.5, 2.0, 1.0]
    loss_fn = CaCTLoss(dual_with(lam, rho), alpha=0.1, eta=1.5, temperature=0.5, regularization_strength=1.0)
    h_mean = loss_fn.dual_step(logits, labels, cal_fraction=0.2, seed=3, epoch=4)
    # Written out: a stratified 20% calibrates the smooth threshold, the rest gives h = S - eta per class.
    conf = torch.log_softmax(logits, 1)
    cal, rest = split_batch(labels, 0.2, stratified=True, generator=gen(3))
    tau = soft_quantile(conf[cal].gather(1, labels[cal, None]).squeeze(1), smooth_threshold_level(0.1, 40), 1.0)
    h = torch.sigmoid((conf[rest] - tau) / 0.5).sum(1).double() - 1.5
    y = labels[rest]
    want_h = torch.stack([h[y == k].mean() for k in range(K)])
    want_lam = torch.stack([phr_grad(h[y == k], rho[k], lam[k]).mean() for k in range(K)]).clamp(1e-6, 100.0)
    torch.testing.assert_close(h_mean, want_h)
    torch.testing.assert_close(loss_fn.dual.lam, want_lam)
    assert loss_fn.dual.steps == 1 and loss_fn.dual.history[-1]["epoch"] == 4
    with pytest.raises(ValueError, match=f"logits have 3 classes but the DualState has {K}"):
        loss_fn.dual_step(logits[:, :3], labels % 3)
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {K}\)"):
        loss_fn.dual_step(logits, labels + 1)


def test_methods_registry():
    assert METHODS == ("ce", "ce_finetune", "conftr", "conftr_class", "cact_uniform", "cact")
    assert check_method("cact") == "cact"
    with pytest.raises(ValueError, match="unknown method 'dpsm'"):
        check_method("dpsm")


# --- bad inputs -------------------------------------------------------------------------------------------------

LOSSES = {
    "ce": lambda: CELoss(),
    "conftr": lambda: ConfTrLoss(generator=gen()),
    "cact": lambda: CaCTLoss(DualState(K), generator=gen()),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_reject_bad_logits_and_labels(name):
    loss_fn = LOSSES[name]()
    logits, labels = batch(n=8)
    bad_logits = logits.clone()
    bad_logits[3, 1] = float("nan")
    cases = [
        ((bad_logits, labels), "logits contains NaN or inf"),
        ((torch.where(bad_logits.isnan(), float("inf"), bad_logits), labels), "logits contains NaN or inf"),
        ((logits[:, 0], labels), r"logits must have shape \[n, K\]"),
        ((logits, torch.full((8,), K)), rf"labels must lie in \[0, {K}\)"),
        ((logits, labels.float()), "labels must be an integer tensor"),
        ((logits, labels[:7]), r"labels must have shape \[8\]"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            loss_fn(*args)


def test_loss_constructors_reject_bad_settings():
    d = DualState(K)
    for alpha in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha must lie in the open interval"):
            ConfTrLoss(alpha=alpha)
        with pytest.raises(ValueError, match="alpha must lie in the open interval"):
            CaCTLoss(d, alpha=alpha)
    with pytest.raises(ValueError, match="temperature T must be > 0"):
        ConfTrLoss(temperature=0.0)
    with pytest.raises(ValueError, match="regularization_strength must be > 0"):
        CaCTLoss(d, regularization_strength=-1.0)
    with pytest.raises(ValueError, match="size_transform must be 'none' or 'log'"):
        ConfTrLoss(size_transform="sqrt")
    with pytest.raises(ValueError, match="lam must be >= 0"):
        ConfTrLoss(lam=-1.0)
    with pytest.raises(ValueError, match="dual must be a cact_ops.alm.DualState"):
        CaCTLoss(torch.ones(K))
    with pytest.raises(ValueError, match="reduction must be 'sample' or 'class'"):
        CaCTLoss(d, reduction="mean")
    with pytest.raises(ValueError, match="logits have 3 classes but the DualState has 4"):
        CaCTLoss(d)(torch.randn(8, 3), torch.randint(0, 3, (8,)))


def test_split_batch_rejects_bad_inputs():
    labels = torch.tensor([0, 1, 0, 1])
    for f in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"cal_fraction must lie in \(0, 1\)"):
            split_batch(labels, f)
    with pytest.raises(ValueError, match="needs a batch of at least 2 samples, got 1"):
        split_batch(torch.tensor([0]))
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        split_batch(labels.float())
    with pytest.raises(ValueError, match="labels must be a 1-D tensor"):
        split_batch(labels[:, None])
    with pytest.raises(ValueError, match="labels must be >= 0"):
        split_batch(torch.tensor([0, -1, 1]), stratified=True)
