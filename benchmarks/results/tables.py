"""Write benchmarks/results/TABLES.md: every generated results table, from the committed measurements only.

    python benchmarks/results/tables.py               # rewrite benchmarks/results/TABLES.md (atomically)
    python benchmarks/results/tables.py --out PATH    # write the same bytes elsewhere
    python benchmarks/results/tables.py --check       # exit 1 when the committed TABLES.md is stale

Reads nothing but ``benchmarks/results/measured/``: the first build's run records (``measured/<name>/``, written
by ``run_quality.py collect`` and ``open_questions.py refit --save``: ``meta.json``, ``summary.csv``,
``lambda.csv``, ``val_metrics.csv``, ``sweep_trials.csv``, ``temperature.md``) and the fixed method's variant
runs (``measured/cact-variants/<run>/``, written by ``cact_variants.py collect``). No run folders, no data, no
Ray. A folder under ``measured/`` without a ``meta.json`` (other than ``cact-variants``) is not read here.

The output is deterministic: the same measurements give the same bytes (no clock, sorted or registry-ordered
iteration, no absolute paths: the commands recorded in ``meta.json`` are shown with their data folder as
``DATA/`` and their run folders as ``RUNS/``). ``tests/test_results_tables.py`` regenerates the file into a
temporary path and compares it with the committed one byte for byte. docs/RESULTS.md holds the findings and
points here.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from run_quality import MEASURED, RUNS  # noqa: E402

from cact_ops import methods as method_registry  # noqa: E402


def _uses_dual(method: str) -> bool:
    """Whether a run's method had multipliers (an unregistered name: no)."""
    return method in method_registry.names() and method_registry.get(method).uses_dual

TABLES_MD = HERE / "TABLES.md"
VARIANTS_DIR = MEASURED / "cact-variants"
# The default eta of the first build: records made before ``val_constraint`` existed hold the mean of S - eta
# under the name ``val_soft_size`` (see val_lines). A constant, not TrainConfig's current default, so that a
# later change of the default cannot rewrite these old tables.
FIRST_BUILD_ETA = 1.2


# ----------------------------------------------------------------------------------------------------------
# Paths in recorded commands

_ABS_SCRIPT = re.compile(r"(?<![\w.])~?/(?:[^/\s]+/)*([^/\s]+\.py)\b")
_DATA_ROOT = re.compile(r"(--data-root[ =])~?/\S*?([^/\s]+)(?=\s|$)")
_ABS_PATH = re.compile(r"(?<![\w.])~?/(?:[^/\s]+/)*([^/\s]+)")


def portable(command: str) -> str:
    """A recorded command without machine-specific paths: ``--data-root /any/where/mnist`` becomes
    ``--data-root DATA/mnist``, a script outside the repo ``a one-off script outside the repo (name.py)`` and
    every other absolute path (run folders) ``RUNS/<its last component>``.

    >>> portable("pipelines/mnist_lt.py --data-root /x/data/mnist --out /y/runs/mnist-s0 --address local")
    'pipelines/mnist_lt.py --data-root DATA/mnist --out RUNS/mnist-s0 --address local'
    >>> portable("rerun by /y/finish.py, 36 s")
    'rerun by a one-off script outside the repo (finish.py), 36 s'
    """
    command = _ABS_SCRIPT.sub(r"a one-off script outside the repo (\1)", command)
    command = _DATA_ROOT.sub(r"\1DATA/\2", command)
    return _ABS_PATH.sub(r"RUNS/\1", command)


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

    p = MEASURED / name / "val_metrics.csv"
    if not p.is_file():
        return []
    v = pl.read_csv(p)
    if "val_soft_size" not in v.columns:
        return []
    eta = FIRST_BUILD_ETA
    has_eta = "eta" in v.columns
    lines = ["| trained method | val accuracy | val hard coverage | val hard size | val smooth size (training T) | smooth − hard size |"
             + (" η in use |" if has_eta else ""), "|---|---|---|---|---|---|" + ("---|" if has_eta else "")]
    order = {m: i for i, m in enumerate(ORDER)}
    for r in sorted(v.iter_rows(named=True), key=lambda r: order.get(r["trained_method"], 99)):
        # records made before val_constraint existed hold the mean of S - eta under the name val_soft_size
        soft = r["val_soft_size"] if "val_constraint" in r else r["val_soft_size"] + eta
        lines.append(f"| {r['trained_method']} | {r['val_accuracy']:.3f} | {r['val_coverage']:.3f} | "
                     f"{r['val_size']:.2f} | {soft:.2f} | {soft - r['val_size']:+.2f} |"
                     + ((f" {r['eta']:.3f} |" if r["eta"] is not None and _uses_dual(r["trained_method"]) else " – |")
                        if has_eta else ""))
    return lines


