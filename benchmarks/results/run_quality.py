"""Issue 7, first slice: run the real pipelines, keep what they measured, and write docs/RESULTS.md's tables.

Sub-commands (``collect`` copies a finished run folder without running it):

    # run named runs one after the other (outputs under --root, never in the repo); each run's command, wall
    # time and printed summary are kept in benchmarks/results/measured/<name>/
    .venv/bin/python benchmarks/results/run_quality.py run mnist-if100-s0 newsgroups-if10-s0 --root /tmp/results-runs

    # rebuild the generated part of docs/RESULTS.md from the measured files (no training)
    .venv/bin/python benchmarks/results/run_quality.py report

    # per-benchmark plots (per-class set size, multipliers) from the run folders into docs/figures/
    .venv/bin/python benchmarks/results/run_quality.py figures --root /tmp/results-runs

``measured/<name>/`` holds: ``meta.json`` (command, start/end UTC, wall seconds, return code),
``summary.csv`` (a copy of the run's ``eval/summary.csv``), ``lambda.csv`` (the last-epoch multipliers of
``train/cact*/history.parquet`` per class), ``val_metrics.csv`` (last-epoch validation metrics of every method
from ``train/<method>/metrics.parquet``) and ``stdout_tail.txt`` (the summary the pipeline printed). The report
reads only these files, so docs/RESULTS.md is regenerated from measured outputs, not typed by hand.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MEASURED = Path(__file__).resolve().parent / "measured"
RESULTS_MD = ROOT / "docs" / "RESULTS.md"
PY = str(ROOT / ".venv" / "bin" / "python")
DATA = "/work/shared/data"

ALL5 = "ce,conftr,conftr_class,cact_uniform,cact"

# name -> (title, argv after the python binary, output folder name under --root)
RUNS: dict[str, dict] = {}


def _add(name, title, script, args, out):
    RUNS[name] = {"title": title, "argv": [script, *args], "out": out}


for seed in (0, 1, 2):
    _add(f"mnist-if100-s{seed}", f"MNIST-LT IF=100, seed {seed}", "pipelines/mnist_lt.py",
         ["--data-root", f"{DATA}/mnist", "--imbalance-factor", "100", "--seed", str(seed)],
         f"mnist-lt-if100-seed{seed}")
for seed in (0, 1, 2):  # half the default budget: the 2-core machine was shared
    _add(f"mnist-if10-s{seed}", f"MNIST-LT IF=10, seed {seed}", "pipelines/mnist_lt.py",
         ["--data-root", f"{DATA}/mnist", "--imbalance-factor", "10", "--seed", str(seed), "--epochs", "5",
          "--finetune-epochs", "3"], f"mnist-lt-if10-seed{seed}")
for seed in (0, 1, 2):
    _add(f"newsgroups-if10-s{seed}", f"20 Newsgroups-LT IF=10, seed {seed}", "pipelines/newsgroups_lt.py",
         ["--data-root", f"{DATA}/20news-bydate.tar.gz", "--imbalance-factor", "10", "--seed", str(seed)],
         f"newsgroups-lt-if10-seed{seed}")
# Each method tuned with the sweep stage (same trial budget, its own knobs, validation split only), then trained
# and evaluated like the untuned run of the same seed.
_add("newsgroups-if10-s0-sweep4", "20 Newsgroups-LT IF=10, seed 0, every method tuned (4 sweep trials each)",
     "pipelines/newsgroups_lt.py", ["--data-root", f"{DATA}/20news-bydate.tar.gz", "--imbalance-factor", "10",
                                    "--seed", "0", "--sweep", "4"], "newsgroups-lt-if10-seed0-sweep4")
# The same protocol on seed 1 with twice the trials, the corrected selection (full-length trials only, coverage
# noise tolerated) and CaCT's relative target in the search space (--eta-relative: the CaCT spaces search
# eta_relative in {0.7, 0.8, 0.9, 1.0} instead of the absolute eta; the other methods' spaces unchanged).
_add("newsgroups-if10-s1-sweep8-etarel", "20 Newsgroups-LT IF=10, seed 1, every method tuned (8 sweep trials each, "
     "CaCT's space with eta_relative)", "pipelines/newsgroups_lt.py",
     ["--data-root", f"{DATA}/20news-bydate.tar.gz", "--imbalance-factor", "10", "--seed", "1", "--sweep", "8",
      "--eta-relative", "0.9"], "newsgroups-lt-if10-seed1-sweep8-etarel")
# CIFAR-10-LT without a GPU: the 4-layer SmallCNN instead of ResNet-32 and 15 + 5 epochs instead of 200 + 20
# (the LDAM protocol of the pipeline's defaults is a GPU job). Not comparable with published CIFAR-10-LT figures.
for imb in (100, 10):
    _add(f"cifar10-if{imb}-s0", f"CIFAR-10-LT IF={imb}, seed 0 (CPU budget: SmallCNN, 15 + 5 epochs)",
         "pipelines/cifar10_lt.py", ["--data-root", f"{DATA}/cifar10-jpeg", "--imbalance-factor", str(imb), "--seed",
                                     "0", "--model", "small_cnn", "--epochs", "15", "--finetune-epochs", "5"],
         f"cifar10-lt-if{imb}-seed0-smallcnn")
# Imagenette-LT without a GPU: images downscaled to 32x32 (from 128x128), SmallCNN, 15 + 5 epochs, batch 128.
for seed in (0, 1, 2):
    _add(f"imagenette-if10-s{seed}", f"Imagenette-LT IF=10, seed {seed} (CPU budget: 32x32 images, SmallCNN, 15 + 5 "
         "epochs)", "pipelines/imagenet_lt.py",
         ["--data-root", f"{DATA}/imagenette2-128", "--imbalance-factor", "10", "--seed", str(seed), "--model",
          "small_cnn", "--image-size", "32", "--batch-size", "128", "--epochs", "15", "--finetune-epochs", "5"],
         f"imagenette-lt-if10-seed{seed}-smallcnn32")
# The sweep protocol on an image benchmark (8 trials were too many for the CPU budget): 4 trials per method,
# CaCT's space with eta_relative.
_add("imagenette-if10-s0-sweep4-etarel", "Imagenette-LT IF=10, seed 0 (CPU budget), every method tuned (4 sweep "
     "trials each, CaCT's space with eta_relative)", "pipelines/imagenet_lt.py",
     ["--data-root", f"{DATA}/imagenette2-128", "--imbalance-factor", "10", "--seed", "0", "--model", "small_cnn",
      "--image-size", "32", "--batch-size", "128", "--epochs", "15", "--finetune-epochs", "5", "--sweep", "4",
      "--eta-relative", "0.9"], "imagenette-lt-if10-seed0-smallcnn32-sweep4-etarel")
# DeepMind's ConfTr MNIST linear setting: see benchmarks/results/conftr_mnist_linear.py (two invocations)
for part in ("ce", "conftr"):
    _add(f"conftr-linear-{part}", f"ConfTr MNIST linear reproduction, {part}, seed 0",
         "benchmarks/results/conftr_mnist_linear.py", ["--part", part], f"conftr-mnist-linear-{part}")
    for seed in (1, 2):
        _add(f"conftr-linear-{part}-s{seed}", f"ConfTr MNIST linear reproduction, {part}, seed {seed}",
             "benchmarks/results/conftr_mnist_linear.py", ["--part", part, "--seed", str(seed)],
             f"conftr-mnist-linear-{part}-seed{seed}")

# Every run: two CPU-only workers would compete with the others' tests on a 2-core machine -> default 1 worker.
COMMON = ["--address", "local"]


def run_one(name: str, root: Path, extra: list[str]) -> int:
    spec = RUNS[name]
    out = root / spec["out"]
    argv = [PY, *spec["argv"], "--out", str(out), *COMMON, *extra]
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    start = dt.datetime.now(dt.timezone.utc)
    t0 = time.time()
    print(f"[{start:%H:%M:%S}] {name}: {' '.join(argv)}", flush=True)
    with log.open("w") as f:
        rc = subprocess.call(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    end = dt.datetime.now(dt.timezone.utc)
    print(f"[{end:%H:%M:%S}] {name}: rc={rc} wall={wall:.0f}s", flush=True)
    collect(name, out, log, {"command": " ".join(argv[1:]).replace(str(ROOT) + "/", ""), "start_utc": start.isoformat(
        timespec="seconds"), "end_utc": end.isoformat(timespec="seconds"), "wall_s": round(wall, 1), "rc": rc,
        "out": str(out)})
    return rc


def collect(name: str, out: Path, log: Path | None, meta: dict) -> None:
    """Copy what a finished run measured into measured/<name>/."""
    import polars as pl

    dest = MEASURED / name
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if log is not None and log.is_file():
        text = log.read_text(errors="replace").splitlines()
        keep = [ln for ln in text if ln.startswith(("==", "splits:", "trained", "alpha =", "report:", "summary:",
                                                      "│", "┌", "└", "╞", "├", "Traceback", "  File"))
                or "Error" in ln]
        (dest / "stdout_tail.txt").write_text("\n".join(keep[-400:]) + "\n")
    summary = out / "eval" / "summary.csv"
    if summary.is_file():
        shutil.copy(summary, dest / "summary.csv")
    lam = []
    for hist in sorted((out / "train").glob("cact*/history.parquet")):
        h = pl.read_parquet(hist)
        if h.height:
            last = h.filter(pl.col("epoch") == h["epoch"].max())
            lam.append(last.with_columns(pl.lit(int(h["epoch"].max())).alias("last_epoch"),
                                         pl.col("lambda").cast(pl.Float64)))
            lam.append(h.group_by("method", "class").agg(pl.col("lambda").max().alias("lambda_max_over_epochs"))
                       .with_columns(pl.lit(-1).alias("epoch")).select("method", "class", "lambda_max_over_epochs",
                                                                       "epoch"))
    if lam:
        last = pl.concat([x for x in lam if "lambda" in x.columns], how="diagonal")
        mx = pl.concat([x for x in lam if "lambda_max_over_epochs" in x.columns], how="diagonal").drop("epoch")
        last.join(mx, on=["method", "class"], how="left").write_csv(dest / "lambda.csv")
    vals = []
    for met in sorted((out / "train").glob("*/metrics.parquet")):
        m = pl.read_parquet(met)
        if m.height and "epoch" in m.columns:
            vals.append(m.filter(pl.col("epoch") == m["epoch"].max()).with_columns(
                pl.lit(met.parent.name).alias("trained_method")))
    if vals:
        pl.concat(vals, how="diagonal_relaxed").write_csv(dest / "val_metrics.csv")
    collect_sweeps(out, dest)


def collect_sweeps(out: Path, dest: Path) -> None:
    """A ``--sweep`` run's trials (``sweep/<method>/results.parquet``: config, epochs run, last validation
    metrics) and the config each method was then trained with (``best.json``), into ``sweep_trials.csv``."""
    import polars as pl

    frames = []
    for res in sorted((out / "sweep").glob("*/results.parquet")):
        df = pl.read_parquet(res)
        best = json.loads((res.parent / "best.json").read_text())["best_config"]
        cfg_cols = [c for c in df.columns if c.startswith("config.")]
        frames.append(df.with_columns(
            pl.struct(cfg_cols).map_elements(lambda r: json.dumps({k.removeprefix("config."): v for k, v in r.items()},
                                                                  sort_keys=True), return_dtype=pl.String).alias("config"),
            pl.struct(cfg_cols).map_elements(lambda r, b=best: all(r[f"config.{k}"] == v for k, v in b.items()),
                                             return_dtype=pl.Boolean).alias("chosen")).drop(cfg_cols))
    if frames:
        pl.concat(frames, how="diagonal_relaxed").write_csv(dest / "sweep_trials.csv")


# ----------------------------------------------------------------------------------------------------------
# Figures (from the run folders, which stay outside the repo; the PNGs go to docs/figures/)

FIGURES = ROOT / "docs" / "figures"
# figure name -> (base run, {refit name: label}): the base run's methods plus each refit as one more line
FIGURE_RUNS = {
    "mnist-lt-if100": ("mnist-if100-s0", {"mnist-if100-s0-etarel0.9-rho10": "cact eta_rel 0.9, rho_init 10"}),
    "mnist-lt-if10": ("mnist-if10-s0", {"mnist-if10-s0-etarel0.9-rho10": "cact eta_rel 0.9, rho_init 10"}),
    "newsgroups-lt-if10": ("newsgroups-if10-s0", {"newsgroups-if10-s0-etarel0.9": "cact eta_rel 0.9"}),
    "cifar10-lt-if100-cpu": ("cifar10-if100-s0", {"cifar10-if100-s0-etarel0.9": "cact eta_rel 0.9"}),
    "cifar10-lt-if10-cpu": ("cifar10-if10-s0", {"cifar10-if10-s0-etarel0.9": "cact eta_rel 0.9"}),
    "imagenette-lt-if10-cpu": ("imagenette-if10-s0", {"imagenette-if10-s0-etarel0.9": "cact eta_rel 0.9"}),
}
for _base, _refits in FIGURE_RUNS.values():  # the CE fine-tune control (point 11 of docs/RESULTS.md), where run
    _refits[f"{_base}-ceft"] = "ce fine-tuned (control)"


def figures(root: Path, score: str = "lac", alpha: float = 0.1) -> list[Path]:
    """Per benchmark (seed 0): per-class set size vs training count (standard and class-wise CP) and the
    multipliers over epochs, every method of the run plus its eta-relative refit, from the run folders under
    ``root`` (eval/per_class.parquet, train/cact*/history.parquet), with stages.report's plot functions."""
    import polars as pl

    from stages import report

    FIGURES.mkdir(parents=True, exist_ok=True)
    written = []
    for fig_name, (base, refit_labels) in FIGURE_RUNS.items():
        folders = {None: (root / RUNS[base]["out"], None)}  # refit name -> (run folder, its one method)
        for name in refit_labels:
            meta = MEASURED / name / "meta.json"
            if meta.is_file():
                m = json.loads(meta.read_text())
                folders[name] = (root / Path(m["summary"]).parents[1].name, m["method"])
        if not (folders[None][0] / "eval" / "per_class.parquet").is_file():
            continue
        per_class, histories = [], {}
        for name, (folder, method) in folders.items():
            pc = folder / "eval" / "per_class.parquet"
            if not pc.is_file():
                continue
            df = pl.read_parquet(pc)
            if name is not None:  # a refit: its one method becomes a line of its own
                df = df.filter(pl.col("method") == method).with_columns(pl.lit(refit_labels[name]).alias("method"))
                hist = folder / "train" / method / "history.parquet"
                if hist.is_file():
                    histories[refit_labels[name]] = pl.read_parquet(hist)
            else:
                histories |= {h.parent.name: pl.read_parquet(h) for h in sorted((folder / "train").glob("cact*/history.parquet"))}
            per_class.append(df)
        per_class = pl.concat(per_class, how="diagonal_relaxed")
        colors = report._colors(report._method_order(per_class["method"].to_list()))
        written.append(report.plot_class_size(per_class, score, alpha, colors, FIGURES / f"{fig_name}-class-size.png"))
        lam = report.plot_lambda(histories, report._train_counts(per_class), FIGURES / f"{fig_name}-lambda.png")
        if lam:
            written.append(lam)
    return written


