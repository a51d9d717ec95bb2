"""The two CPU kernels behind the CP engine's small-size changes: torch's softmax against
``cact_ops.scores.softmax`` (written out below 16 classes), and ``argmax`` against ``amax`` over the classes.

Best of ``--repeats`` calls per kernel on standard-normal float32 logits, torch's default threads:

    .venv/bin/python benchmarks/cpu_kernels.py
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cact_ops.scores import softmax  # noqa: E402


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    a = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {a.repeats} calls, ms")
    print("n x K          torch.softmax  scores.softmax  argmax(1)  amax(1)")
    for n, k in ((10_000, 10), (10_000, 16), (10_000, 100), (50_000, 1_000)):
        x = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
        row = [best_ms(f, a.repeats) for f in (lambda: torch.softmax(x, dim=1), lambda: softmax(x),
                                                lambda: x.argmax(dim=1), lambda: x.amax(dim=1))]
        print(f"{n:>6} x {k:<5} " + "  ".join(f"{v:13.3f}" for v in row))


if __name__ == "__main__":
    main()
