"""The in-process epoch loop: every method runs, the dual step, exact resume, determinism, config checks."""
from __future__ import annotations

import io
import math

import pytest
import torch

from cact_ops.alm import DualState
from cact_ops.cp import calibrate, predict_sets
from cact_ops.losses import METHODS, CaCTLoss, CELoss, ConfTrLoss
from cact_ops.models import build_model
from cact_ops.training import (
    EpochLoop,
    LocalComm,
    TrainConfig,
    build_loss,
    build_optimizer,
    crop_flip,
    fit_in_process,
    format_epoch,
    iterate_tensors,
    smooth_dual_threshold,
    val_cal_mask,
    val_objective,
)

K, D = 3, 4


def blobs(counts, seed):
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.eye(K, D)
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    x = means[y] + torch.randn(y.shape[0], D, generator=g)
    return x, y


TRAIN = blobs([60, 30, 15], seed=0)
VAL = blobs([20, 20, 20], seed=1)
COUNTS = torch.bincount(TRAIN[1], minlength=K)  # weights of the calibration scores (cal_weighting="balanced")


def tiny_cfg(method, **kw):
    base = dict(method=method, epochs=2, batch_size=16, lr=0.05, seed=3, rho_step=1)
    return TrainConfig(**{**base, **kw})


def linear_model(seed=0):
    torch.manual_seed(seed)
    return build_model("linear", K, in_features=D)


def run_epochs(loop: EpochLoop, n: int):
    """What fit_in_process does per epoch, for a loop built by hand."""
    is_cal = val_cal_mask(VAL[1], loop.cfg.val_cal_fraction, loop.cfg.seed)
    for _ in range(n):
        tm = loop.train_epoch(iterate_tensors(*TRAIN, loop.cfg.batch_size, True, loop.generator))
        stats = loop.validation_statistics(iterate_tensors(*VAL, 25, False, extra=is_cal))
        loop.end_epoch(tm, stats)


@pytest.mark.parametrize("method", METHODS)
def test_fit_in_process_runs_every_method(method):
    loop = fit_in_process(linear_model(), tiny_cfg(method), TRAIN, VAL)
    assert loop.epoch == 2 and len(loop.metrics) == 2 and len(loop.history) == 2 * K
    m = loop.metrics[-1]
    for key in ("train_loss", "train_ce", "train_penalty", "val_accuracy", "val_coverage", "val_size", "lambda_max"):
        assert math.isfinite(m[key]), key
    assert 0 <= m["val_coverage"] <= 1 and 0 <= m["val_size"] <= K
    assert {r["class"] for r in loop.history} == set(range(K))
    if method.startswith("cact"):
        assert len(loop.dual.history) == 2 and [r["epoch"] for r in loop.dual.history] == [0, 1]
        if method == "cact_uniform":
            assert len(set(loop.dual.lam.tolist())) == 1
        assert loop.dual.lam.tolist() == [r["lambda"] for r in loop.history if r["epoch"] == 1]
    else:
        assert loop.dual is None
    assert "epoch   1" in format_epoch(method, m)


def test_build_loss_picks_the_method():
    assert isinstance(build_loss(tiny_cfg("ce"), None), CELoss)
    assert isinstance(build_loss(tiny_cfg("ce_finetune"), None), CELoss)  # the control: CE, fine-tune protocol
    assert isinstance(build_loss(tiny_cfg("conftr"), None, train_counts=COUNTS), ConfTrLoss)
    conftr_class = build_loss(tiny_cfg("conftr_class"), None, train_counts=COUNTS)
    assert isinstance(conftr_class, ConfTrLoss) and conftr_class.classwise_tau
    # balanced calibration: weight 1 / n_k per class; "none": ConfTr's plain batch quantile
    torch.testing.assert_close(conftr_class.cal_weights, 1.0 / COUNTS.double())
    assert build_loss(tiny_cfg("conftr", cal_weighting="none"), None).cal_weights is None
    with pytest.raises(ValueError, match="needs the per-class training counts"):
        build_loss(tiny_cfg("cact"), None)
    cfg = tiny_cfg("cact_uniform")
    assert cfg.dual_config.uniform and not tiny_cfg("cact").dual_config.uniform
    loop = EpochLoop(linear_model(), cfg, K, train_counts=COUNTS)
    assert isinstance(loop.loss_fn, CaCTLoss) and loop.loss_fn.dual is loop.dual and loop.dual.uniform