# ----------------------------------------------------------------------------------------------------------
# Report

ORDER = ["ce", "conftr", "conftr_class", "cact_uniform", "cact"]


def _pm(m, s, f="{:.3f}"):
    return f"{f.format(m)} ± {f.format(s)}"


def table(summary, score: str, predictor: str, alpha: float) -> list[str]:
    import polars as pl

    t = summary.filter((pl.col("score") == score) & (pl.col("predictor") == predictor)
                       & ((pl.col("alpha") - alpha).abs() < 1e-9))
    if not t.height:
        return []
    rows = {r["method"]: r for r in t.iter_rows(named=True)}
    lines = ["| method | accuracy | coverage | size | CovGap (pts) | many / med / few size |",
             "|---|---|---|---|---|---|"]
    best_size = min(r["size_mean"] for r in rows.values())
    best_gap = min(r["covgap_mean"] for r in rows.values())
    for m in [m for m in ORDER if m in rows] + [m for m in rows if m not in ORDER]:
        r = rows[m]
        size = _pm(r["size_mean"], r["size_std"], "{:.3f}")
        gap = _pm(r["covgap_mean"], r["covgap_std"], "{:.2f}")
        if abs(r["size_mean"] - best_size) < 1e-12:
            size = f"**{size}**"
        if abs(r["covgap_mean"] - best_gap) < 1e-12:
            gap = f"**{gap}**"
        lines.append(f"| {m} | {r['accuracy']:.3f} | {_pm(r['coverage_mean'], r['coverage_std'])} | {size} | {gap} | "
                     f"{r['many_size_mean']:.2f} / {r['medium_size_mean']:.2f} / {r['few_size_mean']:.2f} |")
    return lines


