"""How long a full sweep on frozen features takes: 6 methods x 8 knob values x 5 seeds at one IF.

Per seed: ``ce`` and ``ce_finetune`` (no knob; ``ce_finetune`` trained once per knob value of a lr sweep, so that
every method is 8 heads) and ConfTr, ConfTr-class, CaCT-uniform, CaCT at 8 values of their own size knob; each
head trained with the evidence protocol (``benchmarks/results/evidence.py``: DeepMind's ConfTr settings, starting
from the backbone's last layer) and evaluated with hard split CP on D_val (10 splits) and the pool (20 splits,
LAC and APS, both predictors). The backbones are trained first and not timed (``evidence.py`` caches them in
``--work``): the figure is the sweep a user runs once features exist.

    python benchmarks/feature_sweep.py --dataset newsgroups --data-root DATA/20news-bydate.tar.gz \\
        --imbalance-factor 10 --work WORK
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "results"))
sys.path.insert(0, str(HERE.parent))

import evidence  # noqa: E402

EIGHT = {
    "conftr": ("conftr_lambda", (0.01, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)),
    "conftr_class": ("conftr_lambda", (0.01, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)),
    "cact_uniform": ("eta_relative", (0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)),
    "cact": ("eta_relative", (0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)),
    "ce_finetune": ("lr", (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=sorted(evidence.BACKBONES), default="newsgroups")
    p.add_argument("--data-root", required=True)
    p.add_argument("--imbalance-factor", type=float, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--work", type=Path, required=True, help="evidence.py's scratch folder (cached splits and backbones)")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    evidence.KNOBS.clear()  # the warm-up pass trains the backbones (and ce_finetune) only
    heads = 1 + sum(len(v) for _, v in EIGHT.values())  # ce (the backbone's layer, no training) + the sweep
    with tempfile.TemporaryDirectory() as out:
        # backbones first, untimed: a sweep starts where features exist
        for seed in a.seeds:
            evidence.run_seed(a.dataset, a.data_root, a.imbalance_factor, seed, Path(out) / "warm", a.work, 0.2, 1)
        evidence.KNOBS.update(EIGHT)
        t0 = time.perf_counter()
        for seed in a.seeds:
            evidence.run_seed(a.dataset, a.data_root, a.imbalance_factor, seed, Path(out) / "timed", a.work, 0.2, 20)
        seconds = time.perf_counter() - t0
    print(f"| sweep on frozen features | {a.dataset}-LT IF {a.imbalance_factor:g} | {len(a.seeds)} seeds x "
          f"{heads} heads (6 methods x 8 values; ce is the backbone's own layer) | {seconds:.0f} s "
          f"({seconds / 60:.1f} min) | {os.cpu_count()} CPUs |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
