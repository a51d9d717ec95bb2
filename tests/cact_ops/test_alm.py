"""Augmented Lagrangian: the PHR penalty, and DualState's update, rho schedule, state and statistics."""
from __future__ import annotations

import io
import math

import pytest
import torch

from cact_ops.alm import DualConfig, DualState, phr, phr_grad


@pytest.mark.parametrize("rho,lam", [(1.0, 0.5), (2.0, 1e-6), (0.3, 3.0), (10.0, 0.0)])
def test_phr_grad_matches_central_finite_differences(rho, lam):
    h = torch.linspace(-3, 3, 241, dtype=torch.float64)
    h = h[(lam + rho * h).abs() > 1e-3]  # away from the kink at h = -lam / rho
    d = 1e-6
    fd = (phr(h + d, rho, lam) - phr(h - d, rho, lam)) / (2 * d)
    torch.testing.assert_close(phr_grad(h, rho, lam), fd, atol=1e-6, rtol=1e-6)
    # autograd agrees with the closed form everywhere, kink included
    h2 = torch.linspace(-3, 3, 61, dtype=torch.float64, requires_grad=True)
    phr(h2, rho, lam).sum().backward()
    torch.testing.assert_close(h2.grad, phr_grad(h2.detach(), rho, lam))


def test_phr_shape_and_values():
    rho, lam = 2.0, 0.6
    assert float(phr(torch.tensor(0.0), rho, lam)) == 0.0  # P(0) = 0 whatever lambda
    below = phr(torch.tensor([-10.0, -1.0, -0.3]), rho, lam)  # lam + rho h <= 0: constant -lam^2 / (2 rho)
    torch.testing.assert_close(below, torch.full((3,), -lam**2 / (2 * rho)))
    h = torch.tensor(0.7)
    assert float(phr(h, rho, lam)) == pytest.approx(((lam + rho * 0.7) ** 2 - lam**2) / (2 * rho))
    # per-sample rho and lambda tensors broadcast elementwise
    out = phr(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([0.5, 2.0]))


H = torch.tensor([0.5, -1.0, 0.25, 1.0, -0.2], dtype=torch.float64)
Y = torch.tensor([0, 0, 1, 1, 0])
CFG = DualConfig(lambda_init=1.0, lambda_min=1e-6, lambda_max=100.0, rho_init=2.0, rho_step=0)


def _step(d: DualState, h=H, y=Y, epoch=None):
    sums, counts, h_sums = d.statistics(h, y)
    d.update(sums, counts, h_sums / counts.clamp(min=1), epoch=epoch)