# Benchmarks run on several training seeds (run names <prefix>-s0, -s1, -s2): the "over training seeds" tables.
SEED_BENCHMARKS = (("mnist-if100", "MNIST-LT IF=100"), ("mnist-if10", "MNIST-LT IF=10"),
                   ("newsgroups-if10", "20 Newsgroups-LT IF=10"), ("imagenette-if10", "Imagenette-LT IF=10 (CPU budget)"))


def seed_groups() -> list[tuple[str, list[str]]]:
    """(title, measured seed runs) of every SEED_BENCHMARKS entry measured on at least two seeds."""
    groups = []
    for prefix, title in SEED_BENCHMARKS:
        seeds = [f"{prefix}-s{i}" for i in range(3) if (MEASURED / f"{prefix}-s{i}" / "summary.csv").is_file()]
        if len(seeds) >= 2:
            groups.append((title, seeds))
    return groups


def seed_table(names: list[str], score: str, predictor: str, alpha: float) -> list[str]:
    """Mean ± std over training seeds of the per-seed means (accuracy, coverage, size, CovGap, few-shot size)."""
    import polars as pl

    frames = []
    for n in names:
        p = MEASURED / n / "summary.csv"
        if p.is_file():
            frames.append(pl.read_csv(p).with_columns(pl.lit(n).alias("run")))
    if len(frames) < 2:
        return []
    s = pl.concat(frames).filter((pl.col("score") == score) & (pl.col("predictor") == predictor)
                                 & ((pl.col("alpha") - alpha).abs() < 1e-9))
    cols = ("accuracy", "coverage_mean", "size_mean", "covgap_mean", "many_size_mean", "medium_size_mean",
            "few_size_mean")
    g = s.group_by("method").agg(pl.len().alias("n"), *[pl.col(c).mean().alias(c + "_m") for c in cols],
                                 *[pl.col(c).std().alias(c + "_s") for c in cols])
    rows = {r["method"]: r for r in g.iter_rows(named=True)}
    lines = ["| method | seeds | accuracy | coverage | size | CovGap (pts) | many / med / few size |",
             "|---|---|---|---|---|---|---|"]
    for m in [m for m in ORDER if m in rows]:
        r = rows[m]
        lines.append(f"| {m} | {r['n']} | {_pm(r['accuracy_m'], r['accuracy_s'])} | "
                     f"{_pm(r['coverage_mean_m'], r['coverage_mean_s'])} | {_pm(r['size_mean_m'], r['size_mean_s'])} | "
                     f"{_pm(r['covgap_mean_m'], r['covgap_mean_s'], '{:.2f}')} | "
                     f"{r['many_size_mean_m']:.2f} / {r['medium_size_mean_m']:.2f} / {r['few_size_mean_m']:.2f} |")
    return lines