def test_dual_source_train_estimates_multipliers_on_the_training_set():
    loop = fit_in_process(linear_model(), tiny_cfg("cact", dual_source="train"), TRAIN, VAL)
    counts = loop.dual.history[-1]["counts"]
    n_cal = val_cal_mask(TRAIN[1], 0.2, 3).sum()
    assert sum(counts) == TRAIN[1].shape[0] - n_cal  # the non-calibration part of the training set


def test_eta_relative_is_a_fraction_of_the_starting_models_soft_size_and_survives_a_resume():
    from cact_ops.scores import logprob
    from cact_ops.smooth import soft_size

    cfg = tiny_cfg("cact", epochs=2, eta_relative=0.8, temperature=0.5)
    model = linear_model(0)
    # the starting model's mean soft size on the non-calibration part of D_val, at the dual step's threshold
    is_cal = val_cal_mask(VAL[1], cfg.val_cal_fraction, cfg.seed)
    with torch.no_grad():
        conf = logprob(model(VAL[0])).double()
    tau = smooth_dual_threshold(conf[is_cal].gather(1, VAL[1][is_cal, None]).squeeze(1), cfg)
    expected = 0.8 * float(soft_size(conf[~is_cal], tau, 0.5).mean())
    loop = fit_in_process(model, cfg, TRAIN, VAL)
    assert loop.eta == pytest.approx(expected, rel=1e-9)
    assert loop.loss_fn.eta == loop.eta  # the training penalty and the dual step use the same target
    assert all(m["eta"] == loop.eta for m in loop.metrics)
    # h = S - eta: the recorded soft size minus the constraint gives back the resolved eta
    m = loop.metrics[-1]
    assert m["val_soft_size"] - m["val_constraint"] == pytest.approx(loop.eta)
    # a resumed loop keeps the resolved eta (it is not measured again on the trained model)
    state = loop.state_dict()
    resumed = EpochLoop(linear_model(5), cfg, K, train_counts=COUNTS)
    resumed.load_state_dict(state)
    assert resumed.resolve_eta(iterate_tensors(*VAL, 25, False, extra=is_cal)) == loop.eta
    assert resumed.loss_fn.eta == loop.eta
    # other methods have no size target to resolve; the absolute eta stays the default
    assert fit_in_process(linear_model(0), tiny_cfg("conftr", eta_relative=0.8), TRAIN, VAL).eta == cfg.eta
    with pytest.raises(ValueError, match=r"TrainConfig.eta_relative must be a finite number > 0, or None"):
        TrainConfig(eta_relative=0.0)


def test_validation_statistics_match_hard_split_cp():
    loop = fit_in_process(linear_model(), tiny_cfg("cact", epochs=1), TRAIN, VAL)
    is_cal = val_cal_mask(VAL[1], 0.2, 3)
    stats = loop.validation_statistics(iterate_tensors(*VAL, 7, False, extra=is_cal))
    with torch.no_grad():
        score = -torch.log_softmax(loop.model(VAL[0]), dim=1).double()  # non-conformity = -log p
    q = calibrate(score[is_cal], VAL[1][is_cal], 0.1)
    sets = predict_sets(score[~is_cal], q)
    y = VAL[1][~is_cal]
    assert stats.tau == pytest.approx(-float(q))
    torch.testing.assert_close(stats.counts, torch.bincount(y, minlength=K).double())
    covered = torch.zeros(K, dtype=torch.float64).index_add_(0, y, sets[torch.arange(len(y)), y].double())
    torch.testing.assert_close(stats.covered, covered)
    torch.testing.assert_close(stats.size_sums, torch.zeros(K, dtype=torch.float64).index_add_(0, y, sets.sum(1).double()))
    summary = stats.summary()
    assert (summary["val_n_cal"], summary["val_n"]) == (int(is_cal.sum()), int((~is_cal).sum()))