def test_statistics_hand_computed():
    d = DualState(3, CFG)
    sums, counts, h_sums = d.statistics(H, Y)
    # P'(h) = max(0, 1 + 2h): class 0 -> 2.0, 0.0, 0.6; class 1 -> 1.5, 3.0; class 2 absent
    torch.testing.assert_close(sums, torch.tensor([2.6, 4.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(counts, torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(h_sums, torch.tensor([-0.7, 1.25, 0.0], dtype=torch.float64))


def test_update_per_class_hand_computed_and_absent_class_keeps_lambda():
    d = DualState(3, CFG)
    _step(d, epoch=7)
    torch.testing.assert_close(d.lam, torch.tensor([2.6 / 3, 2.25, 1.0], dtype=torch.float64))
    torch.testing.assert_close(d.rho, torch.full((3,), 2.0, dtype=torch.float64))
    row = d.history[-1]
    assert row["step"] == 1 and row["epoch"] == 7 and row["rho_checked"] is False
    assert row["counts"] == [3.0, 2.0, 0.0]
    assert row["constraint"][:2] == pytest.approx([-0.7 / 3, 0.625]) and math.isnan(row["constraint"][2])
    # second step uses the new multipliers: class 0 P' = max(0, 0.8667 + 2h)
    _step(d)
    lam0 = 2.6 / 3
    expected0 = (max(0, lam0 + 1.0) + max(0, lam0 - 2.0) + max(0, lam0 - 0.4)) / 3
    expected1 = (max(0, 2.25 + 0.5) + max(0, 2.25 + 2.0)) / 2
    torch.testing.assert_close(d.lam, torch.tensor([expected0, expected1, 1.0], dtype=torch.float64))
    assert d.history[-1]["epoch"] == 1  # defaults to steps - 1


def test_update_uniform_hand_computed():
    d = DualState(3, CFG, uniform=True)
    assert d.uniform
    _step(d)
    # one shared multiplier from the pooled constraint: (2.0 + 0 + 0.6 + 1.5 + 3.0) / 5
    torch.testing.assert_close(d.lam, torch.full((3,), 7.1 / 5, dtype=torch.float64))
    assert d.history[-1]["constraint"] == pytest.approx([0.11] * 3)  # mean h over all 5 samples
    assert d.history[-1]["counts"] == [5.0] * 3
    # no sample at all: nothing changes
    before = d.lam.clone()
    d.update(torch.zeros(3), torch.zeros(3), torch.zeros(3))
    assert torch.equal(d.lam, before)


def test_lambda_is_clamped_to_its_bounds():
    d = DualState(2, CFG, lambda_max=1.5)
    _step(d, h=torch.tensor([5.0, -5.0], dtype=torch.float64), y=torch.tensor([0, 1]))
    # class 0: max(0, 1 + 10) = 11 -> 1.5; class 1: max(0, 1 - 10) = 0 -> lambda_min
    torch.testing.assert_close(d.lam, torch.tensor([1.5, 1e-6], dtype=torch.float64))


def test_rho_schedule_every_rho_step_with_cap():
    cfg = DualConfig(rho_init=1.0, rho_max=1.3, rho_step=2, gamma=1.2, tau_rho=0.9)
    d = DualState(3, cfg)
    y = torch.tensor([0, 1, 2])

    def step(c):
        _step(d, h=torch.tensor(c, dtype=torch.float64), y=y)

    step([1.0, -0.5, 0.3])  # step 1: no check, remembers c_prev
    assert d.rho.tolist() == [1.0, 1.0, 1.0] and d.c_prev.tolist() == [1.0, -0.5, 0.3]
    step([0.95, 0.2, 0.1])  # step 2: check. 0.95 > 0.9*1.0 grow; 0.2 > 0.9*max(-0.5, 0) grow; 0.1 < 0.27 keep
    assert d.rho.tolist() == pytest.approx([1.2, 1.2, 1.0])
    assert d.history[-1]["rho_checked"] is True
    assert d.c_prev.tolist() == pytest.approx([0.95, 0.2, 0.1])
    step([5.0, 5.0, 5.0])  # step 3: no check, whatever the constraint
    assert d.rho.tolist() == pytest.approx([1.2, 1.2, 1.0])
    step([0.9, 0.1, 0.2])  # step 4: compared with step 2: 0.9 > 0.855 grow (capped at 1.3); 0.1 < 0.18 keep; 0.2 > 0.09 grow
    assert d.rho.tolist() == pytest.approx([1.3, 1.2, 1.2])


def test_rho_schedule_off_and_unseen_class_never_grows():
    d = DualState(2, DualConfig(rho_step=0))
    for _ in range(25):
        _step(d, h=torch.tensor([3.0, 3.0], dtype=torch.float64), y=torch.tensor([0, 1]))
    assert d.rho.tolist() == [1.0, 1.0]
    d = DualState(2, DualConfig(rho_step=1))
    for _ in range(3):
        _step(d, h=torch.tensor([3.0], dtype=torch.float64), y=torch.tensor([0]))
    assert d.rho[1] == 1.0 and math.isnan(d.c_prev[1])
    assert d.rho[0] == pytest.approx(1.2**2)  # step 1 has no reference; steps 2 and 3 grow


def nan_safe(obj):
    """The same structure with NaN replaced by a marker, so histories with absent classes compare with ==."""
    if isinstance(obj, float) and math.isnan(obj):
        return "nan"
    if isinstance(obj, dict):
        return {k: nan_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_safe(v) for v in obj]
    return obj


def test_state_dict_round_trip_through_torch_save_weights_only():
    d = DualState(3, CFG, rho_step=2)
    _step(d)
    _step(d, h=H * 2)
    buf = io.BytesIO()
    torch.save(d.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    e = DualState.from_state_dict(state)
    assert e.config == d.config and e.steps == d.steps and nan_safe(e.history) == nan_safe(d.history)
    assert torch.equal(e.lam, d.lam) and torch.equal(e.rho, d.rho)
    assert torch.equal(torch.nan_to_num(e.c_prev, nan=-7.0), torch.nan_to_num(d.c_prev, nan=-7.0))
    # the copy is independent, and both continue identically
    _step(d, h=H - 0.3)
    _step(e, h=H - 0.3)
    assert torch.equal(e.lam, d.lam) and torch.equal(e.rho, d.rho) and nan_safe(e.history) == nan_safe(d.history)
    assert len(d.history) == 3
    f = DualState(3)
    f.load_state_dict(state)
    assert f.config == DualConfig(**state["config"]) and f.steps == 2
    with pytest.raises(ValueError, match="state has 3 classes, this DualState has 4"):
        DualState(4).load_state_dict(state)


def test_statistics_of_two_shards_sum_to_the_whole():
    g = torch.Generator().manual_seed(0)
    d = DualState(4, DualConfig(lambda_init=0.3, rho_init=1.7))
    h = torch.randn(101, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (101,), generator=g)
    whole = d.statistics(h, y)
    a, b = d.statistics(h[:40], y[:40]), d.statistics(h[40:], y[40:])
    for w, x, z in zip(whole, a, b):
        torch.testing.assert_close(x + z, w, rtol=1e-12, atol=1e-12)
    # float32 input on another shard gives the same (statistics are float64)
    torch.testing.assert_close(d.statistics(h.float(), y)[1], whole[1])


# --- bad inputs -------------------------------------------------------------------------------------------------

def test_dual_config_and_state_reject_bad_settings():
    with pytest.raises(ValueError, match="need 0 < lambda_min <= lambda_init <= lambda_max"):
        DualConfig(lambda_init=10.0, lambda_max=1.0)
    with pytest.raises(ValueError, match="need 0 < lambda_min <= lambda_init <= lambda_max"):
        DualConfig(lambda_min=0.0, lambda_init=0.0)
    with pytest.raises(ValueError, match="need 0 < rho_init <= rho_max"):
        DualConfig(rho_init=20.0)
    with pytest.raises(ValueError, match="rho_step must be >= 0"):
        DualConfig(rho_step=-1)
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        DualConfig(gamma=0.5)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        DualState(0)


def test_statistics_and_update_reject_bad_inputs():
    d = DualState(3)
    with pytest.raises(ValueError, match=r"h and labels must both have shape \[n\]"):
        d.statistics(torch.zeros(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"h and labels must both have shape \[n\]"):
        d.statistics(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        d.statistics(torch.zeros(2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        d.statistics(torch.zeros(2), torch.tensor([0.0, 1.7]))
    with pytest.raises(ValueError, match="h contains NaN"):
        d.statistics(torch.tensor([0.0, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class_sums must have 3 entries, got 2"):
        d.update(torch.zeros(2), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="class_h_means must have 3 entries, got 4"):
        d.update(torch.zeros(3), torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="class_counts must be >= 0"):
        d.update(torch.zeros(3), torch.tensor([1.0, -1.0, 0.0]), torch.zeros(3))
    with pytest.raises(ValueError, match="class_sums contains NaN or inf"):
        d.update(torch.tensor([float("nan"), 0.0, 0.0]), torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="class_h_means contains NaN for a class with samples"):
        d.update(torch.zeros(3), torch.ones(3), torch.tensor([0.0, float("nan"), 0.0]))
    # a failed update changes nothing
    assert d.steps == 0 and d.history == [] and torch.equal(d.lam, torch.full((3,), 1e-6, dtype=torch.float64))
