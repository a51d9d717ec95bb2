"""How far the training-time smooth threshold sits from the hard split-CP one, by calibration size.

    python benchmarks/smooth_vs_hard_threshold.py

Log-probability-like true-class scores (minus an exponential: "confident" rate 5, "weak" rate 0.7), 50 draws per
size; prints the mean and sd of (smooth - hard) and both thresholds. docs/DESIGN.md section 4 quotes it.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cact_ops.cp import conformal_quantile  # noqa: E402
from cact_ops.smooth import smooth_threshold  # noqa: E402

torch.manual_seed(0)
for name, rate in (("confident", 5.0), ("weak", 0.7)):
    for n in (32, 64, 256, 2000):
        rows = []
        for _ in range(50):
            s = -torch.distributions.Exponential(rate).sample((n,))
            rows.append((float(smooth_threshold(s, 0.1, 1.0)), -float(conformal_quantile(-s.double(), 0.1))))
        d = torch.tensor(rows)
        diff = d[:, 0] - d[:, 1]
        print(f"{name:9s} n={n:5d}  smooth - hard: mean {diff.mean():+.3f} sd {diff.std():.3f}  "
              f"hard {d[:, 1].mean():.3f}")
