"""Hard split CP evaluation (calibrate + sets + all metrics) vs TorchCP and MAPIE on the same random logits.

Workload (defaults): 50,000 x 1,000 standard-normal logits, uniform labels, stratified half/half
calibration/test splits drawn once by ``cact_ops.engine.split_indices`` and handed to every library, alpha 0.1,
non-randomised APS/RAPS (so the three implementations must agree exactly; the agreement is printed). Every
library computes the same metrics from its own sets: accuracy, coverage, average size, CovGap, under-covered
class ratio, SSCV, per-class coverage and size, many/medium/few-shot set size (with the library's own metric
functions where it has them, the kernels of ``cact_ops.metrics`` for the rest).

Two workloads per (score, predictor):
  * 1 split   one calibration/test split (best of ``--repeats``);
  * R splits  the evaluation protocol of ``stages.evaluate`` (R = ``--n-splits``, default 20), timed once (best
              of ``--repeats`` when the logits have at most 1e6 entries: such a run takes milliseconds);
              ours is ``cact_ops.engine.evaluate_pool``, the function the stage calls.
    TorchCP and MAPIE calibrate and predict from the logits on every split (their APIs take logits or
    features); ours computes the softmax, sort and scores once and reuses them across splits.
The libraries' runs are interleaved (ours, TorchCP, MAPIE, ours, ...) so that load from other jobs hits all alike.

Floor: per size, the time to read the logits once (best of 20 of a full reduction over the float32 array, by
torch with all threads and by NumPy; the faster), i.e. the memory-bandwidth bound of any evaluation that reads
its input; rows report ours / floor.

``--grid`` runs every size of the grid (n, K) in {10k x 10, 10k x 100, 50k x 1000} (``--sizes`` changes it, e.g.
``--sizes 10000x10 10000x100``) in one command: one table, rows tagged with their size. Without it, one size
(``--n``, ``--k``; default 50k x 1000).

TorchCP and MAPIE are benchmark-only dependencies, installed apart from the project (docs/BENCHMARKS.md)::

    PYTHONPATH=/tmp/benchsite:. .venv/bin/python benchmarks/cp_eval_vs_torchcp_mapie.py
    PYTHONPATH=/tmp/benchsite:. .venv/bin/python benchmarks/cp_eval_vs_torchcp_mapie.py --n 5000 --k 100  # quick
    PYTHONPATH=.bench-site:. .venv/bin/python benchmarks/cp_eval_vs_torchcp_mapie.py --grid --json grid.json

Prints a Markdown table (seconds and ratios) and writes the raw figures as JSON (``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import numpy as np
import torch

from cact_ops import engine as E
from cact_ops.metrics import SetStats, shot_groups


# ----------------------------------------------------------------------------------------------------------
# Metrics on explicit sets, shared by the TorchCP and MAPIE runs for what their libraries do not provide.


def _extra_metrics(sets: torch.Tensor, labels: torch.Tensor, alpha: float, groups: torch.Tensor) -> dict:
    """Per-class coverage/size, under-covered ratio, SSCV, shot sizes from a bool [m, K] set mask, by the kernels
    of :class:`cact_ops.metrics.SetStats` (those the evaluation stage uses)."""
    covered = sets[torch.arange(len(labels)), labels]
    st = SetStats(covered[None], sets.sum(1)[None], labels, sets.shape[1], [alpha], groups)
    return {"class_coverage": st.class_coverage[0], "class_size": st.class_size[0], "shot_size": st.group_size[0],
            "undercovered": float(st.undercovered()[0]), "sscv": float(st.sscv()[0])}


def run_torchcp(logits, labels, cal, test, score, predictor, alpha, groups, lam, k_reg):
    from torchcp.classification.predictor import ClassConditionalPredictor, SplitPredictor
    from torchcp.classification.score import APS, LAC, RAPS
    from torchcp.classification.utils import metrics as M

    score_fn = {"lac": lambda: LAC(), "aps": lambda: APS(randomized=False),
                "raps": lambda: RAPS(penalty=lam, kreg=k_reg, randomized=False)}[score]()
    cls = SplitPredictor if predictor == "standard" else ClassConditionalPredictor
    k = logits.shape[1]
    out = []
    for r in range(cal.shape[0]):
        p = cls(score_fn, alpha=alpha)
        p.calculate_threshold(logits[cal[r]], labels[cal[r]], alpha)
        x_test, y_test = logits[test[r]], labels[test[r]]
        sets = p.predict_with_logits(x_test).bool()
        res = {"accuracy": float((x_test.argmax(1) == y_test).double().mean()),
               "coverage": M.coverage_rate(sets, y_test), "size": M.average_size(sets),
               "covgap": M.CovGap(sets, y_test, alpha, k), "sscv_torchcp": M.SSCV(sets, y_test, alpha)}
        res.update(_extra_metrics(sets, y_test, alpha, groups))
        out.append(res)
    return out


class _LogitsClassifier:
    """A fitted scikit-learn classifier whose features are logits: predict_proba = softmax (for MAPIE)."""

    def __new__(cls, num_classes):
        from sklearn.base import BaseEstimator, ClassifierMixin

        class LogitsClassifier(ClassifierMixin, BaseEstimator):
            def fit(self, x, y=None):
                self.classes_ = np.arange(num_classes)
                self.n_features_in_ = num_classes
                return self

            def predict_proba(self, x):
                z = np.exp(x - x.max(axis=1, keepdims=True))
                return z / z.sum(axis=1, keepdims=True)

            def predict(self, x):
                return x.argmax(axis=1)

        return LogitsClassifier().fit(None)


def run_mapie(logits, labels, cal, test, score, alpha, groups):
    from mapie.classification import SplitConformalClassifier
    from mapie.metrics.classification import classification_coverage_score, classification_mean_width_score

    x, y = logits.numpy(), labels.numpy()
    est = _LogitsClassifier(x.shape[1])
    k = x.shape[1]
    out = []
    for r in range(cal.shape[0]):
        c, t = cal[r].numpy(), test[r].numpy()
        m = SplitConformalClassifier(est, confidence_level=1 - alpha, conformity_score=score, prefit=True)
        m.conformalize(x[c], y[c])
        params = {"include_last_label": False} if score == "aps" else None  # {k : s(x, k) <= q}, as ours
        _, sets = m.predict_set(x[t], conformity_score_params=params)
        sets = sets[:, :, 0]
        yt = y[t]
        cov_k = np.bincount(yt, weights=sets[np.arange(len(yt)), yt], minlength=k) / np.bincount(yt, minlength=k)
        res = {"accuracy": float((x[t].argmax(1) == yt).mean()),
               "coverage": float(np.ravel(classification_coverage_score(yt, sets))[0]),
               "size": float(np.ravel(classification_mean_width_score(sets))[0]),
               "covgap": float(100 * np.nanmean(np.abs(cov_k - (1 - alpha))))}
        res.update(_extra_metrics(torch.from_numpy(sets), torch.from_numpy(yt), alpha, groups))
        out.append(res)
    return out


def run_ours(logits, labels, cal, test, score, predictor, alpha, train_counts, lam, k_reg, device):
    acc, res = E.evaluate_pool(logits, labels, train_counts, scores=[score], predictors=[predictor], alphas=[alpha],
                               randomized=False, raps_lam=lam, raps_k_reg=k_reg, device=device,
                               splits=(cal, test))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return acc, res[0]


def _timed(fn, repeats):
    """Best wall time of ``repeats`` runs, the CPU time (all threads) of that run, and its result."""
    return _timed_interleaved({"fn": fn}, repeats)["fn"]


def _timed_interleaved(fns: dict, repeats):
    """:func:`_timed` of several functions, their runs interleaved (a, b, c, a, b, c, ...): {name: ((best wall,
    its CPU time), result)}."""
    best = {k: (float("inf"), float("nan")) for k in fns}
    out = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            out[k] = fn()
            wall = time.perf_counter() - t0
            if wall < best[k][0]:
                best[k] = (wall, time.process_time() - c0)
    return {k: (best[k], out[k]) for k in fns}


def read_floor(logits: torch.Tensor, repeats: int = 20) -> dict:
    """Time to read the logits once: best of ``repeats`` full reductions (torch, all threads; NumPy, one thread),
    the faster of the two, and the bandwidth it implies (GB/s)."""
    x = logits.contiguous()
    x_np = x.numpy()
    best = {"torch": float("inf"), "numpy": float("inf")}
    for _ in range(repeats):
        for name, fn in (("torch", lambda: x.sum()), ("numpy", lambda: x_np.sum())):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    floor = min(best.values())
    return {"floor_s": floor, "floor_torch_s": best["torch"], "floor_numpy_s": best["numpy"],
            "bytes": x.numel() * x.element_size(), "gb_per_s": x.numel() * x.element_size() / floor / 1e9}


GRID = ("10000x10", "10000x100", "50000x1000")


def run_size(a, n: int, k: int, env: dict) -> tuple[list[dict], dict, tuple]:
    """Every (workload, score, predictor) row at one size, the floor, and ours' full grid (wall, CPU)."""
    g = torch.Generator().manual_seed(a.seed)
    logits = torch.randn(n, k, generator=g)
    labels = torch.randint(0, k, (n,), generator=g)
    train_counts = torch.randint(1, 500, (k,), generator=g).tolist()  # only for the shot groups
    groups = shot_groups(train_counts)
    cal_all, test_all = E.split_indices(labels, a.n_splits, 0.5, seed=a.seed)
    lam, k_reg = 0.01, 5
    floor = read_floor(logits)
    floor.update(n=n, k=k)
    print("#", json.dumps({"floor": floor}), flush=True)
    rows = []
    small = n * k <= 1_000_000
    for workload, r_ in (("1 split", 1), (f"{a.n_splits} splits", a.n_splits)):
        cal, test = cal_all[:r_], test_all[:r_]
        reps = a.repeats if (r_ == 1 or small) else 1
        for score in a.scores:
            for predictor in a.predictors:
                row = {"n": n, "k": k, "workload": workload, "score": score, "predictor": predictor}
                runs = {"ours": lambda: run_ours(logits, labels, cal, test, score, predictor, a.alpha, train_counts,
                                                 lam, k_reg, a.device),
                        "torchcp": lambda: run_torchcp(logits, labels, cal, test, score, predictor, a.alpha, groups,
                                                       lam, k_reg),
                        "mapie": lambda: run_mapie(logits, labels, cal, test, score, a.alpha, groups)}
                if "torchcp" in a.skip:
                    del runs["torchcp"]
                if "mapie" in a.skip or predictor != "standard" or score == "raps":
                    del runs["mapie"]  # MAPIE's split classifier has no class-wise mode; its RAPS tunes itself
                timed = _timed_interleaved(runs, reps)
                for lib, ((wall, cpu), res) in timed.items():
                    row[lib], row[lib + "_cpu"] = wall, cpu
                    if lib == "ours":
                        row["coverage"] = float(res[1].metrics["coverage"].mean())
                        row["size"] = float(res[1].metrics["size"].mean())
                for lib, (_, res) in timed.items():
                    if lib != "ours":
                        row[lib + "_dcov"] = abs(np.mean([x["coverage"] for x in res]) - row["coverage"])
                        row[lib + "_dsize"] = abs(np.mean([x["size"] for x in res]) - row["size"])
                row["floor"] = floor["floor_s"]
                row["ours_over_floor"] = row["ours"] / floor["floor_s"]
                rows.append(row)
                print("#", json.dumps(row), flush=True)

    # What the stage runs per method: every score, both predictors, alphas 0.1 and 0.05, all splits, one call.
    def full_grid():
        E.evaluate_pool(logits, labels, train_counts, alphas=(a.alpha, a.alpha / 2), splits=(cal_all, test_all),
                        device=a.device)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    grid, _ = _timed(full_grid, 1)
    print(f"# {n} x {k}: ours, the stage's full grid for one method (3 scores x 2 predictors x 2 alphas x "
          f"{a.n_splits} splits, randomised APS/RAPS): {grid[0]:.3f} s wall ({grid[1]:.3f} s CPU)", flush=True)
    return rows, floor, grid