def test_val_objective_ignores_coverage_noise_but_not_under_coverage():
    """Over 4000 random calibration/test draws of one exchangeable score distribution (split CP at alpha = 0.1,
    200 calibration and 800 test rows), the realised coverage misses 1 - alpha by up to about 0.05, and that
    noise must not be penalised: the noise-tolerant objective equals the size in all but a fraction of draws
    far below 1% (3 sd one-sided: 0.13%), while the plain 10·K penalty fires in about half of them. A real
    under-coverage (a threshold at alpha = 0.3 on the same data) is penalised every time."""
    g = torch.Generator().manual_seed(0)
    alpha, n_cal, n, R = 0.1, 200, 800, 4000
    s = torch.rand(R, n_cal + n, generator=g, dtype=torch.float64)  # non-conformity of the true class
    cal, test = s[:, :n_cal].sort(1).values, s[:, n_cal:]
    rank = math.ceil((n_cal + 1) * (1 - alpha))  # finite-sample split-CP quantile
    cov = (test <= cal[:, rank - 1 : rank]).double().mean(1)
    plain = [val_objective({"val_size": 1.0, "val_coverage": c}, alpha, 20) for c in cov.tolist()]
    tolerant = [val_objective({"val_size": 1.0, "val_coverage": c, "val_n": n, "val_n_cal": n_cal}, alpha, 20)
                for c in cov.tolist()]
    assert abs(float(cov.mean()) - (1 - alpha)) < 4 * float(cov.std()) / math.sqrt(R)  # valid split CP
    assert sum(p > 1 for p in plain) > 0.3 * R
    assert sum(t > 1 for t in tolerant) < 0.01 * R
    low = (test <= cal[:, math.ceil((n_cal + 1) * 0.7) - 1 :][:, :1]).double().mean(1)  # covers 0.7
    assert all(val_objective({"val_size": 1.0, "val_coverage": c, "val_n": n, "val_n_cal": n_cal}, alpha, 20) > 1
               for c in low.tolist())


@pytest.mark.parametrize("method", ["cact", "conftr"])
def test_state_dict_round_trip_resumes_to_the_identical_result(method):
    cfg = tiny_cfg(method, epochs=3, schedule="cosine")
    straight = EpochLoop(linear_model(0), cfg, K, train_counts=COUNTS)
    run_epochs(straight, 2)

    first = EpochLoop(linear_model(0), cfg, K, train_counts=COUNTS)
    run_epochs(first, 1)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = EpochLoop(linear_model(123), cfg, K, train_counts=COUNTS)  # all must come from the state
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    run_epochs(resumed, 1)

    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert straight.metrics == resumed.metrics
    assert straight.history == resumed.history
    if method == "cact":
        assert straight.dual.history == resumed.dual.history
        assert torch.equal(straight.dual.lam, resumed.dual.lam) and torch.equal(straight.dual.rho, resumed.dual.rho)
    assert straight.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]


def test_same_seed_same_result_and_other_seed_differs():
    a = fit_in_process(linear_model(0), tiny_cfg("cact"), TRAIN, VAL)
    b = fit_in_process(linear_model(0), tiny_cfg("cact"), TRAIN, VAL)
    c = fit_in_process(linear_model(0), tiny_cfg("cact", seed=4), TRAIN, VAL)
    assert torch.equal(a.model.fc.weight, b.model.fc.weight) and a.metrics == b.metrics
    assert a.dual.history == b.dual.history
    assert not torch.equal(a.model.fc.weight, c.model.fc.weight)