def lambda_lines(name: str) -> list[str]:
    import polars as pl

    p = MEASURED / name / "lambda.csv"
    if not p.is_file():
        return []
    lam = pl.read_csv(p).sort("method", "class")
    out = []
    for method in lam["method"].unique(maintain_order=True):
        sub = lam.filter(pl.col("method") == method)
        vals = ", ".join(f"{v:.3g}" for v in sub["lambda"])
        mx = ", ".join(f"{v:.3g}" for v in sub["lambda_max_over_epochs"])
        cons = ", ".join(f"{v:+.2f}" for v in sub["constraint"]) if "constraint" in sub.columns else "–"
        out.append(f"- `{method}` last epoch ({int(sub['last_epoch'][0])}): λ_k = [{vals}]; max over epochs = [{mx}]; "
                   f"constraint on the dual-step data (D_val, or the training set when dual_source = train) E[S|Y=k] − η = [{cons}]")
    return out


def val_lines(name: str) -> list[str]:
    """Last-epoch validation metrics of training. Older records' ``val_soft_size`` is the mean of h = S(x) - eta
    (fixed since: ``val_constraint`` is that mean and ``val_soft_size`` the mean of S), so eta is added back there."""
    import polars as pl

    from cact_ops.training import TrainConfig

    p = MEASURED / name / "val_metrics.csv"
    if not p.is_file():
        return []
    v = pl.read_csv(p)
    if "val_soft_size" not in v.columns:
        return []
    eta = TrainConfig.eta
    has_eta = "eta" in v.columns
    lines = ["| trained method | val accuracy | val hard coverage | val hard size | val smooth size (training T) | smooth − hard size |"
             + (" η in use |" if has_eta else ""), "|---|---|---|---|---|---|" + ("---|" if has_eta else "")]
    order = {m: i for i, m in enumerate(ORDER)}
    for r in sorted(v.iter_rows(named=True), key=lambda r: order.get(r["trained_method"], 99)):
        # records made before val_constraint existed hold the mean of S - eta under the name val_soft_size
        soft = r["val_soft_size"] if "val_constraint" in r else r["val_soft_size"] + eta
        lines.append(f"| {r['trained_method']} | {r['val_accuracy']:.3f} | {r['val_coverage']:.3f} | "
                     f"{r['val_size']:.2f} | {soft:.2f} | {soft - r['val_size']:+.2f} |"
                     + ((f" {r['eta']:.3f} |" if r["eta"] is not None and r["trained_method"].startswith("cact") else " – |")
                        if has_eta else ""))
    return lines


