"""CPU training step with ``TrainConfig.amp_cpu`` (bf16 autocast, channels-last) vs the default fp32 step.

One CE training step of ``EpochLoop.train_epoch`` (crop + flip augmentation, forward, loss, backward, gradient
clipping, SGD step) on one batch, the two settings starting from the same weights, ``--repeats`` interleaved
samples of ``--steps`` steps each (AB, BA, ...). Reported: the median of the paired ratios amp_cpu / fp32 of
this process's CPU time per step, and whether the CPU has the bf16 instructions that make it pay (avx512_bf16,
AMX); without them oneDNN emulates bf16 and the ratio is above 1.

    .venv/bin/python benchmarks/cpu_amp.py --json /tmp/cpu_amp.json        # about 2 min on 2 CPUs
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cact_ops.models import build_model  # noqa: E402
from cact_ops.training import EpochLoop, TrainConfig  # noqa: E402


def cpu_flags() -> list[str]:
    """The bf16-related flags of this CPU (Linux; empty elsewhere)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted({f for f in flags.split(":", 1)[1].split() if f in ("avx512_bf16", "amx_bf16", "avx512f")})


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cifar_resnet32")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="steps per timed sample")
    ap.add_argument("--repeats", type=int, default=7, help="timed samples per setting")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    x, y = torch.rand(a.batch_size, 3, 32, 32), torch.arange(a.batch_size) % 10
    model0 = build_model(a.model, 10)
    loops = {amp: EpochLoop(copy.deepcopy(model0), TrainConfig(method="ce", batch_size=a.batch_size, seed=0,
                                                              augment="crop_flip", amp_cpu=amp), 10)
             for amp in (False, True)}
    for loop in loops.values():  # warm-up: oneDNN picks its kernels
        loop.train_epoch([(x, y)] * 2)
    start = {amp: (copy.deepcopy(loop.model.state_dict()), copy.deepcopy(loop.optimizer.state_dict()))
             for amp, loop in loops.items()}
    cpu_ms = {False: [], True: []}
    for r in range(a.repeats):
        for amp in ((False, True) if r % 2 == 0 else (True, False)):
            loop = loops[amp]
            loop.model.load_state_dict(start[amp][0])
            loop.optimizer.load_state_dict(start[amp][1])
            c0 = time.process_time()
            loop.train_epoch([(x, y)] * a.steps)
            cpu_ms[amp].append((time.process_time() - c0) / a.steps * 1e3)
    ratios = [b / f for b, f in zip(cpu_ms[True], cpu_ms[False])]
    res = {"model": a.model, "batch_size": a.batch_size, "steps": a.steps, "repeats": a.repeats,
           "threads": torch.get_num_threads(), "cpu_flags": cpu_flags(), "torch": torch.__version__,
           "fp32_cpu_ms": statistics.median(cpu_ms[False]), "amp_cpu_ms": statistics.median(cpu_ms[True]),
           "paired_ratio": statistics.median(ratios), "ratio_min_max": [min(ratios), max(ratios)],
           "raw_cpu_ms": {"fp32": cpu_ms[False], "amp_cpu": cpu_ms[True]}}
    print(f"{a.model}, batch {a.batch_size}, {res['threads']} threads, CPU flags {res['cpu_flags']}: "
          f"fp32 {res['fp32_cpu_ms']:.0f} CPU-ms per step, amp_cpu {res['amp_cpu_ms']:.0f}; paired ratio "
          f"amp_cpu/fp32 {res['paired_ratio']:.3f} [{min(ratios):.3f}-{max(ratios):.3f}]")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
