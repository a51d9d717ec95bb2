"""Training cost: CaCT step vs CE step, Ray Train overhead vs the plain in-process loop, 2 workers vs 1.

Three parts (``--part``), results printed as a table and written as JSON (``--out``):

``step``  One training step (forward, loss, backward, gradient clipping, optimizer step) exactly as
          :meth:`cact_ops.training.EpochLoop.train_epoch` runs it, for ``method="ce"`` and ``method="cact"``
          (``build_loss`` with a ``DualState``), on the same model, the same initial weights and the same
          batch. Warm-up steps, then ``--repeats`` timed samples of ``--steps`` steps each, the two methods
          interleaved (AB, BA, AB, ...: each pair shares the machine's load of that moment). Reported: the
          median of the paired ratios CaCT/CE and their spread. Then where the extra time goes: the losses
          alone (forward + backward on fixed logits, many calls, interleaved) and their parts (soft quantile,
          soft sets + PHR, batch split, input checks, the second log-softmax), and a lean reference
          formulation of the same loss (one log-softmax shared by CE and the conformity score, no repeated
          input checks) to show what an optimisation of ``cact_ops.losses`` could save.
``ray``   The same CaCT training (same split, model, batch size, epochs, dual step on ``val``) in-process
          (``EpochLoop`` over ``stages.payload.read_split_tensors`` tensors) and through
          ``stages.train.fit`` in local mode (``num_workers=0``: the worker's own function and data path in
          this process, so that only the worker group differs from the 1-worker run; per epoch from the E1/E2
          difference of wall and process CPU time) and with 1 and with 2 workers. Data: a synthetic MNIST-sized (28x28x1) Parquet
          table written to a temporary folder, made long-tailed by ``stages.longtail.build``. Per-epoch time
          excludes start-up, measured two ways: (a) the median interval between consecutive epoch reports
          (driver-side Ray Train callback, when ``fit`` accepts ``callbacks``; in-process: epoch timestamps)
          and (b) the wall-time difference of runs with E1 and E2 epochs, (T(E2) - T(E1)) / (E2 - E1).
          Start-up = T(E2) - E2 * per-epoch. Runs are interleaved (in-process, local, 1 worker, 2 workers,
          repeated).
          Also measured in this process: the per-epoch costs the Ray path has and the in-process loop has not
          (payload decoding of every batch, a Ray Data pass with the local shuffle buffer, the per-epoch
          checkpoint written by rank 0).
``cifar`` (for a GPU machine) builds CIFAR-10-LT (IF 100) from ``--data-root``/cifar10-jpeg and times one
          in-process CaCT run of ``--cifar-epochs`` epochs of ResNet-32 on ``--device``.

Examples::

    .venv/bin/python benchmarks/train_overhead.py --part all --out /tmp/train_overhead.json     # ~10 min on 2 CPUs
    .venv/bin/python benchmarks/train_overhead.py --part step --model small_cnn --repeats 9
    python benchmarks/train_overhead.py --part step --device cuda --threads 8                   # GPU ratio
    python benchmarks/train_overhead.py --part cifar --device cuda --data-root ../shared/data --cifar-epochs 200

Results go in docs/BENCHMARKS.md, section "Training: CaCT step cost, Ray Train overhead, worker scaling".
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Ray reads these when it starts: set them before anything imports ray.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # no per-dataset progress lines in the table output

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cact_ops.alm import DualState  # noqa: E402
from cact_ops.losses import CaCTLoss, split_batch  # noqa: E402
from cact_ops.models import build_model  # noqa: E402
from cact_ops.smooth import smooth_threshold_level, soft_quantile, soft_sets  # noqa: E402
from cact_ops.training import EpochLoop, TrainConfig, build_loss, iterate_tensors, val_cal_mask  # noqa: E402
from cact_ops._checks import check_labels, check_matrix  # noqa: E402

MODELS = {"small_cnn": ((1, 28, 28), {}), "cifar_resnet32": ((3, 32, 32), {})}


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _q(values, p):
    return float(np.percentile(np.asarray(values, dtype=float), p))


def spread(values) -> dict:
    """Median, quartiles, min and max of a list of numbers (rounded for the JSON)."""
    v = [float(x) for x in values]
    return {"median": statistics.median(v), "q25": _q(v, 25), "q75": _q(v, 75), "min": min(v), "max": max(v),
            "n": len(v)}


def fmt_spread(s: dict, unit: str = "", digits: int = 3) -> str:
    return f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    print(line(header))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))


# ----------------------------------------------------------------------------------------------------------------
# Part 1: one step, CaCT vs CE
# ----------------------------------------------------------------------------------------------------------------
def step_ratio(model_name: str, batch_size: int, steps: int, repeats: int, warmup: int, device: torch.device,
               num_classes: int = 10, seed: int = 0) -> dict:
    """Paired, interleaved timing of EpochLoop.train_epoch on one repeated batch, CE vs CaCT.

    Each sample records wall time and this process's CPU time (``time.process_time``). On a shared machine the
    CPU time is the steadier figure: time spent descheduled while other jobs run is not counted."""
    shape, kwargs = MODELS[model_name]
    torch.manual_seed(seed)
    x = torch.rand(batch_size, *shape)
    y = torch.arange(batch_size) % num_classes  # every class present, like a shuffled batch of a balanced set
    y = y[torch.randperm(batch_size)]
    x, y = x.to(device), y.to(device)
    model0 = build_model(model_name, num_classes, in_channels=shape[0], **kwargs)
    loops = {m: EpochLoop(copy.deepcopy(model0), TrainConfig(method=m, batch_size=batch_size, seed=seed), num_classes,
                          device, train_counts=torch.bincount(y.cpu(), minlength=num_classes))
             for m in ("ce", "cact")}
    for i in range(warmup):  # interleaved warm-up (allocator, oneDNN/cuDNN kernel choice)
        for loop in (loops.values() if i % 2 == 0 else list(loops.values())[::-1]):
            loop.train_epoch([(x, y)])
    # Every timed sample starts both methods from the same weights and optimizer state: only the loss differs.
    start = {"model": copy.deepcopy(loops["ce"].model.state_dict()),
             "optimizer": copy.deepcopy(loops["ce"].optimizer.state_dict())}
    wall = {m: [] for m in loops}
    cpu = {m: [] for m in loops}
    for r in range(repeats):
        order = ("ce", "cact") if r % 2 == 0 else ("cact", "ce")
        for m in order:
            loops[m].model.load_state_dict(start["model"])
            loops[m].optimizer.load_state_dict(start["optimizer"])
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            loops[m].train_epoch([(x, y)] * steps)
            _sync(device)
            wall[m].append((time.perf_counter() - t0) / steps * 1e3)
            cpu[m].append((time.process_time() - c0) / steps * 1e3)
    out = {"model": model_name, "input": [batch_size, *shape], "steps_per_sample": steps, "repeats": repeats,
           "warmup_steps": warmup, "raw_wall_ms": wall, "raw_cpu_ms": cpu}
    for clock, t in (("wall", wall), ("cpu", cpu)):
        out[clock] = {"ce_ms": spread(t["ce"]), "cact_ms": spread(t["cact"]),
                      "paired_ratio": spread([c / e for c, e in zip(t["cact"], t["ce"])]),
                      "ratio_of_minima": min(t["cact"]) / min(t["ce"]),
                      "extra_ms": spread([c - e for c, e in zip(t["cact"], t["ce"])])}
    return out


def lean_cact(logits, labels, dual: DualState, generator, cfg: TrainConfig):
    """Reference formulation of CaCTLoss (reduction="sample", non-stratified split): the same math, with one
    log-softmax shared by CE and the conformity score, no repeated input checks, no per-class diagnostics and
    the quantile position computed in Python. Not used for training: it shows what the loss itself costs
    without the overheads around it (and what an optimisation of cact_ops could save)."""
    import torchsort

    conf = torch.log_softmax(logits, dim=1)
    ce = F.nll_loss(conf, labels)
    n = labels.shape[0]
    perm = torch.rand(n, generator=generator).to(labels.device).argsort()
    n_cal = min(max(int(round(cfg.cal_fraction * n)), 1), n - 1)
    cal, pred = perm[:n_cal], perm[n_cal:]
    true = conf[cal].gather(1, labels[cal, None]).squeeze(1)
    srt = torchsort.soft_sort(true[None], regularization="l2", regularization_strength=cfg.regularization_strength)[0]
    # q and n are Python numbers: the interpolation position needs no tensor ops (cact_ops.smooth._interpolate
    # builds it from tensors: about ten more autograd ops, forward and backward).
    pos = smooth_threshold_level(cfg.alpha, n_cal) * (n_cal - 1)
    lo = min(max(int(pos), 0), n_cal - 1)
    hi = min(lo + 1, n_cal - 1)
    tau = srt[lo] + (pos - lo) * (srt[hi] - srt[lo])
    h = torch.sigmoid((conf[pred] - tau) / cfg.temperature).sum(1) - cfg.eta
    y = labels[pred]
    lam = dual.lam.to(device=h.device, dtype=h.dtype)[y]
    rho = dual.rho.to(device=h.device, dtype=h.dtype)[y]
    return ce + (((lam + rho * h).clamp(min=0) ** 2 - lam ** 2) / (2 * rho)).mean()


def loss_breakdown(batch_size: int, num_classes: int, device: torch.device, iters: int, rounds: int,
                   seed: int = 0) -> dict:
    """Per-call cost (microseconds) of the losses alone and of CaCT's parts, forward + backward, interleaved."""
    g = torch.Generator().manual_seed(seed)
    logits0 = (torch.randn(batch_size, num_classes, generator=g) * 2).to(device)
    labels = (torch.arange(batch_size) % num_classes)[torch.randperm(batch_size, generator=g)].to(device)
    # the lean reference's formulation (per-sample mean, unweighted quantile); the defaults are timed beside it
    cfg = TrainConfig(method="cact", batch_size=batch_size, reduction="sample", cal_weighting="none")
    dual = DualState(num_classes, cfg.dual_config)
    dual.lam.fill_(0.5)  # a live multiplier, so the PHR branch carries gradient
    ce_loss = build_loss(dataclasses.replace(cfg, method="ce"), None)
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    cact_loss = build_loss(cfg, dual, torch.Generator().manual_seed(1))
    default_loss = build_loss(dataclasses.replace(cfg, reduction=TrainConfig.reduction,
                                                  cal_weighting=TrainConfig.cal_weighting),
                              dual, torch.Generator().manual_seed(1), train_counts=counts)
    lean_gen = torch.Generator().manual_seed(1)
    n_cal = batch_size // 2
    conf0 = torch.log_softmax(logits0, 1)
    true0 = conf0[:n_cal].gather(1, labels[:n_cal, None]).squeeze(1).detach()
    q = smooth_threshold_level(cfg.alpha, n_cal)
    tau0 = true0.quantile(q)

    def leaf(t):
        return t.detach().clone().requires_grad_(True)

    def f_ce():
        lg = leaf(logits0)
        ce_loss(lg, labels)[0].backward()

    def f_cact():
        lg = leaf(logits0)
        cact_loss(lg, labels)[0].backward()

    def f_cact_default():  # reduction="class", calibration weights 1/n_k
        lg = leaf(logits0)
        default_loss(lg, labels)[0].backward()

    def f_lean():
        lg = leaf(logits0)
        lean_cact(lg, labels, dual, lean_gen, cfg).backward()

    def f_soft_quantile():
        v = leaf(true0)
        soft_quantile(v, q, cfg.regularization_strength).backward()

    def f_soft_sets_phr():
        c = leaf(conf0[n_cal:])
        h = soft_sets(c, tau0, cfg.temperature).sum(1) - cfg.eta
        lam = dual.lam.to(dtype=h.dtype, device=h.device)[labels[n_cal:]]
        rho = dual.rho.to(dtype=h.dtype, device=h.device)[labels[n_cal:]]
        (((lam + rho * h).clamp(min=0) ** 2 - lam ** 2) / (2 * rho)).mean().backward()

    def f_log_softmax():
        lg = leaf(logits0)
        torch.log_softmax(lg, 1).sum().backward()

    split_gen = torch.Generator().manual_seed(2)

    def f_split():
        split_batch(labels, 0.5, False, split_gen)

    def f_checks():  # what CaCT's forward validates on top of CE's one check_matrix + check_labels
        check_matrix(logits0, "logits")
        check_matrix(logits0, "logits")
        check_labels(labels, batch_size, num_classes)

    sizes0 = torch.rand(batch_size - n_cal, device=device) * 3
    def f_diagnostics():  # the per-class diagnostics CaCTLoss computes every step (train_epoch reads the sums)
        counts = torch.bincount(labels[n_cal:], minlength=num_classes).to(sizes0.dtype)
        for _ in range(2):
            CaCTLoss._class_means(CaCTLoss._class_sums(sizes0, labels[n_cal:], num_classes), counts)

    variants = {"ce_loss": f_ce, "cact_loss": f_cact, "cact_loss_default_config": f_cact_default,
                "cact_lean_reference": f_lean,
                "part_soft_quantile": f_soft_quantile, "part_soft_sets_phr": f_soft_sets_phr,
                "part_second_log_softmax": f_log_softmax, "part_split_batch": f_split,
                "part_extra_input_checks": f_checks, "part_per_class_diagnostics": f_diagnostics}
    for f in variants.values():  # warm-up
        for _ in range(20):
            f()
    samples = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            f = variants[k]
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(iters):
                f()
            _sync(device)
            samples[k].append((time.perf_counter() - t0) / iters * 1e6)
            cpu[k].append((time.process_time() - c0) / iters * 1e6)
    # The lean reference computes the same loss value as CaCTLoss (same split from the same generator state).
    ref = build_loss(cfg, dual, torch.Generator().manual_seed(7))(logits0, labels)[0]
    lean = lean_cact(logits0, labels, dual, torch.Generator().manual_seed(7), cfg)
    return {"batch_size": batch_size, "num_classes": num_classes, "iters": iters, "rounds": rounds,
            "config": {"regularization_strength": cfg.regularization_strength, "temperature": cfg.temperature,
                       "eta": cfg.eta, "alpha": cfg.alpha, "cal_fraction": cfg.cal_fraction},
            "us": {k: spread(v) for k, v in samples.items()}, "cpu_us": {k: spread(v) for k, v in cpu.items()},
            "lean_matches_cact": bool(torch.allclose(ref, lean, rtol=1e-5, atol=1e-6)),
            "lean_abs_diff": float((ref - lean).abs())}


