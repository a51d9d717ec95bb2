"""Issue 7, first slice: run the real pipelines and keep what they measured in benchmarks/results/measured/.

Sub-commands (``collect`` copies a finished run folder without running it). Locations come from flags or the
environment, never from this file: ``--data`` or ``$CACT_DATA`` (the folder holding ``mnist/``,
``20news-bydate.tar.gz``, ``cifar10-jpeg/``, ``imagenette2-128/``), ``--root`` or ``$CACT_RESULTS_ROOT`` (where
run folders and logs go, outside the repo); the pipelines run with the Python that runs this script.

    # run named runs one after the other; each run's command, wall time and printed summary are kept in
    # benchmarks/results/measured/<name>/
    python benchmarks/results/run_quality.py run mnist-if100-s0 newsgroups-if10-s0 --data DATA --root RUNS

    # per-benchmark plots (per-class set size, multipliers) from the run folders into docs/figures/
    python benchmarks/results/run_quality.py figures --root RUNS

    # the tables: benchmarks/results/TABLES.md, rewritten whole from measured/ (the same as tables.py)
    python benchmarks/results/run_quality.py report

``measured/<name>/`` holds: ``meta.json`` (command, start/end UTC, wall seconds, return code),
``summary.csv`` (a copy of the run's ``eval/summary.csv``), ``lambda.csv`` (the last-epoch multipliers of
``train/cact*/history.parquet`` per class), ``val_metrics.csv`` (last-epoch validation metrics of every method
from ``train/<method>/metrics.parquet``) and ``stdout_tail.txt`` (the summary the pipeline printed).
``tables.py`` reads only these files, so benchmarks/results/TABLES.md is regenerated from measured outputs, not
typed by hand.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MEASURED = Path(__file__).resolve().parent / "measured"
# The data folder is filled in when a run starts (--data / $CACT_DATA): "{data}" in a run's argv.
DATA = "{data}"
DATA_ENV, ROOT_ENV = "CACT_DATA", "CACT_RESULTS_ROOT"

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
         "benchmarks/results/conftr_mnist_linear.py", ["--part", part, "--data-root", f"{DATA}/mnist"],
         f"conftr-mnist-linear-{part}")
    for seed in (1, 2):
        _add(f"conftr-linear-{part}-s{seed}", f"ConfTr MNIST linear reproduction, {part}, seed {seed}",
             "benchmarks/results/conftr_mnist_linear.py",
             ["--part", part, "--seed", str(seed), "--data-root", f"{DATA}/mnist"],
             f"conftr-mnist-linear-{part}-seed{seed}")

# Every run: two CPU-only workers would compete with the others' tests on a 2-core machine -> default 1 worker.
COMMON = ["--address", "local"]


def run_one(name: str, root: Path, data: str, extra: list[str]) -> int:
    spec = RUNS[name]
    out = root / spec["out"]
    argv = [sys.executable, *(a.replace(DATA, data) for a in spec["argv"]), "--out", str(out), *COMMON, *extra]
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
for _base, _refits in FIGURE_RUNS.values():  # the CE fine-tune control (docs/RESULTS.md, first build), where run
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


def _location(flag: str | None, env: str, what: str) -> str:
    value = flag or os.environ.get(env)
    if not value:
        raise SystemExit(f"{what}: pass it as a flag or set ${env}")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    root_help = f"where run folders and logs go, outside the repo (default: ${ROOT_ENV})"
    r = sub.add_parser("run", help="run named runs one after the other")
    r.add_argument("names", nargs="+", choices=sorted(RUNS))
    r.add_argument("--root", default=None, help=root_help)
    r.add_argument("--data", default=None, help=f"the datasets' folder (default: ${DATA_ENV})")
    r.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra pipeline flags for every run")
    c = sub.add_parser("collect", help="collect an already finished run folder (no training)")
    c.add_argument("name", choices=sorted(RUNS))
    c.add_argument("--root", default=None, help=root_help)
    c.add_argument("--meta", default=None, help="JSON with command/start_utc/end_utc/wall_s/rc")
    sub.add_parser("report", help="rewrite benchmarks/results/TABLES.md from measured/ (same as tables.py)")
    f = sub.add_parser("figures", help="per-benchmark plots from the run folders into docs/figures/")
    f.add_argument("--root", default=None, help=root_help)
    a = p.parse_args(argv)
    if a.cmd == "report":
        import tables  # benchmarks/results/ is on sys.path when this file runs as a script

        print(f"wrote {tables.write()}")
        return 0
    root = Path(_location(a.root, ROOT_ENV, "--root"))
    if a.cmd == "figures":
        for path in figures(root):
            print(path)
        return 0
    if a.cmd == "run":
        data = _location(a.data, DATA_ENV, "--data")
        rc = 0
        for n in a.names:
            rc |= run_one(n, root, data, a.extra)
        return rc
    meta = json.loads(Path(a.meta).read_text()) if a.meta else {}
    collect(a.name, root / RUNS[a.name]["out"], root / "logs" / f"{a.name}.log", meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