def report(names: list[str] | None = None) -> str:
    import polars as pl

    names = names or [n for n in RUNS if (MEASURED / n / "summary.csv").is_file() and not n.startswith("conftr-linear")]
    out = ["<!-- BEGIN GENERATED by benchmarks/results/run_quality.py report: do not edit by hand -->", ""]
    for name in names:
        spec = RUNS[name]
        meta = json.loads((MEASURED / name / "meta.json").read_text())
        summary = pl.read_csv(MEASURED / name / "summary.csv")
        out += [f"### {spec['title']}", "",
                f"`{meta['command']}` — wall {meta['wall_s'] / 60:.1f} min, finished {meta['end_utc']}, rc {meta['rc']}; "
                f"R = {int(summary['n_splits'][0])} calibration/test splits of the pool; mean ± std over the splits.",
                ""]
        for alpha in sorted(summary["alpha"].unique().to_list(), reverse=True):
            for score in ("lac", "aps"):
                for pred in ("standard", "classwise"):
                    t = table(summary, score, pred, alpha)
                    if t:
                        out += [f"**α = {alpha:g}, {score.upper()}, {pred}**", "", *t, ""]
        lam = lambda_lines(name)
        if lam:
            out += ["Multipliers (from `train/cact*/history.parquet`):", "", *lam, ""]
        val = val_lines(name)
        if val:
            out += ["Last-epoch validation metrics of training (`train/<method>/metrics.parquet`):", "", *val, ""]
    for title, seeds in seed_groups():
        out += [f"### {title} over training seeds ({', '.join(seeds)})", "",
                "Mean ± std over training seeds (each seed: its own splits, backbone and fine-tunes) of each seed's "
                "mean over the R = 20 calibration/test splits.", ""]
        for alpha in (0.1, 0.05):
            for score in ("lac", "aps"):
                for pred in ("standard", "classwise"):
                    t = seed_table(seeds, score, pred, alpha)
                    if t:
                        out += [f"**α = {alpha:g}, {score.upper()}, {pred}**", "", *t, ""]
    out += sweep_section()
    out += commands_section()
    out += compact_section()
    out += compact_over_seeds()
    out += conftr_linear_section()
    out += open_question_sections()
    out.append("<!-- END GENERATED -->")
    return "\n".join(out)


DEEPMIND = {"ce": (0.923990, 0.990830, 2.238840), "conftr": (0.903780, 0.990230, 2.147300)}