def run_step_part(args, device) -> dict:
    models = [args.model] if args.model != "both" else ["small_cnn", "cifar_resnet32"]
    out = {"models": [], "loss": None}
    for name in models:
        steps = args.steps if args.steps else (1 if name == "cifar_resnet32" and device.type == "cpu" else 3)
        warmup = args.warmup if args.warmup is not None else 3
        print(f"[step] {name}: batch {args.batch_size}, {args.repeats} samples x {steps} steps per method ...",
              flush=True)
        out["models"].append(step_ratio(name, args.batch_size, steps, args.repeats, warmup, device))
    print("[step] losses alone ...", flush=True)
    out["loss"] = loss_breakdown(args.batch_size, 10, device, iters=args.loss_iters, rounds=args.loss_rounds)
    # Where the extra time goes: the step's extra time vs the losses' extra time (precise, sub-ms).
    for clock, key in (("wall", "us"), ("cpu", "cpu_us")):
        us = out["loss"][key]
        loss_extra_ms = (us["cact_loss"]["median"] - us["ce_loss"]["median"]) / 1e3
        for m in out["models"]:
            ce = m[clock]["ce_ms"]["median"]
            m[clock]["loss_extra_ms"] = loss_extra_ms
            m[clock]["ratio_from_loss_extra"] = (ce + loss_extra_ms) / ce
    return out


