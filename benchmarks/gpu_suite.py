"""GPU suite: the performance figures that need a GPU, in one run; a CPU smoke form keeps it from rotting.

    bash benchmarks/gpu_suite.sh OUT_DIR                                       # a fresh GPU machine, end to end
    python benchmarks/gpu_suite.py --device cuda --out OUT_DIR/gpu_suite.json  # torchsort with CUDA installed
    .venv/bin/python benchmarks/gpu_suite.py --device cpu --smoke --out /tmp/gpu_suite_smoke.json   # CI, ~15 s

Four sections, each figure saying what was timed (the JSON's ``what`` fields); results go to ``--out`` as JSON
and to stdout as a table. A section that raises is recorded under ``errors`` and the others still run; the exit
status is 1 when any section failed or the engine's two devices disagree.

``torchsort``  Is torchsort's CUDA extension there: ``torchsort.isotonic_cuda`` importable (its file is
               reported), and ``soft_sort`` forward + backward on a [4, 256] tensor on ``--device`` equal to the
               CPU extension's (max abs difference of values and gradients). Timed: one soft_sort forward +
               backward of a [1, 256] float32 tensor (the training-time quantile's size), median over samples of
               many calls, on the CPU and on the device. On ``--device cpu`` the backend is reported as "cpu".
``step``       One training step, CaCT vs CE: ``benchmarks/train_overhead.py``'s :func:`step_ratio` (imported,
               not copied): :meth:`cact_ops.training.EpochLoop.train_epoch` on one repeated batch (forward under
               bf16 autocast on CUDA as ``TrainConfig.amp`` does, loss, backward, gradient clipping, SGD step),
               same model, same initial weights and optimizer state, same batch; warm-up steps, then
               ``repeats`` interleaved samples (CE, CaCT / CaCT, CE, ...) of ``steps`` steps each, a
               ``torch.cuda.synchronize`` before and after each sample. Figures: median ms per step of each
               method (wall clock on CUDA, this process's CPU time on the CPU), the median of the paired ratios
               CaCT/CE, and the ratio of the minima. Target on a GPU: ratio <= 1.05. Models: torchvision
               ResNet-18 (``imagenet_resnet18``, 224x224 input, 1000 classes, batch 256) and the CIFAR ResNet-32
               (``cifar_resnet32``, 32x32, 10 classes, batch 128).
``engine``     :func:`cact_ops.engine.evaluate_pool` on the device vs on the CPU: the stage's full grid for one
               method (LAC, APS, RAPS x standard, class-wise x alpha 0.1, 0.05 x 20 splits, randomised
               APS/RAPS) on a synthetic 50,000 x 1,000 float32 pool (``benchmarks/cp_eval_vs_torchcp_mapie.py``'s
               data: randn logits, uniform labels), the same precomputed splits on both sides. Timed: one call,
               from CPU logits to the metric tensors (device side: host-to-device copy included, synchronised at
               the end; ``summarize`` excluded), median over repeats after a small warm-up call. The summary
               rows (``engine.summarize``) of both runs must agree within ``--engine-atol``/``--engine-rtol``
               (a test score within float32 rounding of a threshold can fall on the other side on another
               device; the defaults allow a few such samples in the per-class metrics). On ``--device cpu`` the
               "device" side runs the engine's torch kernels (``cact_ops.ranking._NUMPY_ON_CPU = False``: the
               code CUDA runs) against the NumPy ones, so the smoke form checks that code path too.
``inference``  Images/s of ResNet-18 (224x224) and ResNet-32 (32x32), eval mode, ``torch.inference_mode``,
               fixed batch (256 / 1024), fp32 (cuDNN's default TF32 setting, recorded) and, on CUDA, bf16
               autocast. Timed: ``model(x).float().cpu()`` per batch, as ``stages.infer.LogitsPredictor`` runs a
               decoded batch, with x already on the device (decoding and the host-to-device copy excluded),
               median over samples of ``infer_batches`` batches after warm-up batches. Random weights: the
               throughput does not depend on them.

Time on an H100/H200 (estimate; this suite has not run on a GPU yet): step about 25 s (2 models x 2 methods x
(5 warm-up + 7 x 10 timed) steps: ResNet-18 at 224 batch 256 under bf16 ~40-80 ms a step, ResNet-32 at batch
128 ~12-20 ms, launch-bound; plus cuDNN's first-call set-up), engine about 30 s (CPU side: the full grid took
4.1 s on 2 threads of the CI machine, docs/BENCHMARKS.md, x (1 + 3 repeats) plus warm-up; GPU side under a
second each), inference about 10 s (20 batches x 3 samples per model and precision), torchsort and start-up
about 10 s: about 1.5 minutes, plus about 100 s to build torchsort with CUDA in ``gpu_suite.sh``
(measured on an H100, ../shared/ENVIRONMENT.md): about 3-4 minutes in all, well under 10. ``--smoke`` sizes (a
few steps at batch 8 and 32x32 input, a 2,000 x 10 pool, a few hundred inference rows) run in about 15 s on 2
CPU cores, imports included.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import train_overhead as TO  # noqa: E402  (benchmarks/train_overhead.py: step_ratio, spread, print_table)
from cact_ops import engine as E  # noqa: E402
from cact_ops import ranking  # noqa: E402
from cact_ops.models import build_model  # noqa: E402

STEP_TARGET_GPU = 1.05
STEP_TARGET_CPU = 1.10  # the CPU target of docs/BENCHMARKS.md (smoke figures are not judged against it)


@dataclasses.dataclass(frozen=True)
class Sizes:
    r18_input: int  # ResNet-18 input side (224: ImageNet-style)
    r18_classes: int
    r18_batch: int
    r32_classes: int
    r32_batch: int
    warmup: int  # step: warm-up steps per method
    repeats: int  # step: timed samples per method
    steps: int  # step: steps per timed sample
    engine_n: int
    engine_k: int
    engine_splits: int
    engine_repeats: int
    infer_r18_batch: int
    infer_r32_batch: int
    infer_batches: int  # batches per timed sample
    infer_samples: int
    infer_warmup: int
    torchsort_calls: int


FULL = Sizes(r18_input=224, r18_classes=1000, r18_batch=256, r32_classes=10, r32_batch=128, warmup=5, repeats=7,
             steps=10, engine_n=50_000, engine_k=1_000, engine_splits=20, engine_repeats=3, infer_r18_batch=256,
             infer_r32_batch=1024, infer_batches=20, infer_samples=3, infer_warmup=3, torchsort_calls=200)
SMOKE = Sizes(r18_input=32, r18_classes=10, r18_batch=8, r32_classes=10, r32_batch=8, warmup=1, repeats=3,
              steps=1, engine_n=2_000, engine_k=10, engine_splits=20, engine_repeats=1, infer_r18_batch=64,
              infer_r32_batch=64, infer_batches=2, infer_samples=2, infer_warmup=1, torchsort_calls=20)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, samples: int, device: torch.device) -> list[float]:
    """Wall seconds of ``samples`` calls of ``fn`` (each synchronised before and after)."""
    out = []
    for _ in range(samples):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# torchsort
# ----------------------------------------------------------------------------------------------------------------
def torchsort_section(device: torch.device, sz: Sizes) -> dict:
    import importlib.metadata

    import torchsort

    info: dict = {"what": "torchsort soft_sort (l2, strength 1.0) on the device vs the CPU extension; "
                          "timed: forward + backward of one [1, 256] float32 tensor, us per call",
                  "file": torchsort.__file__}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        info["version"] = importlib.metadata.version("torchsort")
    try:
        from torchsort import isotonic_cuda

        info["cuda_extension"] = isotonic_cuda.__file__
    except ImportError as e:
        info["cuda_extension"] = None
        info["cuda_extension_error"] = f"{type(e).__name__}: {e}"

    def fwd_bwd(x):
        x = x.detach().clone().requires_grad_(True)
        y = torchsort.soft_sort(x, regularization="l2", regularization_strength=1.0)
        (y * torch.linspace(-1, 1, x.shape[1], device=x.device)).sum().backward()
        return y.detach(), x.grad

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, generator=g)
    ref_y, ref_g = fwd_bwd(x)
    dev_y, dev_g = fwd_bwd(x.to(device))
    info["backend"] = "cuda (torchsort.isotonic_cuda)" if device.type == "cuda" else "cpu"
    info["works_on_device"] = True
    info["max_abs_diff_vs_cpu"] = max(float((dev_y.cpu() - ref_y).abs().max()),
                                      float((dev_g.cpu() - ref_g).abs().max()))
    one = torch.randn(1, 256, generator=g)
    timings = {}
    for name, dev in (("cpu", torch.device("cpu")), ("device", device)):
        v = one.to(dev)
        for _ in range(10):
            fwd_bwd(v)

        def calls(v=v):
            for _ in range(sz.torchsort_calls):
                fwd_bwd(v)

        t = _median_time(calls, 5, dev)
        timings[name] = statistics.median(t) / sz.torchsort_calls * 1e6
    info["fwd_bwd_us"] = timings
    return info


# ----------------------------------------------------------------------------------------------------------------
# step: CaCT vs CE (train_overhead.step_ratio)
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _step_model(family: str, shape: tuple[int, int, int]):
    """Make ``family`` with input ``shape`` known to train_overhead.step_ratio (its MODELS table) for a while."""
    old = TO.MODELS.get(family)
    TO.MODELS[family] = (shape, {})
    try:
        yield
    finally:
        if old is None:
            del TO.MODELS[family]
        else:
            TO.MODELS[family] = old


def step_section(device: torch.device, sz: Sizes, smoke: bool = False) -> dict:
    out = {}
    clock = "wall" if device.type == "cuda" else "cpu"
    target = STEP_TARGET_GPU if device.type == "cuda" else STEP_TARGET_CPU
    for label, family, shape, batch, classes in (
            ("resnet18", "imagenet_resnet18", (3, sz.r18_input, sz.r18_input), sz.r18_batch, sz.r18_classes),
            ("resnet32", "cifar_resnet32", (3, 32, 32), sz.r32_batch, sz.r32_classes)):
        print(f"[step] {label}: batch {batch}x{'x'.join(map(str, shape))}, {classes} classes, {sz.repeats} samples "
              f"x {sz.steps} steps per method ...", flush=True)
        with _step_model(family, shape):
            r = TO.step_ratio(family, batch, sz.steps, sz.repeats, sz.warmup, device, num_classes=classes)
        c = r[clock]
        out[label] = {
            "what": (f"one EpochLoop.train_epoch step of {family} ({batch}x{'x'.join(map(str, shape))}, {classes} "
                     f"classes{', bf16 autocast' if device.type == 'cuda' else ''}), CE vs CaCT, same weights and "
                     f"batch; {clock} ms per step, median of {sz.repeats} interleaved samples of {sz.steps} steps"),
            "model": family, "input": [batch, *shape], "num_classes": classes, "clock": clock,
            "ce_ms": c["ce_ms"]["median"], "cact_ms": c["cact_ms"]["median"],
            "ratio": c["paired_ratio"]["median"], "ratio_q25": c["paired_ratio"]["q25"],
            "ratio_q75": c["paired_ratio"]["q75"], "ratio_of_minima": c["ratio_of_minima"],
            "target": f"<= {target}",
            # smoke sizes (batch 8, 1 step per sample) are not judged against the target
            "target_met": None if smoke else bool(c["paired_ratio"]["median"] <= target),
            "detail": {k: r[k] for k in ("wall", "cpu", "steps_per_sample", "repeats", "warmup_steps")},
        }
    return out


# ----------------------------------------------------------------------------------------------------------------
# engine: evaluate_pool on the device vs the CPU
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _torch_kernels_on_cpu(on: bool):
    old = ranking._NUMPY_ON_CPU
    ranking._NUMPY_ON_CPU = not on
    try:
        yield
    finally:
        ranking._NUMPY_ON_CPU = old


def _summary_numbers(rows: list[dict]) -> dict:
    out = {}
    for row in rows:
        key = f"{row['score']}/{row['predictor']}/{row['alpha']}"
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "alpha":
                out[f"{key}/{k}"] = float(v)
    return out


def engine_section(device: torch.device, sz: Sizes, atol: float, rtol: float, seed: int = 0) -> dict:
    n, k, r_ = sz.engine_n, sz.engine_k, sz.engine_splits
    alphas = (0.1, 0.05)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g)
    labels = torch.randint(0, k, (n,), generator=g)
    train_counts = torch.randint(1, 500, (k,), generator=g).tolist()  # only for the shot groups
    splits = E.split_indices(labels, r_, 0.5, seed=seed)
    small = min(n, 2000)
    small_splits = E.split_indices(labels[:small], 2, 0.5, seed=seed)
    torch_kernels = device.type == "cpu"  # on the CPU, the "device" side runs the torch kernels CUDA runs

    def run(dev: torch.device, lg, lb, sp):
        with _torch_kernels_on_cpu(torch_kernels and dev == device):
            acc, res = E.evaluate_pool(lg, lb, train_counts, alphas=alphas, n_splits=sp[0].shape[0], splits=sp,
                                       device=str(dev), seed=seed)
            _sync(dev)
        return acc, res

    cpu = torch.device("cpu")
    timings, results = {}, {}
    for name, dev in (("device", device), ("cpu", cpu)):
        run(dev, logits[:small], labels[:small], small_splits)  # warm-up: CUDA context, kernels, allocator
        t = []
        for _ in range(sz.engine_repeats):
            t0 = time.perf_counter()
            results[name] = run(dev, logits, labels, splits)
            t.append(time.perf_counter() - t0)
        timings[name] = t
        print(f"[engine] {name} ({dev}): " + ", ".join(f"{x:.2f}" for x in t) + " s", flush=True)
    rows = {}
    for name, (acc, res) in results.items():
        classes = [str(i) for i in range(k)]
        test_counts = torch.bincount(labels[splits[1][0]], minlength=k).tolist()
        rows[name] = _summary_numbers(E.summarize("m", acc.cpu(), res, alphas, classes, train_counts,
                                                  test_counts)[0])
    worst_key, worst, agree, n_values = None, 0.0, True, 0
    for key, a in rows["cpu"].items():
        b = rows["device"].get(key, float("nan"))
        n_values += 1
        if math.isnan(a) and math.isnan(b):
            continue
        d = abs(a - b)
        if not (d <= atol + rtol * abs(a)):  # NaN on one side only fails too
            agree = False
        if not d <= worst:
            worst, worst_key = d, key
    dev_s, cpu_s = statistics.median(timings["device"]), statistics.median(timings["cpu"])
    return {
        "what": (f"one cact_ops.engine.evaluate_pool call: lac, aps, raps x standard, classwise x alpha 0.1, 0.05 x "
                 f"{r_} splits on a {n} x {k} float32 pool (randn logits), CPU logits in, metric tensors out "
                 f"(device side: host-to-device copy included, synchronised); wall s, median of "
                 f"{sz.engine_repeats} after a warm-up call on {small} rows"),
        "n": n, "k": k, "n_splits": r_, "alphas": list(alphas),
        "device_path": ("torch kernels on the CPU (ranking._NUMPY_ON_CPU = False: the code CUDA runs)"
                        if torch_kernels else f"torch kernels on {device}"),
        "cpu_path": f"NumPy kernels on the CPU, {torch.get_num_threads()} torch threads",
        "device_s": dev_s, "cpu_s": cpu_s, "device_over_cpu": dev_s / cpu_s, "speedup": cpu_s / dev_s,
        "raw_s": timings,
        "agree": agree, "summary_values_compared": n_values, "max_abs_diff": worst, "max_abs_diff_at": worst_key,
        "tolerance": {"atol": atol, "rtol": rtol},
    }


# ----------------------------------------------------------------------------------------------------------------
# inference throughput
# ----------------------------------------------------------------------------------------------------------------
def _throughput(model, x, device: torch.device, bf16: bool, sz: Sizes) -> dict:
    amp = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())

    def batches(n):
        for _ in range(n):
            model(x).float().cpu()  # as LogitsPredictor.__call__: logits back on the host (a sync on CUDA)

    with torch.inference_mode(), amp:
        batches(sz.infer_warmup)
        t = _median_time(lambda: batches(sz.infer_batches), sz.infer_samples, device)
    per = statistics.median(t)
    return {"images_per_s": x.shape[0] * sz.infer_batches / per,
            "ms_per_batch": per / sz.infer_batches * 1e3, "raw_s": t}


def inference_section(device: torch.device, sz: Sizes) -> dict:
    out = {}
    for label, family, side, batch, classes in (
            ("resnet18", "imagenet_resnet18", sz.r18_input, sz.infer_r18_batch, sz.r18_classes),
            ("resnet32", "cifar_resnet32", 32, sz.infer_r32_batch, sz.r32_classes)):
        torch.manual_seed(0)
        model = build_model(family, classes, in_channels=3).to(device).eval()
        x = torch.rand(batch, 3, side, side, device=device)
        res = {"what": (f"images/s of {family} ({batch}x3x{side}x{side}, {classes} classes), eval, inference_mode, "
                        f"model(x).float().cpu() per batch with x on the device; median of {sz.infer_samples} "
                        f"samples of {sz.infer_batches} batches after {sz.infer_warmup} warm-up"),
               "model": family, "input": [batch, 3, side, side]}
        res["fp32"] = _throughput(model, x, device, False, sz)
        if device.type == "cuda":
            res["bf16_autocast"] = _throughput(model, x, device, True, sz)
        print(f"[inference] {label}: " + ", ".join(f"{p} {res[p]['images_per_s']:.0f} images/s"
                                                   for p in ("fp32", "bf16_autocast") if p in res), flush=True)
        out[label] = res
        del model, x
    return out


# ----------------------------------------------------------------------------------------------------------------
def _table(res: dict) -> None:
    rows = []
    ts = res.get("torchsort")
    if ts:
        rows.append(["torchsort backend", ts["backend"], f"CUDA extension: {ts['cuda_extension'] or 'absent'}"])
        rows.append(["torchsort soft_sort [1,256] fwd+bwd",
                     f"{ts['fwd_bwd_us']['device']:.0f} us (device), {ts['fwd_bwd_us']['cpu']:.0f} us (cpu)",
                     f"|device - cpu| {ts['max_abs_diff_vs_cpu']:.1e}"])
    for label, s in (res.get("step") or {}).items():
        rows.append([f"step CaCT/CE {label} {'x'.join(map(str, s['input']))}",
                     f"{s['ratio']:.3f} (CE {s['ce_ms']:.1f} ms, CaCT {s['cact_ms']:.1f} ms, {s['clock']})",
                     f"target {s['target']}; ratio of minima {s['ratio_of_minima']:.3f}"])
    e = res.get("engine")
    if e:
        rows.append([f"engine {e['n']}x{e['k']}, {e['n_splits']} splits, full grid",
                     f"device {e['device_s']:.3f} s, cpu {e['cpu_s']:.3f} s (device/cpu {e['device_over_cpu']:.3f})",
                     f"agree {e['agree']} (max |diff| {e['max_abs_diff']:.1e})"])
    for label, r in (res.get("inference") or {}).items():
        rows.append([f"inference {label} {'x'.join(map(str, r['input']))}",
                     ", ".join(f"{p} {r[p]['images_per_s']:.0f} images/s" for p in ("fp32", "bf16_autocast")
                               if p in r), ""])
    TO.print_table(rows, ["figure", "value", "note"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI): a few steps, a 2000 x 10 pool")
    p.add_argument("--sections", nargs="+", choices=("torchsort", "step", "engine", "inference"),
                   default=["torchsort", "step", "engine", "inference"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --device cpu, as train_overhead.py; torch's choice with "
                        "cuda, so the engine's CPU side uses every core of the GPU machine)")
    p.add_argument("--r18-batch", type=int, default=None, help="step: ResNet-18 batch (default 256; smoke 8)")
    p.add_argument("--r32-batch", type=int, default=None, help="step: ResNet-32 batch (default 128; smoke 8)")
    p.add_argument("--repeats", type=int, default=None, help="step: timed samples per method (default 7)")
    p.add_argument("--steps", type=int, default=None, help="step: steps per sample (default 10)")
    p.add_argument("--engine-n", type=int, default=None)
    p.add_argument("--engine-k", type=int, default=None)
    p.add_argument("--engine-atol", type=float, default=1e-3)
    p.add_argument("--engine-rtol", type=float, default=1e-3)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:  # on a loaded 2-core CI machine, 2 threads' spin-waiting made a smoke step 10-20x slower
        torch.set_num_threads(threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    sz = SMOKE if args.smoke else FULL
    over = {"r18_batch": args.r18_batch, "r32_batch": args.r32_batch, "repeats": args.repeats,
            "steps": args.steps, "engine_n": args.engine_n, "engine_k": args.engine_k}
    sz = dataclasses.replace(sz, **{k: v for k, v in over.items() if v is not None})
    res: dict = {
        "suite": "gpu_suite", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv), "smoke": args.smoke, "device": str(device),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                    "cuda": torch.version.cuda, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                    "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                    "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                    "loadavg_start": os.getloadavg()},
        "sizes": dataclasses.asdict(sz), "section_s": {}, "errors": {},
    }
    t_all = time.perf_counter()
    sections = {"torchsort": lambda: torchsort_section(device, sz),
                "step": lambda: step_section(device, sz, args.smoke),
                "engine": lambda: engine_section(device, sz, args.engine_atol, args.engine_rtol),
                "inference": lambda: inference_section(device, sz)}
    for name in ("torchsort", "step", "engine", "inference"):
        if name not in args.sections:
            continue
        t0 = time.perf_counter()
        try:
            res[name] = sections[name]()
        except Exception as e:  # noqa: BLE001 - record it, run the other sections
            traceback.print_exc()
            res["errors"][name] = f"{type(e).__name__}: {e}"
        res["section_s"][name] = time.perf_counter() - t0
        print(f"[{name}] {res['section_s'][name]:.1f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["total_s"] = time.perf_counter() - t_all
    if device.type == "cuda":
        res["machine"]["max_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print()
    _table(res)
    print(f"\ntotal {res['total_s']:.1f} s ({'smoke sizes' if args.smoke else 'full sizes'}, {device}); "
          f"load average {res['machine']['loadavg_start'][0]:.1f} -> {res['machine']['loadavg_end'][0]:.1f}")
    if res["errors"]:
        print(f"errors: {res['errors']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
        print(f"wrote {args.out}")
    bad = bool(res["errors"]) or ("engine" in res and not res["engine"]["agree"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