def per_run_section() -> list[str]:
    """One block per first-build run (RUNS order): its command, the four (score, predictor) tables per alpha,
    the multipliers and the last-epoch validation metrics of training."""
    import polars as pl

    names = [n for n in RUNS if (MEASURED / n / "summary.csv").is_file() and not n.startswith("conftr-linear")]
    out = ["Bold: the smallest size and the smallest CovGap in each table. `ce` is the CE backbone itself (no extra "
           "fine-tune epochs); every other method is fine-tuned from it.", ""]
    for name in names:
        spec = RUNS[name]
        meta = json.loads((MEASURED / name / "meta.json").read_text())
        summary = pl.read_csv(MEASURED / name / "summary.csv")
        out += [f"### {spec['title']}", "",
                f"`{portable(meta['command'])}` — wall {meta['wall_s'] / 60:.1f} min, finished {meta['end_utc']}, rc {meta['rc']}; "
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
    return out


def seed_section() -> list[str]:
    """Mean ± std over training seeds, for the benchmarks measured on several seeds."""
    out = []
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
    return out


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
    out = ["Balanced MNIST, α = 0.01. DeepMind's README (one training trial, 10 random 5000/5000 calibration/test splits of the test set, THR "
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
        if (MEASURED / base / "lambda.csv").is_file() and _uses_dual(method):
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
    out = ["Commands as recorded, with the data folder shown as `DATA/` (`--data` of `run_quality.py run`) and the run "
           "folders, outside the repo, as `RUNS/` (`--root`); `measured/<name>/` keeps what they measured. "
           "Wall times are on the shared 2-core machine, often with two runs at once.", "",
           "| measured/ | command | finished (UTC) | wall |", "|---|---|---|---|"]
    for d in sorted(MEASURED.iterdir()):
        f = d / "meta.json"
        if not f.is_file() or not (d / "summary.csv").is_file():
            continue
        meta = json.loads(f.read_text())
        end = meta.get("end_utc", "–")
        out.append(f"| {d.name} | `{portable(meta.get('command', '?'))}` | {end} | {meta.get('wall_s', float('nan')) / 60:.1f} min |")
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
    out = [f"α = {alpha:g}, mean over the R splits. Rows: the run's own methods, then each refit (`open_questions.py refit`) of one method from the same "
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



# ----------------------------------------------------------------------------------------------------------
# The fixed method's variant runs (cact_variants.py, measured/cact-variants/<run>/)

# dataset prefix -> title, in the order the groups are shown (others after them, by name)
VARIANT_TITLES = {"newsgroups-if10": "20 Newsgroups-LT IF=10", "mnist-if100": "MNIST-LT IF=100"}
VARIANT_CELLS = CELLS  # the four (score, predictor) cells of the compact tables
VARIANT_SCORES = ("aps", "lac")
VARIANT_ALPHA = 0.1


def variant_groups() -> list[tuple[str, list[Path]]]:
    """(title, run folders) per dataset of measured/cact-variants/, the runs of one dataset being its seeds
    (folder names <prefix>-s<seed>); sorted by folder name."""
    groups: dict[str, list[Path]] = {}
    if VARIANTS_DIR.is_dir():
        for d in sorted(VARIANTS_DIR.iterdir()):
            if (d / "base" / "eval" / "per_split.parquet").is_file():
                groups.setdefault(re.sub(r"-s\d+$", "", d.name), []).append(d)
    out = []
    for prefix in [p for p in VARIANT_TITLES if p in groups] + sorted(p for p in groups if p not in VARIANT_TITLES):
        runs = groups[prefix]
        seeds = ", ".join(d.name.rsplit("-s", 1)[-1] for d in runs)
        out.append((f"{VARIANT_TITLES.get(prefix, prefix)}, seed{'s' if len(runs) > 1 else ''} {seeds}", runs))
    return out


def variant_absolute(runs: list[Path], alpha: float = VARIANT_ALPHA) -> list[str]:
    """Accuracy per seed and mean set size over the seeds (each seed's mean over its splits) of every method
    and variant, from the runs' eval/summary.csv."""
    import polars as pl

    from cact_ops.methods import order_key

    frames = [pl.read_csv(d / "base" / "eval" / "summary.csv").filter((pl.col("alpha") - alpha).abs() < 1e-9)
              .with_columns(pl.lit(i).alias("replicate")) for i, d in enumerate(runs)]
    s = pl.concat(frames, how="diagonal_relaxed")
    lines = ["| method | accuracy (" + " / ".join(d.name.rsplit("-", 1)[-1] for d in runs) + ") | "
             + " | ".join(f"{sc.upper()} {'class-wise ' if pr == 'classwise' else ''}size" for sc, pr in VARIANT_CELLS)
             + " |", "|---|---:|" + "---:|" * len(VARIANT_CELLS)]
    for m in sorted(set(s["method"]), key=order_key):
        sub = s.filter(pl.col("method") == m)
        acc = [sub.filter(pl.col("replicate") == i)["accuracy"][0] for i in range(len(runs))]
        cells = []
        for sc, pr in VARIANT_CELLS:
            v = sub.filter((pl.col("score") == sc) & (pl.col("predictor") == pr)).sort("replicate")["size_mean"]
            cells.append(f"{v.mean():.3f}")
        lines.append(f"| {m} | " + " / ".join(f"{a:.3f}" for a in acc) + " | " + " | ".join(cells) + " |")
    return lines


def variants_section() -> list[str]:
    """The tables of ``cact_variants.py table`` (paired differences against ce_finetune) and ``gap``, computed
    by that script's own functions from the committed copies of the variant runs."""
    import cact_variants

    groups = variant_groups()
    if not groups:
        return []
    out = ["The method as fixed on 2026-11-29 (docs/DESIGN.md section 4): the dataset's pipeline with every method, "
           "including `ce_finetune` (CE fine-tuned from the backbone with the conformal methods' protocol: the "
           "control), then CaCT fine-tuned again from the same CE backbone with one choice reverted at a time "
           "(`cact[cal=none]`: unweighted calibration; `cact[reduction=sample]`; `cact[eta=1.2]`: the old absolute "
           "target; `cact[dual4]`: four dual steps per epoch; `cact[old]`: every choice of the first build at once), "
           "all evaluated on the same R = 20 calibration/test splits. Made by `cact_variants.py run` and `collect`; "
           "the tables below are what `cact_variants.py table` and `gap` print on `measured/cact-variants/<run>/`.", "",
           "Paired tables: method − `ce_finetune`, mean and 95% Student-t interval over the replicates (several seeds: "
           "the seeds, each the mean over its splits, df = seeds − 1; one seed: its R splits, which leaves out "
           "seed-to-seed variation). Bold: the interval excludes zero. Sizes in classes, covgap in points, "
           f"α = {VARIANT_ALPHA:g}; `–`: no class in that shot group.", ""]
    for title, runs in groups:
        outs = [str(d) for d in runs]
        out += [f"### {title}", "", f"Accuracy and mean set size (α = {VARIANT_ALPHA:g}; sizes: mean over the seeds "
                "of each seed's mean over its splits):", "", *variant_absolute(runs), ""]
        for score in VARIANT_SCORES:
            for pred, control in (("standard", None), ("classwise", None), ("standard", "classwise")):
                name = {"standard": "standard", "classwise": "class-wise"}
                what = f"{score.upper()}, {name[pred]} CP against `ce_finetune` with {name[control or pred]} CP"
                out += [f"**{what}**", "", cact_variants.table(outs, score, pred, VARIANT_ALPHA, control), ""]
        out += ["**Validation vs training soft size of CaCT at the last epoch** (`gap`: mean over classes and over the "
                "last third of the classes by training count; lambda max: the largest multiplier)", "",
                cact_variants.gap(outs), ""]
    return out


# ----------------------------------------------------------------------------------------------------------
# The whole file

def evidence_section() -> list[str]:
    """The decisive protocol's verdicts, D_val-selected points and fronts (``evidence.py report``)."""
    import evidence

    folder = MEASURED / "evidence"
    if not folder.is_dir():
        return []
    return ["Made by `evidence.py run` (per dataset, IF and seed) and printed by `evidence.py report --out "
            "benchmarks/results/measured/evidence`; the protocol is in that script's docstring.", "",
            *[line for predictor in ("classwise", "standard") for line in (
                f"**Summary, {predictor} CP for every method** (APS, α = 0.1; CaCT at its D_val-selected "
                "η_relative against each baseline at its own; per cell the paired mean difference over seeds, "
                "**−** / **+** where the 95% interval lies below / above zero, 0 where it contains zero):", "",
                *evidence.verdict_summary(folder, predictor=predictor).rstrip("\n").split("\n"), "")],
            "**The seed's checks** (20 Newsgroups IF 10; APS, α = 0.1, class-wise CP; 95% t-intervals over seeds):",
            "", *evidence.checks_table(folder).rstrip("\n").split("\n"), "",
            *evidence.report(folder).rstrip("\n").split("\n"), ""]


SECTIONS = (
    ("Decisive protocol (issue 13): verdicts, selected points and fronts", evidence_section),
    ("The fixed method: each choice against the CE fine-tune control", variants_section),
    ("First build: one table per run", per_run_section),
    ("First build: over training seeds", seed_section),
    ("First build: every method and every refit side by side", lambda: compact_section() + compact_over_seeds()),
    ("First build: open questions (temperature, refits)", open_question_sections),
    ("First build: sweep trials", sweep_section),
    ("ConfTr MNIST linear reproduction", conftr_linear_section),
    ("Every measured run: command, end time, wall time", commands_section),
)


def slug(title: str) -> str:
    """GitHub's anchor of a heading (ASCII titles): lower case, punctuation dropped, spaces to hyphens.

    >>> slug("First build: open questions (temperature, refits)")
    'first-build-open-questions-temperature-refits'
    """
    return re.sub(r"[^a-z0-9_\- ]", "", title.lower()).replace(" ", "-")


def render() -> str:
    """The whole of TABLES.md, from measured/ only."""
    body, toc = [], []
    for title, make in SECTIONS:
        lines = make()
        if not lines:
            continue
        toc.append(f"- [{title}](#{slug(title)})")
        body += [f"## {title}", "", *lines]
    head = ["# Results tables (generated)", "",
            "<!-- Generated by benchmarks/results/tables.py from benchmarks/results/measured/: do not edit by hand. -->", "",
            "Every table here is computed from the measurements committed in `benchmarks/results/measured/` by "
            "`python benchmarks/results/tables.py`, which rewrites this whole file; "
            "`tests/test_results_tables.py` fails when it is stale. The findings these tables support, and their "
            "caveats, are in [docs/RESULTS.md](../../docs/RESULTS.md).", "",
            "Two generations of the method are measured here. **The fixed method** (2026-11-29, first section) is CaCT "
            "as it is now. **The first build** (2026-11-27, every other section) is the method as first built, whose "
            "CaCT had defects fixed since (docs/DESIGN.md section 4): read its CaCT rows as a record, not as the method. "
            "Conventions: α is the miscoverage level; sizes in classes; CovGap in points (mean over classes of "
            "|coverage_k − (1 − α)| × 100); many / med / few: the shot groups; ± is a standard deviation (over the R "
            "calibration/test splits of one trained model unless a table says over seeds).", "",
            "Contents:", "", *toc, ""]
    text = "\n".join(head + body).rstrip("\n") + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def write(path: Path = TABLES_MD) -> Path:
    """Write ``render()`` to ``path`` atomically (a temporary file in the same folder, then os.replace)."""
    path = Path(path)
    data = render().encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=TABLES_MD, help="where to write (default: benchmarks/results/TABLES.md)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if --out differs from what would be written")
    a = p.parse_args(argv)
    if a.check:
        if not a.out.is_file() or a.out.read_bytes() != render().encode("utf-8"):
            print(f"{a.out} is stale: run python benchmarks/results/tables.py", file=sys.stderr)
            return 1
        print(f"{a.out} is up to date")
        return 0
    print(f"wrote {write(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