def print_step(res: dict, target: float) -> None:
    rows = []
    for m in res["models"]:
        for clock in ("cpu", "wall"):
            t = m[clock]
            rows.append([m["model"], "x".join(map(str, m["input"])), clock, fmt_spread(t["ce_ms"], " ms", 1),
                         fmt_spread(t["cact_ms"], " ms", 1), fmt_spread(t["paired_ratio"]),
                         f"{t['ratio_of_minima']:.3f}", f"{t['ratio_from_loss_extra']:.4f}", f"<= {target}"])
    print_table(rows, ["model", "batch", "clock", "CE step", "CaCT step", "CaCT/CE paired", "ratio of minima",
                       "CE + loss extra", "target"])
    print()
    loss = res["loss"]
    rows = [[k, fmt_spread(loss["cpu_us"][k], " us", 0), fmt_spread(v, " us", 0)] for k, v in loss["us"].items()]
    print_table(rows, ["loss alone / part (fwd+bwd)", "CPU time per call", "wall per call"])
    print(f"loss config {loss['config']}; lean reference equals CaCTLoss: {loss['lean_matches_cact']} "
          f"(|diff| {loss['lean_abs_diff']:.2e})")


# ----------------------------------------------------------------------------------------------------------------
# Part 2/3: Ray Train overhead and worker scaling
# ----------------------------------------------------------------------------------------------------------------
def write_synthetic_source(root: Path, n_train_per_class: int, n_test_per_class: int, num_classes: int = 10,
                           seed: int = 0) -> None:
    """MNIST-shaped Parquet tables (raw uint8 ``pixels`` 28x28x1 + ``label``): a smooth class prototype plus noise,
    so the model can learn something; rows of all classes interleaved."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    protos = rng.random((num_classes, 7, 7))
    protos = np.kron(protos, np.ones((4, 4)))  # 28x28, blocky
    meta = {b"classes": json.dumps([f"c{k}" for k in range(num_classes)]).encode(),
            b"shape": json.dumps([28, 28, 1]).encode()}
    root.mkdir(parents=True, exist_ok=True)
    for split, per in (("train", n_train_per_class), ("test", n_test_per_class)):
        labels = np.repeat(np.arange(num_classes), per)
        rng.shuffle(labels)
        img = protos[labels] * 180 + rng.normal(0, 40, size=(len(labels), 28, 28))
        img = np.clip(img, 0, 255).astype(np.uint8)[..., None]
        flat = np.ascontiguousarray(img.reshape(len(labels), -1))
        offsets = pa.py_buffer((np.arange(len(labels) + 1, dtype=np.int32) * flat.shape[1]).tobytes())
        col = pa.Array.from_buffers(pa.binary(), len(labels), [None, offsets, pa.py_buffer(flat.tobytes())])
        table = pa.table({"pixels": col, "label": pa.array(labels.astype(np.int64))}).replace_schema_metadata(meta)
        pq.write_table(table, root / f"{split}.parquet")


def build_splits(work: Path, n_max: int, imbalance_factor: float, n_test_per_class: int):
    from stages import longtail

    write_synthetic_source(work / "src", n_max, n_test_per_class)
    return longtail.build(longtail.LongTailConfig(dataset="parquet", data_root=str(work / "src"),
                                                  out=str(work / "splits"), imbalance_factor=imbalance_factor,
                                                  n_max=n_max))


def in_process_run(splits, cfg: TrainConfig, model_family: str, model_kwargs: dict, val_batch_size: int) -> dict:
    """What stages.train's worker does, without Ray: same model construction, same loop, data held as tensors.
    Returns the wall time (data read + decode + model build + epochs) and per-epoch timestamps."""
    from stages.payload import read_split_tensors

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    train = read_split_tensors(splits, "train")
    val = read_split_tensors(splits, "val")
    model = build_model(model_family, splits.num_classes, in_channels=int(train[0].shape[1]), **model_kwargs)
    loop = EpochLoop(model, cfg, splits.num_classes, "cpu", train_counts=splits.train_counts)
    is_cal = val_cal_mask(val[1], cfg.val_cal_fraction, cfg.seed)
    ends, cpu = [], []
    for _ in range(cfg.epochs):
        c0 = time.process_time()
        tm = loop.train_epoch(iterate_tensors(*train, cfg.batch_size, True, loop.generator))
        stats = loop.validation_statistics(iterate_tensors(*val, val_batch_size, False, extra=is_cal))
        loop.end_epoch(tm, stats)
        ends.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall_s": time.perf_counter() - t0, "epoch_end_s": ends, "epoch_cpu_s": cpu, "final": loop.metrics[-1]}


class TreeCPU:
    """Samples the CPU time (user + system, from /proc) of every descendant process of this one: with a local
    Ray started by this process, that is the whole Ray path (GCS, raylet, Train controller, workers, Ray Data
    split coordinator, the dual coordinator). On a shared machine CPU seconds are steadier than wall time."""

    def __init__(self, period: float = 0.1):
        import threading

        self.period = period
        self.samples: list[tuple[float, float]] = []
        self.by_name: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def _total(self) -> tuple[float, dict]:
        parent, cpu, name = {}, {}, {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    head, rest = f.read().rsplit(")", 1)
            except (OSError, ValueError):
                continue
            fields = rest.split()
            pid = int(d)
            parent[pid] = int(fields[1])
            cpu[pid] = (int(fields[11]) + int(fields[12])) / self._tick
            name[pid] = head.split("(", 1)[1]
        me, total, by_name = os.getpid(), 0.0, {}
        for pid in cpu:
            p, seen = parent.get(pid), 0
            while p and p != me and seen < 64:
                p, seen = parent.get(p), seen + 1
            if p == me:
                total += cpu[pid]
                by_name[name[pid]] = by_name.get(name[pid], 0.0) + cpu[pid]
        return total, by_name

    def _run(self):
        while not self._stop.is_set():
            total, by_name = self._total()
            self.samples.append((time.time(), total))
            self.by_name.append(by_name)
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def at(self, t: float) -> float:
        ts = [a for a, _ in self.samples]
        return float(np.interp(t, ts, [b for _, b in self.samples]))

    def by_name_between(self, t0: float, t1: float) -> dict:
        """CPU seconds per process name between the samples nearest to t0 and t1."""
        ts = np.array([a for a, _ in self.samples])
        i, j = int(np.abs(ts - t0).argmin()), int(np.abs(ts - t1).argmin())
        a, b = self.by_name[i], self.by_name[j]
        return {k: b[k] - a.get(k, 0.0) for k in b if b[k] - a.get(k, 0.0) > 0}

    def rate(self) -> float:
        """CPU seconds per second over the whole sampling window."""
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        return (c1 - c0) / max(t1 - t0, 1e-9)


def _report_timer_callback(path: str):
    """A Ray Train callback (it runs in the Train controller process) that appends a timestamp per report."""
    from ray.train import UserCallback

    class ReportTimer(UserCallback):
        def __init__(self, p):
            self.p = p

        def after_report(self, run_context, metrics, checkpoint):
            with open(self.p, "a") as f:
                f.write(f"{time.time()}\n")

    return ReportTimer(path)


def ray_run(splits, cfg: TrainConfig, model_family: str, model_kwargs: dict, workers: int, work: Path,
            tag: str, use_callback: bool) -> dict:
    import stages.train as st

    stage = st.TrainStageConfig(out=str(work / "runs" / tag), loop=cfg, model_family=model_family,
                                model_kwargs=dict(model_kwargs), num_workers=workers,
                                storage_path=str(work / "ray_storage"), run_name=tag, overwrite=True, verbose=False)
    stamps = work / f"{tag}.stamps"
    if workers == 0:  # local mode trains in this process: its CPU time; no report callback, no /proc sampler
        t0, c0 = time.perf_counter(), time.process_time()
        result = st.fit(splits, stage)
        return {"wall_s": time.perf_counter() - t0, "cpu_total_s": time.process_time() - c0,
                "final": {k: v for k, v in result.final_metrics.items() if isinstance(v, (int, float))}}
    kwargs = {"callbacks": [_report_timer_callback(str(stamps))]} if use_callback else {}
    t_start = time.time()
    t0 = time.perf_counter()
    with TreeCPU() as tree:
        result = st.fit(splits, stage, **kwargs)
    wall = time.perf_counter() - t0
    abs_reports = [float(s) for s in stamps.read_text().split()] if stamps.is_file() else []
    cpu = [tree.at(t) for t in abs_reports]
    return {"wall_s": wall, "report_s": [t - t_start for t in abs_reports],
            "epoch_cpu_s": [b - a for a, b in zip(cpu, cpu[1:])],  # CPU of the Ray processes between reports
            "epoch_cpu_by_process_s": [tree.by_name_between(a, b) for a, b in zip(abs_reports, abs_reports[1:])],
            "cpu_total_s": tree.samples[-1][1] - tree.samples[0][1] if tree.samples else None,
            "final": {k: v for k, v in result.final_metrics.items() if isinstance(v, (int, float))}}


def per_epoch_overheads(splits, cfg: TrainConfig, model_family: str, model_kwargs: dict, work: Path,
                        shuffle_buffer: int, val_batch_size: int, repeats: int = 3) -> dict:
    """Costs (seconds per epoch) that the Ray path pays every epoch and the in-process loop does not."""
    import ray
    from stages.payload import decode, decode_labels

    payload = splits.payload
    train_table = splits.read_table("train")
    val_table = splits.read_table("val")
    np_batches = [{c: train_table.column(c).slice(s, cfg.batch_size).to_numpy(zero_copy_only=False)
                   for c in ("label", payload["column"])} for s in range(0, train_table.num_rows, cfg.batch_size)]
    out = {"decode_train_s": [], "decode_val_s": [], "ray_data_pass_s": [], "checkpoint_s": []}
    ds = ray.data.read_parquet(str(splits.path("train"))).materialize()
    model = build_model(model_family, splits.num_classes, in_channels=1, **model_kwargs)
    loop = EpochLoop(model, cfg, splits.num_classes, "cpu", train_counts=splits.train_counts)
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in np_batches:
            decode(b, payload), decode_labels(b)
        out["decode_train_s"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for s in range(0, val_table.num_rows, val_batch_size):
            sub = val_table.slice(s, val_batch_size)
            decode(sub, payload), decode_labels(sub)
        out["decode_val_s"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _b in ds.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                  local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=0):
            pass
        out["ray_data_pass_s"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=work) as d:  # rank 0: torch.save, then Ray copies it to storage
            torch.save(loop.state_dict(), Path(d) / "checkpoint.pt")
            shutil.copytree(d, Path(d + "_persisted"))
            shutil.rmtree(d + "_persisted")
        out["checkpoint_s"].append(time.perf_counter() - t0)
    return {k: spread(v) for k, v in out.items()}


def _ddp_worker(rank: int, world: int, port: int, steps: int, width: int, batch_size: int, queue) -> None:
    """One process of the plain-PyTorch DDP baseline (gloo, 1 thread): the same CaCT EpochLoop and model as the
    Ray part, ``steps`` global steps of ``batch_size`` (``batch_size / world`` per process), no Ray at all."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_channels=1, width=width)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    loop = EpochLoop(model, TrainConfig(method="cact", batch_size=batch_size), 10, train_counts=[1] * 10)
    b = batch_size // world
    x, y = torch.rand(b * steps, 1, 28, 28), torch.arange(b * steps) % 10
    loop.train_epoch(iterate_tensors(x[: 3 * b], y[: 3 * b], b, False))  # warm-up
    if world > 1:
        dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    loop.train_epoch(iterate_tensors(x, y, b, False))
    queue.put((rank, time.perf_counter() - t0, time.process_time() - c0))
    if world > 1:
        dist.destroy_process_group()