class RecordingComm(LocalComm):
    """One worker of a pretend group: records what it all-reduces."""

    def __init__(self):
        self.reduced = []

    def all_reduce_sum(self, t):
        self.reduced.append(t.clone())
        return t


@pytest.mark.parametrize("method", ["ce", "conftr", "cact"])
def test_a_worker_without_batches_all_reduces_the_same_length(method):
    # A worker whose shard yields no batch must still join the all-reduce with a tensor of the same length as
    # the others (a shorter one would crash or hang a real collective).
    busy, idle = RecordingComm(), RecordingComm()
    busy_out = EpochLoop(linear_model(), tiny_cfg(method), K, train_counts=COUNTS, comm=busy).train_epoch(
        iterate_tensors(*TRAIN, 16, False))
    idle_out = EpochLoop(linear_model(), tiny_cfg(method), K, train_counts=COUNTS, comm=idle).train_epoch([])
    assert busy.reduced[0].shape == idle.reduced[0].shape
    assert idle.reduced[0].abs().sum() == 0  # contributes nothing to the sums
    assert set(idle_out) == set(busy_out) and ("train_soft_size" in busy_out) == (method != "ce")


def test_val_cal_mask_is_stratified_and_deterministic():
    y = torch.tensor([0] * 10 + [1] * 25 + [2] * 4 + [3] * 1)
    y = y[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    m = val_cal_mask(y, 0.2, seed=5)
    assert torch.bincount(y[m], minlength=4).tolist() == [2, 5, 1, 0]  # round(0.2 n_k)
    assert torch.equal(m, val_cal_mask(y, 0.2, seed=5)) and not torch.equal(m, val_cal_mask(y, 0.2, seed=6))


def test_schedules():
    model = torch.nn.Linear(2, 2)
    _, sched = build_optimizer(model, TrainConfig(epochs=10, lr=1.0, schedule="cosine", warmup_epochs=2))
    factors = [sched.lr_lambdas[0](e) for e in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * e / 8)) for e in range(8)])
    _, sched = build_optimizer(model, TrainConfig(epochs=10, schedule="step", milestones=[3, 6]))
    assert [sched.lr_lambdas[0](e) for e in (0, 2, 3, 5, 6, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    opt, _ = build_optimizer(model, TrainConfig(optimizer="adamw", lr=0.003, schedule="constant"))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 0.003


def test_crop_flip_keeps_shape_and_pixels():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # with no padding only the flip remains: each image is itself or its mirror
    out0 = crop_flip(x, torch.Generator().manual_seed(1), pad=0)
    for i in range(2):
        assert torch.equal(out0[i], x[i]) or torch.equal(out0[i], x[i].flip(-1))


def test_iterate_tensors_covers_every_row_once():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    rows = torch.cat([b[1] for b in iterate_tensors(x, y, 3, True, torch.Generator().manual_seed(0))])
    assert sorted(rows.tolist()) == list(range(10))
    assert [b[1].tolist() for b in iterate_tensors(x, y, 4, False)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    comm = LocalComm()
    t = torch.ones(2)
    assert comm.all_reduce_sum(t) is t and comm.all_gather_cat(t) is t


def test_train_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        TrainConfig(method="foo")
    for name, value in (("optimizer", "rmsprop"), ("schedule", "linear"), ("augment", "mixup"),
                        ("size_transform", "sqrt"), ("reduction", "mean"), ("dual_source", "test")):
        with pytest.raises(ValueError, match=f"TrainConfig.{name} must be one of"):
            TrainConfig(**{name: value})
    with pytest.raises(ValueError, match=r"TrainConfig.epochs must be an integer >= 1, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match=r"TrainConfig.val_cal_fraction must be a number in the open interval \(0, 1\)"):
        TrainConfig(val_cal_fraction=1.0)
    with pytest.raises(ValueError, match=r"TrainConfig.alpha must be a number in the open interval \(0, 1\)"):
        EpochLoop(linear_model(), TrainConfig(method="conftr", alpha=1.5), K)
    for name, bad in (("lr", 0.0), ("lr", float("nan")), ("temperature", -1.0), ("batch_size", 1), ("seed", -1),
                      ("milestones", (10, -1)), ("conftr_lambda", -0.5), ("rho_step", 1.5)):
        with pytest.raises(ValueError, match=rf"TrainConfig.{name} must be"):
            TrainConfig(**{name: bad})
    with pytest.raises(ValueError, match="need 0 < lambda_min <= lambda_init <= lambda_max"):
        EpochLoop(linear_model(), TrainConfig(lambda_max=1e-9), K)


def test_dual_steps_every_n_optimizer_steps_and_a_rho_schedule_that_acts():
    # TRAIN has 105 rows: 7 optimizer steps per epoch at batch 16; steps are counted across epochs, so a dual step
    # every 2 steps falls after steps 2, 4, 6 (epoch 0) and 8, 10, 12, 14 (epoch 1), none at the epoch ends
    cfg = tiny_cfg("cact", epochs=2, dual_every_steps=2, rho_step=2, eta_relative=0.5)
    loop = fit_in_process(linear_model(0), cfg, TRAIN, VAL)
    assert loop.global_step == 14 and loop.dual.steps == 7
    assert [h["epoch"] for h in loop.dual.history] == [0, 0, 0, 1, 1, 1, 1]
    assert sum(h["rho_checked"] for h in loop.dual.history) == 3
    assert [m["dual_steps"] for m in loop.metrics] == [3, 7]
    # per epoch dual steps with the default schedule: a 10-epoch fine-tune checks rho 5 times
    d = DualState(K, TrainConfig().dual_config)
    for _ in range(10):
        d.update(torch.ones(K), torch.ones(K), torch.ones(K))
    assert sum(h["rho_checked"] for h in d.history) == 5 and bool((d.rho > 1).all())


def test_history_holds_the_training_soft_size_beside_the_validation_one():
    loop = fit_in_process(linear_model(0), tiny_cfg("cact"), TRAIN, VAL)
    rows = [r for r in loop.history if r["epoch"] == 1]
    assert len(rows) == K
    for r in rows:
        assert 0 < r["train_soft_size"] <= K and 0 < r["val_soft_size"] <= K
        assert r["val_soft_size"] == pytest.approx(r["constraint"] + loop.eta)


def test_balanced_calibration_weights_stand_for_the_balanced_population():
    # a long-tailed calibration batch: 90 head scores near 0, 10 tail scores near -3. Unweighted, the 10% quantile
    # sits at the head/tail border; with weights 1/n_k the tail is half the population and the quantile is in it
    from cact_ops.smooth import soft_quantile

    g = torch.Generator().manual_seed(0)
    scores = torch.cat([-0.1 * torch.rand(90, generator=g), -3 - 0.1 * torch.rand(10, generator=g)])
    labels = torch.cat([torch.zeros(90, dtype=torch.long), torch.ones(10, dtype=torch.long)])
    plain = float(soft_quantile(scores, 0.1, 0.01))
    balanced = float(soft_quantile(scores, 0.1, 0.01, weights=(1.0 / torch.tensor([90.0, 10.0]))[labels]))
    assert plain > -1.5 and balanced < -2.9
    # and the loss uses them: ConfTr's threshold with balanced weights is the weighted one
    torch.testing.assert_close(
        soft_quantile(scores, 0.3, 0.01, weights=torch.ones(100)), soft_quantile(scores, 0.3, 0.01))


def test_bad_dual_settings_name_the_field():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"TrainConfig.dual_every_steps must be an integer >= 0 \(0: once per epoch\)"):
            TrainConfig(dual_every_steps=bad)
    with pytest.raises(ValueError, match=r"TrainConfig.cal_weighting must be one of \('balanced', 'none'\)"):
        TrainConfig(cal_weighting="inverse")
    with pytest.raises(ValueError, match=r"TrainConfig.reduction must be one of \('class', 'sample'\)"):
        TrainConfig(reduction="mean")


def test_resized_crop_flip_draws_boxes_of_the_asked_area_and_flips_half():
    """RandomResizedCrop + flip, batched: a box's area fraction lies in scale = (0.08, 1) (read back from a
    gradient image), and about half the images are mirrored (a binomial count, 4 sd tolerance)."""
    from cact_ops.training import resized_crop_flip

    B, S = 2000, 64
    ramp = torch.linspace(0, 1, S)
    x = torch.stack([ramp.expand(S, S), ramp[:, None].expand(S, S)])[None].expand(B, 2, S, S).contiguous()
    out = resized_crop_flip(x, torch.Generator().manual_seed(0))
    # the box's width (height) is the span of the horizontal (vertical) ramp it saw, up to one pixel each side
    w = (out[:, 0, 0, -1] - out[:, 0, 0, 0]).abs() * S / (S - 1)
    h = (out[:, 1, -1, 0] - out[:, 1, 0, 0]) * S / (S - 1)
    area = w * h
    assert area.min() >= 0.08 - 4 / S and area.max() <= 1 + 4 / S
    assert 0.3 < float(area.mean()) < 0.7  # uniform area in (0.08, 1): 0.54, less where a box is clamped
    flipped = int((out[:, 0, 0, -1] < out[:, 0, 0, 0]).sum())
    assert abs(flipped - B / 2) <= 4 * (B * 0.25) ** 0.5
    # on a wide image the box's aspect is measured in pixels, as torchvision's ratio is: within (3/4, 4/3)
    H, W = 32, 128
    wide = torch.stack([torch.linspace(0, 1, W).expand(H, W), torch.linspace(0, 1, H)[:, None].expand(H, W)])
    out = resized_crop_flip(wide[None].expand(B, 2, H, W).contiguous(), torch.Generator().manual_seed(1), flip=False)
    w, h = out[:, 0, 0, -1] - out[:, 0, 0, 0], out[:, 1, -1, 0] - out[:, 1, 0, 0]
    inside = (w < 0.95) & (h < 0.95)  # boxes not clamped to the image
    aspect = (w * W / (h * H))[inside]
    assert inside.sum() > B / 20 and aspect.min() > 3 / 4 - 0.05 and aspect.max() < 4 / 3 + 0.05
    # and the training loop applies it when asked
    from cact_ops.training import augment

    assert augment(x[:2], "none") is x[:2] or torch.equal(augment(x[:2], "none"), x[:2])


def test_amp_cpu_trains_in_bf16_with_channels_last_and_stays_close_to_fp32():
    torch.manual_seed(0)
    x = torch.rand(48, 1, 8, 8)
    y = torch.arange(48) % K
    models = {}
    for amp_cpu in (False, True):
        torch.manual_seed(0)
        loop = EpochLoop(build_model("small_cnn", K, in_channels=1), tiny_cfg("cact", amp_cpu=amp_cpu), K,
                         train_counts=torch.bincount(y, minlength=K))
        assert loop.amp is amp_cpu and loop.channels_last is amp_cpu
        conv = loop.model.features[3].weight  # 32 input channels: the two layouts differ
        assert conv.is_contiguous(memory_format=torch.channels_last) is amp_cpu
        logits = loop._forward(x)
        assert logits.dtype == (torch.bfloat16 if amp_cpu else torch.float32)
        models[amp_cpu] = logits.float()
        tm = loop.train_epoch(iterate_tensors(x, y, 16, True, loop.generator))
        assert all(math.isfinite(v) for v in tm.values()) and loop.global_step == 3
    # bf16 keeps 8 bits of mantissa: the same weights give the same logits to about 1%
    assert torch.allclose(models[True], models[False], rtol=0.03, atol=0.03)
    assert not EpochLoop(linear_model(), tiny_cfg("ce", amp=False, amp_cpu=True), K).amp  # amp off wins