def conftr_linear_section() -> list[str]:
    """DeepMind's ConfTr MNIST linear numbers next to ours (alpha 0.01), per seed and mean ± std over seeds."""
    import polars as pl

    rows = []
    for part in ("ce", "conftr"):
        for name in (f"conftr-linear-{part}", f"conftr-linear-{part}-s1", f"conftr-linear-{part}-s2"):
            f = MEASURED / name / "summary.csv"
            if f.is_file():
                meta = json.loads((MEASURED / name / "meta.json").read_text())
                seed = 0 if not name[-3:-1] == "-s" else int(name[-1])
                rows.append(pl.read_csv(f).with_columns(pl.lit(part).alias("part"), pl.lit(seed).alias("seed"),
                                                        pl.lit(meta.get("wall_s", float("nan"))).alias("wall_s")))
    if not rows:
        return []
    s = pl.concat(rows, how="diagonal_relaxed").filter((pl.col("alpha") - 0.01).abs() < 1e-9)
    out = ["### ConfTr MNIST linear reproduction (balanced MNIST, α = 0.01)", "",
           "DeepMind's README (one training trial, 10 random 5000/5000 calibration/test splits of the test set, THR "
           "on softmax = our LAC, standard predictor) next to ours (R = 10 stratified 4000/4000 splits of the 8000-image "
           "pool). Per training seed: mean ± std over the R splits.", "",
           "| model | source | seed | accuracy | coverage | LAC size | APS size | LAC class-wise size | wall (s) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for part in ("ce", "conftr"):
        a, c, z = DEEPMIND[part]
        out.append(f"| {part} | DeepMind README | 0 | {a:.4f} | {c:.4f} | {z:.3f} | – | – | – |")
        sub = s.filter(pl.col("part") == part)
        for seed in sorted(sub["seed"].unique().to_list()):
            r = sub.filter(pl.col("seed") == seed)
            lac = r.filter((pl.col("score") == "lac") & (pl.col("predictor") == "standard")).row(0, named=True)
            aps = r.filter((pl.col("score") == "aps") & (pl.col("predictor") == "standard")).row(0, named=True)
            lcw = r.filter((pl.col("score") == "lac") & (pl.col("predictor") == "classwise")).row(0, named=True)
            out.append(f"| {part} | ours | {seed} | {lac['accuracy']:.4f} | {_pm(lac['coverage_mean'], lac['coverage_std'], '{:.4f}')} | "
                       f"{_pm(lac['size_mean'], lac['size_std'])} | {_pm(aps['size_mean'], aps['size_std'])} | "
                       f"{_pm(lcw['size_mean'], lcw['size_std'])} | {lac['wall_s']:.0f} |")
        lacs = sub.filter((pl.col("score") == "lac") & (pl.col("predictor") == "standard"))
        if lacs.height >= 2:
            out.append(f"| {part} | ours, mean ± std over {lacs.height} seeds | – | {_pm(lacs['accuracy'].mean(), lacs['accuracy'].std(), '{:.4f}')} | "
                       f"{_pm(lacs['coverage_mean'].mean(), lacs['coverage_mean'].std(), '{:.4f}')} | "
                       f"{_pm(lacs['size_mean'].mean(), lacs['size_mean'].std())} | – | – | – |")
    return out + [""]


def open_question_sections() -> list[str]:
    import polars as pl

    out = []
    temps = [n for n in sorted(p.name for p in MEASURED.iterdir()) if (MEASURED / n / "temperature.md").is_file()]
    if temps:
        out += ["### Temperature T vs the smooth/hard gap on validation", "",
                "From each run's validation logits (`open_questions.py temperature`): hard threshold τ from a stratified "
                "20% of D_val at α = 0.1 on the log-probability score; hard and smooth (sigmoid((E − τ)/T)) coverage and "
                "size on the other 80%. Training used T = 1.", ""]
        for n in temps:
            out += [f"**{RUNS[n]['title'] if n in RUNS else n}**", "", (MEASURED / n / "temperature.md").read_text().strip(), ""]
    for base, alt, method, overrides in refits():
        a = pl.read_csv(MEASURED / base / "summary.csv").filter(pl.col("method") == method).with_columns(
            pl.lit("run's own (base)").alias("variant"))
        label = ", ".join(f"{k} = {v}" for k, v in overrides.items())
        b = pl.read_csv(MEASURED / alt / "summary.csv").with_columns(pl.lit(label).alias("variant"))
        both = pl.concat([a, b], how="diagonal_relaxed")
        out += [f"### {method} refit with {label} ({RUNS[base]['title']})", "",
                f"`{method}` fine-tuned again from the same CE backbone with the run's own config except {label} "
                f"(`open_questions.py refit`, measured/{alt}/); the base row is the run's own `{method}`.", "",
                "| variant | α | score | predictor | accuracy | coverage | size | CovGap (pts) | many / med / few size |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in both.filter(pl.col("score") != "raps").sort("alpha", "score", "predictor", "variant",
                                                             descending=[True, False, True, True]).iter_rows(named=True):
            out.append(f"| {r['variant']} | {r['alpha']:g} | {r['score']} | {r['predictor']} | {r['accuracy']:.3f} | "
                       f"{_pm(r['coverage_mean'], r['coverage_std'])} | {_pm(r['size_mean'], r['size_std'])} | "
                       f"{_pm(r['covgap_mean'], r['covgap_std'], '{:.2f}')} | {r['many_size_mean']:.2f} / "
                       f"{r['medium_size_mean']:.2f} / {r['few_size_mean']:.2f} |")
        if (MEASURED / base / "lambda.csv").is_file() and method.startswith("cact"):
            out += ["", "Base run:", *[ln for ln in lambda_lines(base) if ln.startswith(f"- `{method}`")]]
        if (MEASURED / alt / "lambda.csv").is_file():
            out += ["", "Refit:", *lambda_lines(alt)]
        val = val_lines(alt)
        if val:
            out += ["", *val]
        out.append("")
    return out


def sweep_section() -> list[str]:
    """Every trial of every sweep run: what each method searched, how far each trial ran, what it measured on
    D_val, and which config the method was then trained with."""
    import polars as pl

    out = []
    for name in [n for n in RUNS if (MEASURED / n / "sweep_trials.csv").is_file()]:
        t = pl.read_csv(MEASURED / name / "sweep_trials.csv")
        out += [f"**Sweep trials: {RUNS[name]['title']}**", "",
                "Last reported validation metrics of each trial (D_val only; ASHA stops trials early, `epochs` says "
                "how far each ran; the objective as recorded by the code of the day: runs before 2026-11-27 16:20 UTC "
                "lack the noise tolerance and chose among all trials, not only full-length ones); ✓: the config "
                "the method was then trained with.", "",
                "| method | epochs | val size | val coverage | val objective | val accuracy | config | chosen |",
                "|---|---|---|---|---|---|---|---|"]
        order = {m: i for i, m in enumerate(ORDER)}
        for r in sorted(t.iter_rows(named=True), key=lambda r: (order.get(r["method"], 99), r["val_objective"])):
            cfg = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in json.loads(r["config"]).items())
            out.append(f"| {r['method']} | {r['epochs_run']} | {r['val_size']:.3f} | {r['val_coverage']:.4f} | "
                       f"{r['val_objective']:.3f} | {r['val_accuracy']:.3f} | {cfg} | {'✓' if r['chosen'] else ''} |")
        out.append("")
    return out