def ddp_baseline(steps: int, width: int, batch_size: int, repeats: int) -> dict:
    """Plain torch DDP, 1 process vs 2 processes on this machine (interleaved): separates what 2 workers cost
    here from what Ray adds."""
    import socket

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = {1: [], 2: []}
    cpu = {1: [], 2: []}
    for r in range(repeats):
        for world in ((1, 2) if r % 2 == 0 else (2, 1)):
            with socket.socket() as sk:
                sk.bind(("127.0.0.1", 0))
                port = sk.getsockname()[1]
            q = ctx.Queue()
            procs = [ctx.Process(target=_ddp_worker, args=(k, world, port, steps, width, batch_size, q))
                     for k in range(world)]
            for p in procs:
                p.start()
            res = [q.get(timeout=600) for _ in procs]
            for p in procs:
                p.join()
            out[world].append(max(x[1] for x in res))
            cpu[world].append(sum(x[2] for x in res))
    return {"steps": steps, "batch_size": batch_size, "wall_1_s": spread(out[1]), "wall_2_s": spread(out[2]),
            "cpu_1_s": spread(cpu[1]), "cpu_2_s": spread(cpu[2]),
            "throughput_ratio_2_vs_1": statistics.median(out[1]) / statistics.median(out[2])}


def _median_by_name(dicts: list[dict]) -> dict:
    names = sorted({k for d in dicts for k in d})
    out = {k: statistics.median([d.get(k, 0.0) for d in dicts]) for k in names}
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.005}