def _fmt_s(x: float) -> str:
    return f"{x:.3f}" if x >= 0.01 else f"{x * 1e3:.2f} ms"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="pool size (calibration + test)")
    ap.add_argument("--k", type=int, default=1_000, help="number of classes")
    ap.add_argument("--grid", action="store_true", help="every size of --sizes (the grid) in one run")
    ap.add_argument("--sizes", nargs="+", default=list(GRID), help="NxK sizes for --grid (default: the grid)")
    ap.add_argument("--n-splits", type=int, default=20, help="R for the protocol workload")
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--scores", nargs="+", default=["lac", "aps", "raps"])
    ap.add_argument("--predictors", nargs="+", default=["standard", "classwise"])
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs for the 1-split workload")
    ap.add_argument("--skip", nargs="*", default=[], choices=["torchcp", "mapie"])
    ap.add_argument("--device", default="cpu", help="device for ours (cuda adds the GPU time)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if a.threads:
        torch.set_num_threads(a.threads)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in a.sizes] if a.grid else [(a.n, a.k)]
    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "threads": torch.get_num_threads(),
           "n": a.n if not a.grid else "grid", "k": a.k if not a.grid else "grid",
           "sizes": [f"{n}x{k}" for n, k in sizes],
           "alpha": a.alpha, "n_splits": a.n_splits, "device": a.device, "loadavg_start": os.getloadavg()}
    for lib in ("torchcp", "mapie"):
        try:
            env[lib] = __import__(lib).__version__
        except Exception as e:  # noqa: BLE001 - report and skip
            print(f"# {lib} not importable ({type(e).__name__}: {e}); skipped")
            a.skip.append(lib)
    print("#", json.dumps(env))
    t_start = time.perf_counter()
    rows, floors, grids = [], {}, {}
    for n, k in sizes:
        r, floors[f"{n}x{k}"], grids[f"{n}x{k}"] = run_size(a, n, k, env)
        rows += r
    env["wall_s"] = time.perf_counter() - t_start
    env["loadavg_end"] = os.getloadavg()  # other jobs on a shared machine inflate every column alike
    print()
    print("Wall seconds (CPU seconds, all threads, in brackets; ms where marked); ratio = theirs / ours on wall "
          "time; floor = time to read the logits once (best of 20 full reductions).")
    print()
    print("| n x K | workload | score | predictor | ours | TorchCP | MAPIE | TorchCP / ours | MAPIE / ours "
          "| ours / floor | abs diff of mean coverage, size vs ours |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        def cell(lib):
            return f"{_fmt_s(r[lib])} ({_fmt_s(r[lib + '_cpu'])})" if lib in r else "n/a"

        def ratio(lib):
            return f"{r[lib] / r['ours']:.1f}x" if lib in r else "n/a"

        diffs = ", ".join(f"{lib} {r[lib + '_dcov']:.1e}, {r[lib + '_dsize']:.1e}" for lib in ("torchcp", "mapie")
                          if lib + "_dcov" in r)
        cells = [f"{r['n']} x {r['k']}", r["workload"], r["score"], r["predictor"], cell("ours"), cell("torchcp"),
                 cell("mapie"), ratio("torchcp"), ratio("mapie"), f"{r['ours_over_floor']:.0f}x", diffs]
        print("| " + " | ".join(cells) + " |")
    print()
    print("| n x K | floor: read the logits once | bandwidth | ours, full stage grid (3 scores x 2 predictors x "
          f"2 alphas x {a.n_splits} splits) |")
    print("|---|---:|---:|---:|")
    for key, f in floors.items():
        print(f"| {f['n']} x {f['k']} | {_fmt_s(f['floor_s'])} ({f['bytes'] / 2**20:.1f} MiB) | "
              f"{f['gb_per_s']:.1f} GB/s | {_fmt_s(grids[key][0])} |")
    print("#", json.dumps({"loadavg_start": env["loadavg_start"], "loadavg_end": env["loadavg_end"],
                           "wall_s": env["wall_s"]}))
    if a.json:
        key = f"{sizes[-1][0]}x{sizes[-1][1]}"
        with open(a.json, "w") as f:
            json.dump({"env": env, "rows": rows, "floors": floors,
                       "ours_full_grid_s": grids[key][0], "ours_full_grid_cpu_s": grids[key][1],
                       "ours_full_grid": {k_: {"wall_s": v[0], "cpu_s": v[1]} for k_, v in grids.items()}}, f,
                      indent=2)


if __name__ == "__main__":
    main()