def commands_section() -> list[str]:
    """The exact command, end time and wall time of every measured run (from its meta.json)."""
    out = ["### Every measured run: command, end time, wall time", "",
           "Outputs went to `/tmp/results-runs/` (outside the repo); `measured/<name>/` keeps what they measured. "
           "Wall times are on the shared 2-core machine, often with two runs at once.", "",
           "| measured/ | command | finished (UTC) | wall |", "|---|---|---|---|"]
    for d in sorted(MEASURED.iterdir()):
        f = d / "meta.json"
        if not f.is_file() or not (d / "summary.csv").is_file():
            continue
        meta = json.loads(f.read_text())
        end = meta.get("end_utc", "–")
        out.append(f"| {d.name} | `{meta.get('command', '?')}` | {end} | {meta.get('wall_s', float('nan')) / 60:.1f} min |")
    return out + [""]


CELLS = [("lac", "standard"), ("lac", "classwise"), ("aps", "standard"), ("aps", "classwise")]


def _refits_by_base() -> dict[str, list[tuple[str, str, dict]]]:
    by_base: dict[str, list] = {}
    for base, alt, method, overrides in refits():
        by_base.setdefault(base, []).append((alt, method, overrides))
    return by_base


def _run_rows(run: str, run_refits: list, alpha: float) -> list[tuple[str, bool, float, list[float], float]]:
    """(label, is_refit, accuracy, sizes of the CELLS, LAC-standard CovGap) at ``alpha`` for every method of
    ``run`` and every refit of it."""
    import polars as pl

    summ = pl.read_csv(MEASURED / run / "summary.csv")
    frames = [(m, False, summ.filter(pl.col("method") == m)) for m in ORDER if m in summ["method"].to_list()]
    for alt, method, overrides in run_refits:
        label = refit_label(method, overrides)
        frames.append((label, True, pl.read_csv(MEASURED / alt / "summary.csv").filter(pl.col("method") == method)))
    rows = []
    for label, is_refit, df in frames:
        d = df.filter((pl.col("alpha") - alpha).abs() < 1e-9)

        def cell(score, predictor, column):
            r = d.filter((pl.col("score") == score) & (pl.col("predictor") == predictor))
            return float(r[column][0]) if r.height else float("nan")

        rows.append((label, is_refit, float(d["accuracy"][0]), [cell(sc, pr, "size_mean") for sc, pr in CELLS],
                     cell("lac", "standard", "covgap_mean")))
    return rows


def compact_section(alpha: float = 0.1) -> list[str]:
    """One small table per run that has refits: every method of the run and every refit variant, mean set size
    of the four (score, predictor) cells at ``alpha``, accuracy and LAC-standard CovGap; smallest size in bold."""
    by_base = _refits_by_base()
    if not by_base:
        return []
    out = [f"### Every method and every refit side by side (α = {alpha:g}, mean over the R splits)", "",
           "Rows: the run's own methods, then each refit (`open_questions.py refit`) of one method from the same "
           "CE backbone with the fields shown changed. Same pool and the same R splits in every row of a table. "
           "Bold: the smallest size of each column.", ""]
    for base in [n for n in RUNS if n in by_base]:
        table = _run_rows(base, by_base[base], alpha)
        best = [min(t[3][i] for t in table) for i in range(len(CELLS))]
        out += [f"**{RUNS[base]['title']}**", "",
                "| method | accuracy | LAC size | LAC class-wise size | APS size | APS class-wise size | LAC CovGap (pts) |",
                "|---|---|---|---|---|---|---|"]
        for label, _, acc, vals, gap in table:
            sizes = [f"**{v:.3f}**" if abs(v - b) < 1e-12 else f"{v:.3f}" for v, b in zip(vals, best)]
            out.append(f"| {label} | {acc:.3f} | " + " | ".join(sizes) + f" | {gap:.2f} |")
        out.append("")
    return out