def _intervals(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]


def run_ray_part(args) -> dict:
    import inspect

    import ray

    import stages.train as st

    work = Path(tempfile.mkdtemp(prefix="cact-train-overhead-"))
    try:
        t0 = time.perf_counter()
        splits = build_splits(work, args.n_max, args.imbalance_factor, args.n_test_per_class)
        n_train, n_val = sum(splits.train_counts), sum(splits.manifest["counts"]["val"])
        print(f"[ray] split built in {time.perf_counter() - t0:.1f} s: {n_train} train rows "
              f"{splits.train_counts}, {n_val} val rows", flush=True)
        model_kwargs = {"width": args.ray_width}
        e1, e2 = args.ray_epochs
        base = TrainConfig(method="cact", batch_size=args.batch_size, epochs=e2, seed=0)
        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        import logging

        logging.getLogger("ray.data").setLevel(logging.WARNING)  # Ray Data's per-dataset progress lines
        ray.data.DataContext.get_current().enable_progress_bars = False

        @ray.remote(num_cpus=1)
        def probe():
            import torch as t
            return t.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

        worker_threads = ray.get(probe.remote())
        with TreeCPU() as idle:  # what the Ray daemons burn while nothing runs
            time.sleep(5)
        idle_rate = idle.rate()
        use_callback = "callbacks" in inspect.signature(st.fit).parameters
        runs = {"inproc": {e1: [], e2: []}, "local": {e1: [], e2: []}, "ray1": {e1: [], e2: []},
                "ray2": {e1: [], e2: []}}
        for r in range(args.ray_repeats):
            order = ["inproc", "local", "ray1", "ray2"] if r % 2 == 0 else ["ray2", "ray1", "local", "inproc"]
            for epochs in ((e1, e2) if r % 2 == 0 else (e2, e1)):
                cfg = dataclasses.replace(base, epochs=epochs)
                for variant in order:
                    if variant == "inproc":
                        res = in_process_run(splits, cfg, "small_cnn", model_kwargs, val_batch_size=512)
                    else:
                        res = ray_run(splits, cfg, "small_cnn", model_kwargs,
                                      0 if variant == "local" else int(variant[-1]), work,
                                      f"{variant}-e{epochs}-r{r}", use_callback)
                    runs[variant][epochs].append(res)
                    print(f"[ray] repeat {r} {variant:6s} {epochs} epochs: {res['wall_s']:.1f} s", flush=True)
        print("[ray] per-epoch costs of the Ray path, measured in this process ...", flush=True)
        parts = per_epoch_overheads(splits, base, "small_cnn", model_kwargs, work,
                                    st.TrainStageConfig.shuffle_buffer, 512)
        print("[ray] plain torch DDP baseline, 1 vs 2 processes ...", flush=True)
        ddp = ddp_baseline(-(-n_train // args.batch_size), args.ray_width, args.batch_size, args.ray_repeats + 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for variant, by_e in runs.items():
        w1 = [x["wall_s"] for x in by_e[e1]]
        w2 = [x["wall_s"] for x in by_e[e2]]
        diff = [(b - a) / (e2 - e1) for a, b in zip(w1, w2)]  # paired by repeat
        if variant == "local":  # no per-epoch clock: the E2-E1 difference of wall and of this process's CPU
            cpu_diff = [(b["cpu_total_s"] - a["cpu_total_s"]) / (e2 - e1) for a, b in zip(by_e[e1], by_e[e2])]
            summary[variant] = {"wall_e1_s": spread(w1), "wall_e2_s": spread(w2), "per_epoch_diff_s": spread(diff),
                                "per_epoch_s": statistics.median(diff), "per_epoch_cpu_s": spread(cpu_diff),
                                "startup_s": spread([w - e2 * statistics.median(diff) for w in w2]),
                                "train_samples_per_s": n_train / statistics.median(diff),
                                "final_val_accuracy": [x["final"].get("val_accuracy") for x in by_e[e2]]}
            continue
        key = "epoch_end_s" if variant == "inproc" else "report_s"
        iv = [d for x in by_e[e2] for d in _intervals(x[key])]
        per_epoch = statistics.median(iv) if iv else statistics.median(diff)
        summary[variant] = {"wall_e1_s": spread(w1), "wall_e2_s": spread(w2), "per_epoch_diff_s": spread(diff),
                            "per_epoch_interval_s": spread(iv) if iv else None, "per_epoch_s": per_epoch,
                            # in-process: epochs 2..E2 (process CPU); Ray: between consecutive reports
                            "per_epoch_cpu_s": spread([c for x in by_e[e2] for c in
                                                       (x["epoch_cpu_s"][1:] if variant == "inproc"
                                                        else x["epoch_cpu_s"])] or [float("nan")]),
                            "startup_s": spread([w - e2 * per_epoch for w in w2]),
                            "train_samples_per_s": n_train / per_epoch,
                            "final_val_accuracy": [x["final"].get("val_accuracy") for x in by_e[e2]]}
    ip, lo, r1, r2 = summary["inproc"], summary["local"], summary["ray1"], summary["ray2"]
    return {"n_train": n_train, "n_val": n_val, "train_counts": splits.train_counts, "epochs": [e1, e2],
            "repeats": args.ray_repeats, "model": {"family": "small_cnn", **model_kwargs},
            "batch_size": args.batch_size, "ray_worker_threads_probe": worker_threads,
            "in_process_threads": torch.get_num_threads(), "report_callback": use_callback,
            "ray_idle_cpu_per_s": idle_rate,
            "ray1_epoch_cpu_by_process_s": _median_by_name([d for x in runs["ray1"][e2]
                                                            for d in x.get("epoch_cpu_by_process_s", [])]),
            "ray2_epoch_cpu_by_process_s": _median_by_name([d for x in runs["ray2"][e2]
                                                            for d in x.get("epoch_cpu_by_process_s", [])]),
            "summary": summary, "per_epoch_parts_s": parts, "ddp_baseline": ddp,
            "runs": {v: {str(e): [{k: x[k] for k in ("wall_s", "report_s", "epoch_end_s", "epoch_cpu_s", "cpu_total_s")
                                   if k in x}
                                  for x in xs] for e, xs in by_e.items()} for v, by_e in runs.items()},
            "ratio_ray1_vs_inproc_per_epoch": r1["per_epoch_s"] / ip["per_epoch_s"],
            "ratio_ray1_vs_inproc_per_epoch_min": r1["per_epoch_interval_s"]["min"] / ip["per_epoch_interval_s"]["min"]
            if r1["per_epoch_interval_s"] else None,
            "ratio_ray1_vs_inproc_per_epoch_diff": r1["per_epoch_diff_s"]["median"] / ip["per_epoch_diff_s"]["median"],
            "cpu_ratio_ray1_vs_inproc_per_epoch": r1["per_epoch_cpu_s"]["median"] / ip["per_epoch_cpu_s"]["median"],
            # the same worker function in this process (num_workers=0): only the worker group differs
            "ratio_ray1_vs_local_per_epoch": r1["per_epoch_s"] / lo["per_epoch_s"],
            "cpu_ratio_ray1_vs_local_per_epoch": r1["per_epoch_cpu_s"]["median"] / lo["per_epoch_cpu_s"]["median"],
            "throughput_ratio_2w_vs_1w": r2["train_samples_per_s"] / r1["train_samples_per_s"],
            "throughput_ratio_2w_vs_1w_diff": r1["per_epoch_diff_s"]["median"] / r2["per_epoch_diff_s"]["median"]}


def print_ray(res: dict) -> None:
    rows = []
    for name, label in (("inproc", "in-process EpochLoop"), ("local", "stages.train.fit, local mode"),
                        ("ray1", "stages.train.fit, 1 worker"), ("ray2", "stages.train.fit, 2 workers")):
        s = res["summary"].get(name)
        if s is None:
            continue
        iv = s.get("per_epoch_interval_s")
        rows.append([label, fmt_spread(iv, " s", 2) if iv else "-", fmt_spread(s["per_epoch_diff_s"], " s", 2),
                     fmt_spread(s["startup_s"], " s", 1), f"{s['train_samples_per_s']:.0f}"])
    print_table(rows, ["run", "per epoch (report intervals)", "per epoch (E2-E1 diff)", "start-up",
                       "train samples/s"])
    print("CPU seconds per epoch (in-process: this process; Ray: every process of the local Ray session): " +
          ", ".join(f"{k} {fmt_spread(v['per_epoch_cpu_s'], ' s', 2)}" for k, v in res["summary"].items()))
    print(f"Ray 1 worker / in-process, CPU seconds per epoch: {res['cpu_ratio_ray1_vs_inproc_per_epoch']:.3f}; "
          f"idle Ray session: {res['ray_idle_cpu_per_s']:.3f} CPU-s per s")
    print(f"Ray CPU seconds per epoch by process, 1 worker: {res['ray1_epoch_cpu_by_process_s']}")
    print(f"Ray CPU seconds per epoch by process, 2 workers: {res['ray2_epoch_cpu_by_process_s']}")
    if res.get("ratio_ray1_vs_inproc_per_epoch_min"):
        print(f"Ray 1 worker / in-process, fastest epochs: {res['ratio_ray1_vs_inproc_per_epoch_min']:.3f}")
    print(f"Ray 1 worker / in-process per epoch: {res['ratio_ray1_vs_inproc_per_epoch']:.3f} (intervals), "
          f"{res['ratio_ray1_vs_inproc_per_epoch_diff']:.3f} (E2-E1 diff); target <= 1.15")
    if "cpu_ratio_ray1_vs_local_per_epoch" in res:
        print(f"Ray 1 worker / local mode (the same worker function in this process), per epoch: "
              f"{res['ratio_ray1_vs_local_per_epoch']:.3f} wall (report intervals vs E2-E1 diff), "
              f"{res['cpu_ratio_ray1_vs_local_per_epoch']:.3f} CPU seconds; target <= 1.15")
    print(f"2 workers / 1 worker throughput: {res['throughput_ratio_2w_vs_1w']:.3f} (intervals), "
          f"{res['throughput_ratio_2w_vs_1w_diff']:.3f} (E2-E1 diff)")
    print("per-epoch costs only the Ray path pays (seconds): " + ", ".join(
        f"{k} {v['median']:.3f}" for k, v in res["per_epoch_parts_s"].items()))
    d = res["ddp_baseline"]
    print(f"plain torch DDP (gloo, 1 thread per process, {d['steps']} steps of {d['batch_size']}): 1 process "
          f"{fmt_spread(d['wall_1_s'], ' s', 2)}, 2 processes {fmt_spread(d['wall_2_s'], ' s', 2)}; "
          f"throughput 2 vs 1: {d['throughput_ratio_2_vs_1']:.3f}")
    print(f"threads: in-process {res['in_process_threads']}, Ray worker probe {res['ray_worker_threads_probe']}")


# ----------------------------------------------------------------------------------------------------------------
# GPU: one CIFAR-10-LT CaCT run
# ----------------------------------------------------------------------------------------------------------------
def run_cifar_part(args, device) -> dict:
    from stages import longtail
    from stages.payload import read_split_tensors
    from cact_ops.training import fit_in_process

    if not args.data_root:
        raise SystemExit("--part cifar needs --data-root (the folder holding cifar10-jpeg/)")
    work = Path(tempfile.mkdtemp(prefix="cact-cifar-lt-"))
    try:
        t0 = time.perf_counter()
        splits = longtail.build(longtail.LongTailConfig(dataset="parquet", data_root=str(Path(args.data_root) /
                                                        "cifar10-jpeg"), out=str(work / "splits"),
                                                        imbalance_factor=100, n_max=args.cifar_n_max))
        train, val = read_split_tensors(splits, "train"), read_split_tensors(splits, "val")
        prep = time.perf_counter() - t0
        cfg = TrainConfig(method="cact", epochs=args.cifar_epochs, batch_size=args.batch_size, lr=0.1,
                          augment="crop_flip", seed=0)
        model = build_model(args.cifar_model, splits.num_classes, in_channels=3)
        _sync(device)
        t0 = time.perf_counter()
        loop = fit_in_process(model, cfg, train, val, device=str(device))
        _sync(device)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = int(train[1].shape[0])
    res = {"model": args.cifar_model, "epochs": args.cifar_epochs, "n_train": n, "prep_s": prep, "wall_s": wall,
           "images_per_s": n * args.cifar_epochs / wall, "final": loop.metrics[-1]}
    print(f"CIFAR-10-LT CaCT, {args.cifar_model}, {n} train rows, {args.cifar_epochs} epochs on {device}: "
          f"{wall:.1f} s ({res['images_per_s']:.0f} images/s); data prep {prep:.1f} s; "
          f"final val acc {loop.metrics[-1]['val_accuracy']:.3f}")
    return res


# ----------------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("step", "ray", "all", "cifar"), default="all")
    p.add_argument("--model", choices=("small_cnn", "cifar_resnet32", "both"), default="both",
                   help="model(s) of the step part")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=0, help="steps per timed sample (0: 3, or 1 for ResNet-32 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per method (default 3)")
    p.add_argument("--repeats", type=int, default=7, help="timed samples per method (interleaved)")
    p.add_argument("--loss-iters", type=int, default=200, help="calls per sample of the loss-alone timings")
    p.add_argument("--loss-rounds", type=int, default=7)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for this process (1 matches a 1-CPU Ray Train worker)")
    p.add_argument("--ray-epochs", type=int, nargs=2, default=(1, 4), metavar=("E1", "E2"))
    p.add_argument("--ray-repeats", type=int, default=2)
    p.add_argument("--ray-width", type=int, default=16, help="SmallCNN width of the Ray part")
    p.add_argument("--n-max", type=int, default=600, help="head-class rows of the synthetic long-tailed split")
    p.add_argument("--imbalance-factor", type=float, default=10)
    p.add_argument("--n-test-per-class", type=int, default=100)
    p.add_argument("--data-root", default=None, help="--part cifar: folder with cifar10-jpeg/")
    p.add_argument("--cifar-epochs", type=int, default=200)
    p.add_argument("--cifar-n-max", type=int, default=None, help="--part cifar: head-class count (default 5000)")
    p.add_argument("--cifar-model", default="cifar_resnet32")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    results = {"date": dt.date.today().isoformat(), "argv": sys.argv[1:] if argv is None else list(argv),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "device": str(device),
                           "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                           "loadavg_start": os.getloadavg()}}
    t0 = time.perf_counter()
    if args.part in ("step", "all"):
        results["step"] = run_step_part(args, device)
        print()
        print_step(results["step"], 1.05 if device.type == "cuda" else 1.10)
        print()
    if args.part in ("ray", "all"):
        if device.type != "cpu":
            print("[ray] the Ray part runs on CPU workers; --device is ignored there")
        results["ray"] = run_ray_part(args)
        print()
        print_ray(results["ray"])
        print()
    if args.part == "cifar":
        results["cifar"] = run_cifar_part(args, device)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["total_s"] = time.perf_counter() - t0
    print(f"total {results['total_s']:.0f} s; load average start {results['machine']['loadavg_start']}, "
          f"end {results['machine']['loadavg_end']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