def compact_over_seeds(alpha: float = 0.1) -> list[str]:
    """Mean ± std over training seeds of the compact table's sizes, for benchmarks measured on several seeds:
    every method of the runs, and each refit variant measured on every one of those seeds."""
    import numpy as np

    by_base = _refits_by_base()
    out = []
    for title, seeds in seed_groups():
        per_label: dict[str, list] = {}
        refit_labels: set[str] = set()
        for run in seeds:
            for label, is_refit, acc, vals, _ in _run_rows(run, by_base.get(run, []), alpha):
                per_label.setdefault(label, []).append([acc, *vals])
                if is_refit:
                    refit_labels.add(label)
        keep = {k: v for k, v in per_label.items() if len(v) == len(seeds)}
        if not refit_labels & set(keep):
            continue
        stats = {k: (np.mean(v, axis=0), np.std(v, axis=0, ddof=1)) for k, v in keep.items()}
        best = [min(m[i] for m, _ in stats.values()) for i in range(1, 5)]
        out += [f"**{title}, mean ± std over training seeds {', '.join(s[-2:] for s in seeds)} (α = {alpha:g})**", "",
                "| method | accuracy | LAC size | LAC class-wise size | APS size | APS class-wise size |",
                "|---|---|---|---|---|---|"]
        for label, (m, sd) in stats.items():
            cells_txt = [(f"**{m[i]:.3f} ± {sd[i]:.3f}**" if abs(m[i] - best[i - 1]) < 1e-12 else f"{m[i]:.3f} ± {sd[i]:.3f}")
                         for i in range(1, 5)]
            out.append(f"| {label} | {m[0]:.3f} ± {sd[0]:.3f} | " + " | ".join(cells_txt) + " |")
        out.append("")
        # Paired by seed (same backbone, pool and splits): each refit minus the run's methods and earlier refits.
        lines = []
        refit_rows = [k for k in keep if k in refit_labels]
        for i, label in enumerate(refit_rows):
            # the run's methods, and the refits listed before this one (each pair of refits once)
            for b in [k for k in keep if k not in refit_labels] + refit_rows[:i]:
                d = np.array(keep[label])[:, 1:] - np.array(keep[b])[:, 1:]  # seeds x 4 cells
                lines.append(f"| {label} | {b} | {int((d < 0).sum())} of {d.size} | {d.min():+.3f} … {d.max():+.3f} | "
                             f"{d.mean():+.3f} |")
        if lines:
            out += ["Paired by seed (same backbone, pool and splits in both rows): size of the refit minus size of each "
                    "method, over the seeds × the four cells above.", "",
                    "| refit | minus | smaller in | range | mean |", "|---|---|---|---|---|", *lines, ""]
    return out


def refit_label(method: str, overrides: dict) -> str:
    """How a refit is named in the tables. ConfTr with lambda = 0 is plain CE, fine-tuned from the backbone with
    exactly the conformal methods' fine-tune protocol (epochs, lr): the control that separates the effect of the
    conformal loss from that of the extra epochs."""
    if method == "conftr" and set(overrides) == {"conftr_lambda"} and float(overrides["conftr_lambda"]) == 0:
        return "ce fine-tuned (conftr, λ = 0)"
    return f"{method}, " + ", ".join(f"{k} = {v}" for k, v in overrides.items())


def refits() -> list[tuple[str, str, str, dict]]:
    """(base run name, refit name, method, overrides) of every measured refit (open_questions.py refit)."""
    by_out = {spec["out"]: name for name, spec in RUNS.items()}
    found = []
    for d in sorted(MEASURED.iterdir()):
        meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").is_file() else {}
        if d.name.endswith("-dual-train") and "overrides" not in meta:  # recorded before refit had options
            meta.update(base_run=d.name[: -len("-dual-train")], method="cact", overrides={"dual_source": "train"})
        if "overrides" not in meta or not (d / "summary.csv").is_file():
            continue
        base = by_out.get(Path(meta["base_run"]).name, Path(meta["base_run"]).name)
        if base in RUNS and (MEASURED / base / "summary.csv").is_file():
            found.append((base, d.name, meta["method"], meta["overrides"]))
    return found


def write_report() -> None:
    text = report()
    md = RESULTS_MD.read_text() if RESULTS_MD.is_file() else "# Results\n\n<!-- BEGIN GENERATED -->\n<!-- END GENERATED -->\n"
    a = md.index("<!-- BEGIN GENERATED")
    b = md.index("<!-- END GENERATED -->") + len("<!-- END GENERATED -->")
    RESULTS_MD.write_text(md[:a] + text + md[b:])
    print(f"wrote {RESULTS_MD}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run named runs one after the other")
    r.add_argument("names", nargs="+", choices=sorted(RUNS))
    r.add_argument("--root", default="/tmp/results-runs", help="where run folders and logs go (never the repo)")
    r.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra pipeline flags for every run")
    c = sub.add_parser("collect", help="collect an already finished run folder (no training)")
    c.add_argument("name", choices=sorted(RUNS))
    c.add_argument("--root", default="/tmp/results-runs")
    c.add_argument("--meta", default=None, help="JSON with command/start_utc/end_utc/wall_s/rc")
    sub.add_parser("report", help="rebuild the generated part of docs/RESULTS.md")
    f = sub.add_parser("figures", help="per-benchmark plots from the run folders into docs/figures/")
    f.add_argument("--root", default="/tmp/results-runs")
    a = p.parse_args(argv)
    if a.cmd == "figures":
        for path in figures(Path(a.root)):
            print(path)
        return 0
    if a.cmd == "run":
        rc = 0
        for n in a.names:
            rc |= run_one(n, Path(a.root), a.extra)
        return rc
    if a.cmd == "collect":
        root = Path(a.root)
        meta = json.loads(Path(a.meta).read_text()) if a.meta else {}
        collect(a.name, root / RUNS[a.name]["out"], root / "logs" / f"{a.name}.log", meta)
        return 0
    write_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
