"""Evaluation stage: hard split conformal prediction over R random calibration/test splits of the pool.

Read the logits of every method, run the CP engine (:func:`cact_ops.engine.evaluate_pool`), write the tables.
For every method x score (registered in :data:`cact_ops.scores.SCORE_REGISTRY`; default ``lac``, ``aps``,
``raps``) x predictor (``standard``, ``classwise``) x alpha, the pool is split ``n_splits`` times (stratified,
seeded) into a calibration part and a test part; thresholds come from the calibration part, sets are predicted
on the test part, and every summary metric of :data:`cact_ops.metrics.METRIC_REGISTRY` is computed there
(accuracy, coverage, average size, CovGap, under-covered class ratio, SSCV, many/medium/few-shot set size), with
per-class coverage and size. The engine, in ``cact_ops``, holds all of that math and how it stays fast; this
module holds the config, the I/O, the input checks against the split manifest and the CLI. Training-time
smoothing plays no part here: the guarantee holds whatever training did (Marani et al., Class Adaptive
Conformal Training, arXiv 2601.09522).

Inputs, from the earlier stages: ``<run>/logits/<method>/pool.parquet`` (``sample_id``, ``label``,
``logits`` fixed-size list, or ``logit_0..logit_{K-1}`` columns) and the split manifest
(``<run>/splits/manifest.json``: class names, training counts, pool counts). Outputs, all written atomically
(a rerun replaces them): ``eval/summary.parquet`` (+ ``summary.csv``), ``eval/per_class.parquet``,
``eval/per_split.parquet`` (the per-split values the summary averages), ``eval/manifest.json`` (the evaluation
config and the SHA-256 of every input) and, through :mod:`stages.report`, ``report.md`` and ``plots/*.png``.
The columns come from the registries (``SUMMARY_COLUMNS``, ``PER_SPLIT_COLUMNS``, ... here are read at access
time), so a registered metric is a new column.

Paired comparison with the control (:func:`cact_ops.methods.control`, the CE fine-tune): every method sees the
same splits, so when the control was evaluated too, the summary gets, per method, the mean over splits of
(method - control) and its 95% Student-t interval (``<metric>_diff_mean/_lo/_hi`` for the metrics of
``PAIRED_METRICS``, and ``control``); they are NaN (``control`` null) for the control itself and when it is
absent. The intervals are over calibration/test splits of one trained model: seed-to-seed variation is not in
them.

CLI (re-evaluate a finished run, no retraining)::

    python -m stages.evaluate runs/digits --alphas 0.1 0.05 0.2 --scores lac aps --n-splits 50
"""
from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from cact_ops import engine
from cact_ops import methods as registry
from cact_ops import plugins
from cact_ops.engine import DEFAULT_SCORES, PER_CLASS_COLUMNS, PREDICTORS
from cact_ops.methods import order_key
from cact_ops.metrics import paired_metrics

from . import _io
from .storage import as_path

log = logging.getLogger(__name__)

# Read from the registries at access time (module __getattr__), so a score or metric registered after this
# module's import is in them.
_LIVE = {
    "SCORES": engine.score_names,  # every registered score (the default evaluates DEFAULT_SCORES)
    "PER_SPLIT_METRICS": engine.per_split_metrics,
    "PER_SPLIT_COLUMNS": engine.per_split_columns,
    # Metrics compared with the control, split by split: summary columns <metric>_diff_mean, _diff_lo, _diff_hi.
    "PAIRED_METRICS": paired_metrics,
    "PAIRED_COLUMNS": engine.paired_columns,
    "SUMMARY_COLUMNS": engine.summary_columns,
}


def __getattr__(name: str):
    if name in _LIVE:
        return _LIVE[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------------
# Config and result


@dataclass
class EvalConfig:
    """What to evaluate in a run folder. Defaults follow the paper's protocol (R=20 random half/half splits).

    >>> EvalConfig("runs/digits").alphas
    (0.1, 0.05)
    """

    run_dir: str | Path
    splits_root: str | Path | None = None  # None: <run_dir>/splits
    methods: Sequence[str] | None = None  # None: every method with logits under <run_dir>/logits/
    scores: Sequence[str] = DEFAULT_SCORES
    predictors: Sequence[str] = PREDICTORS
    alphas: Sequence[float] = (0.1, 0.05)
    n_splits: int = 20  # R random calibration/test splits of the pool
    # share of each class's pool points that goes to calibration in every split (TrainConfig.cal_fraction is
    # another thing: the share of a training batch that calibrates the smooth threshold)
    pool_cal_fraction: float = 0.5
    seed: int = 0  # seeds the splits and the APS/RAPS U: same seed, same numbers
    raps_lam: float = 0.01  # RAPS lambda (0.001 with raps_k_reg=1 is the CLIP-Conformal setting)
    raps_k_reg: int = 5
    randomized: bool = True  # APS/RAPS with U ~ Unif(0, 1); False: U = 1 (non-randomised)
    device: str = "cpu"  # "cuda" runs the same tensor code on the GPU
    dtype: str = "float32"  # "float64" for bit-level agreement with a float64 reference
    report: bool = True  # also write report.md and plots/ (stages.report)

    def __post_init__(self):
        self.scores = tuple(self.scores)
        self.predictors = tuple(self.predictors)
        self.alphas = tuple(float(a) for a in self.alphas)
        if self.methods is not None:
            self.methods = tuple(self.methods)

    def validate(self) -> None:
        for name, values, known in (("score", self.scores, engine.score_names()),
                                    ("predictor", self.predictors, PREDICTORS)):
            bad = [v for v in values if v not in known]
            if bad or not values:
                raise ValueError(f"unknown or no {name}(s) {bad}; known: {', '.join(known)}")
        if not self.alphas or any(not 0.0 < a < 1.0 for a in self.alphas):
            raise ValueError(f"alphas must be non-empty and lie in (0, 1), got {self.alphas}")
        if len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"alphas must be distinct, got {self.alphas}")
        if self.n_splits < 1:
            raise ValueError(f"n_splits must be >= 1, got {self.n_splits}")
        if not 0.0 < self.pool_cal_fraction < 1.0:
            raise ValueError(f"pool_cal_fraction must lie in (0, 1), got {self.pool_cal_fraction}")
        if self.raps_lam < 0 or self.raps_k_reg < 0:
            raise ValueError(f"raps_lam and raps_k_reg must be >= 0, got {self.raps_lam}, {self.raps_k_reg}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        d["splits_root"] = None if self.splits_root is None else str(self.splits_root)
        for k in ("methods", "scores", "predictors", "alphas"):
            d[k] = None if d[k] is None else list(d[k])
        return d


@dataclass
class EvalResult:
    """Paths of everything the stage wrote, and the summary tables."""

    run_dir: Path
    summary_path: Path
    summary_csv_path: Path
    per_class_path: Path
    per_split_path: Path
    manifest_path: Path
    report_path: Path | None
    summary: pl.DataFrame = field(repr=False)
    per_class: pl.DataFrame = field(repr=False)
    per_split: pl.DataFrame = field(repr=False)


# ----------------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class PoolLogits:
    """Logits of one split file, rows ordered by ``sample_id``."""

    path: Path
    sample_id: np.ndarray
    labels: torch.Tensor  # int64 [n]
    logits: torch.Tensor  # float32 [n, K]


def read_logits(path: str | Path) -> PoolLogits:
    """Read a logits Parquet file (``logits`` list column or ``logit_<k>`` columns), sorted by ``sample_id``.

    Raises ``ValueError`` naming the file when a row has NaN/inf logits or the rows have different widths.

    >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq
    >>> p = Path(tempfile.mkdtemp()) / "pool.parquet"
    >>> pq.write_table(pa.table({"sample_id": [7, 3], "label": [1, 0], "logit_0": [0.0, 1.0],
    ...                          "logit_1": [2.0, 0.0]}), p)
    >>> read_logits(p).logits.tolist(), read_logits(p).sample_id.tolist()
    ([[1.0, 0.0], [0.0, 2.0]], [3, 7])
    """
    path = as_path(path, absolute=False)
    if not path.is_file():
        raise FileNotFoundError(2, f"logits file not found: {path} (run stages.infer first)", str(path))
    table = _io.read_parquet(path)
    names = table.schema.names
    for col in ("sample_id", "label"):
        if col not in names:
            raise ValueError(f"{path}: missing column {col!r} (columns: {names})")
    n = table.num_rows
    if "logits" in names:
        col = table.column("logits").combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            k = col.type.list_size
        elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            widths = np.unique(col.value_lengths().to_numpy(zero_copy_only=False))
            if len(widths) > 1:
                raise ValueError(f"{path}: rows have different numbers of logits {widths[:5].tolist()}")
            k = int(widths[0]) if len(widths) else 0
        else:
            raise ValueError(f"{path}: column 'logits' must be a list of floats, got {col.type}")
        if col.null_count:
            raise ValueError(f"{path}: {col.null_count} of {n} rows have null logits")
        values = col.flatten().to_numpy(zero_copy_only=False)
        arr = np.asarray(values, dtype=np.float32).reshape(n, k)
    else:
        cols = [c for c in names if c.startswith("logit_")]
        k = len(cols)
        expected = [f"logit_{j}" for j in range(k)]
        if not k or sorted(cols, key=lambda c: int(c[6:]) if c[6:].isdigit() else -1) != expected:
            raise ValueError(f"{path}: expected a 'logits' column or columns logit_0..logit_K-1, got {names}")
        arr = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in expected], axis=1)
        arr = np.asarray(arr, dtype=np.float32)
    bad = int((~np.isfinite(arr)).any(axis=1).sum()) if arr.size else 0
    if bad:
        raise ValueError(f"{path}: {bad} of {n} rows have NaN or infinite logits")
    if k < 2:
        raise ValueError(f"{path}: logits need at least 2 classes, got {k}")
    sample_id = table.column("sample_id").to_numpy(zero_copy_only=False).astype(np.int64)
    labels = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    if len(np.unique(sample_id)) != n:
        raise ValueError(f"{path}: sample_id has duplicates")
    order = np.argsort(sample_id, kind="stable")
    return PoolLogits(path=path, sample_id=sample_id[order], labels=torch.from_numpy(labels[order]),
                      logits=torch.from_numpy(np.ascontiguousarray(arr[order])))


def read_manifest(splits_root: str | Path) -> dict:
    """The split manifest (``manifest.json``), with the keys evaluation needs checked."""
    path = as_path(splits_root, absolute=False) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(2, f"split manifest not found: {path}", str(path))
    m = json.loads(path.read_text())
    for key in ("classes", "num_classes", "counts"):
        if key not in m:
            raise ValueError(f"{path}: missing key {key!r}")
    if "train" not in m["counts"] or len(m["counts"]["train"]) != m["num_classes"]:
        raise ValueError(f"{path}: counts['train'] missing or not {m['num_classes']} classes long")
    if len(m["classes"]) != m["num_classes"]:
        raise ValueError(f"{path}: {len(m['classes'])} class names for num_classes={m['num_classes']}")
    return m


def check_against_manifest(pool: PoolLogits, manifest: dict, split: str = "pool") -> None:
    """Raise ``ValueError`` when the logits' class count or per-class row counts disagree with the manifest."""
    k = manifest["num_classes"]
    if pool.logits.shape[1] != k:
        raise ValueError(f"{pool.path}: {pool.logits.shape[1]} logits per row but the manifest has {k} classes")
    if len(pool.labels) and (int(pool.labels.min()) < 0 or int(pool.labels.max()) >= k):
        raise ValueError(f"{pool.path}: labels outside [0, {k})")
    expected = manifest["counts"].get(split)
    if expected is not None:
        got = torch.bincount(pool.labels, minlength=k).tolist()
        if got != list(expected):
            diff = [(c, expected[c], got[c]) for c in range(k) if got[c] != expected[c]]
            raise ValueError(
                f"{pool.path}: per-class counts disagree with the manifest's counts[{split!r}] in {len(diff)} "
                f"classes, e.g. (class, manifest, file) {diff[:5]}"
            )


def discover_methods(run_dir: str | Path) -> tuple[str, ...]:
    """Methods with ``logits/<method>/pool.parquet``, in the canonical order (ce, conftr, ..., cact)."""
    root = _io.RunFolder(run_dir).all_logits
    found = sorted(p.parent.name for p in root.glob("*/pool.parquet")) if root.is_dir() else []
    return tuple(sorted(found, key=order_key))


# ----------------------------------------------------------------------------------------------------------
# Frames


_SCHEMA = {
    "method": pl.Utf8, "score": pl.Utf8, "predictor": pl.Utf8, "alpha": pl.Float64, "n_splits": pl.Int64,
    "class": pl.Int64, "class_name": pl.Utf8, "shot": pl.Utf8, "train_count": pl.Int64, "test_count": pl.Int64,
    "split": pl.Int64, "control": pl.Utf8,
}


def _frame(rows: list[dict], columns: Sequence[str]) -> pl.DataFrame:
    schema = {c: _SCHEMA.get(c, pl.Float64) for c in columns}
    return pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)


# ----------------------------------------------------------------------------------------------------------
# The stage


def _warn_infinite(summary: pl.DataFrame, n_cal: int) -> None:
    bad = summary.filter(pl.col("inf_threshold_frac") > 0).select("predictor", "alpha", "inf_threshold_frac")
    for row in bad.unique(maintain_order=True).iter_rows(named=True):
        what = ("the threshold is +inf" if row["predictor"] == "standard"
                else f"{row['inf_threshold_frac']:.0%} of the class thresholds are +inf")
        warnings.warn(
            f"pool too small for alpha={row['alpha']} ({row['predictor']} predictor, {n_cal} calibration points "
            f"per split): {what}, those sets are full; see inf_threshold_frac in eval/summary.parquet",
            stacklevel=3,
        )


def run(config: EvalConfig) -> EvalResult:
    """Evaluate every method of a run folder and write the summaries (and the report).

    >>> res = run(EvalConfig("runs/digits", alphas=(0.1,), n_splits=5))   # doctest: +SKIP
    >>> res.summary.select("method", "score", "predictor", "coverage_mean", "size_mean")  # doctest: +SKIP
    """
    config.validate()
    run_dir = as_path(config.run_dir, absolute=False)
    run = _io.RunFolder(run_dir)
    splits_root = as_path(config.splits_root, absolute=False) if config.splits_root else run.splits
    manifest = read_manifest(splits_root)
    methods = tuple(sorted(config.methods, key=order_key)) if config.methods else discover_methods(run_dir)
    if not methods:
        raise FileNotFoundError(2, f"no logits found under {run.all_logits} (run stages.infer first)",
                                str(run.all_logits))
    classes, train_counts = manifest["classes"], manifest["counts"]["train"]
    dtype = getattr(torch, config.dtype)
    summary_rows, class_rows, split_rows, inputs = [], [], [], {}
    reference, splits = None, None
    for method in methods:
        t0 = time.perf_counter()
        pool = read_logits(run.logits(method, "pool"))
        check_against_manifest(pool, manifest)
        if reference is None:
            reference = pool
            splits = engine.split_indices(pool.labels, config.n_splits, config.pool_cal_fraction, config.seed)
        elif not (np.array_equal(pool.sample_id, reference.sample_id)
                  and torch.equal(pool.labels, reference.labels)):
            raise ValueError(f"{pool.path}: sample_id/label differ from {reference.path}; all methods must be "
                             "evaluated on the same pool")
        inputs[str(pool.path.relative_to(run_dir))] = _io.sha256_file(pool.path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one clear warning per alpha below, not one per split
            accuracy, results = engine.evaluate_pool(
                pool.logits, pool.labels, train_counts, config.scores, config.predictors, config.alphas,
                config.n_splits, config.pool_cal_fraction, config.seed, config.raps_lam, config.raps_k_reg,
                config.randomized, config.device, dtype, splits=splits)
        test_counts = torch.bincount(pool.labels[splits[1][0]], minlength=len(classes)).tolist()
        rows, cls_rows = engine.summarize(method, accuracy, results, config.alphas, classes, train_counts,
                                          test_counts)
        summary_rows += rows
        class_rows += cls_rows
        split_rows += engine.per_split_rows(method, accuracy, results, config.alphas)
        log.info("evaluated %s: %d rows x %d classes, %d splits, %.2fs", method, pool.logits.shape[0],
                 pool.logits.shape[1], config.n_splits, time.perf_counter() - t0)
        del pool
    per_split = _frame(split_rows, engine.per_split_columns())
    summary = _frame(engine.with_paired(summary_rows, split_rows, registry.control()), engine.summary_columns())
    per_class = _frame(class_rows, PER_CLASS_COLUMNS)
    _warn_infinite(summary, splits[0].shape[1])
    out = run.eval
    summary_path = _io.write_parquet(summary.to_arrow(), out / "summary.parquet")
    with _io.atomic_path(out / "summary.csv") as tmp:
        summary.write_csv(tmp)
    per_class_path = _io.write_parquet(per_class.to_arrow(), out / "per_class.parquet")
    per_split_path = _io.write_parquet(per_split.to_arrow(), out / "per_split.parquet")
    manifest_path = _io.write_json({"config": config.to_dict(), "methods": list(methods), "inputs": inputs,
                                    "splits_manifest": str(splits_root / "manifest.json"),
                                    "n_pool": int(reference.labels.numel()), "n_cal": int(splits[0].shape[1]),
                                    "n_test": int(splits[1].shape[1])}, out / "manifest.json")
    report_path = None
    if config.report:
        from .report import write_report

        report_path = write_report(run_dir, summary=summary, per_class=per_class, per_split=per_split,
                                   eval_config=config.to_dict())
    return EvalResult(run_dir, summary_path, out / "summary.csv", per_class_path, per_split_path, manifest_path,
                      report_path, summary, per_class, per_split)


def _parse(argv=None) -> EvalConfig:
    p = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="run folder with logits/<method>/pool.parquet and splits/manifest.json")
    p.add_argument("--splits-root", default=None, help="split folder (default RUN_DIR/splits)")
    p.add_argument("--methods", nargs="+", default=None, help="default: every method with logits")
    p.add_argument("--plugins", nargs="+", default=None, metavar="MODULE", action=plugins.LoadPlugins,
                   help="modules that register scores or metrics when imported, loaded before --scores is checked")
    p.add_argument("--scores", nargs="+", default=list(DEFAULT_SCORES),
                   help=f"registered scores ({', '.join(engine.score_names())}, and those of --plugins)")
    p.add_argument("--predictors", nargs="+", default=list(PREDICTORS), choices=PREDICTORS)
    p.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.05])
    p.add_argument("--n-splits", type=int, default=20)
    p.add_argument("--pool-cal-fraction", type=float, default=EvalConfig.pool_cal_fraction,
                   help="share of each class's pool points that calibrates, in every split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raps-lam", type=float, default=0.01)
    p.add_argument("--raps-k-reg", type=int, default=5)
    p.add_argument("--no-randomized", action="store_true", help="APS/RAPS with U = 1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--no-report", action="store_true", help="skip report.md and the plots")
    a = p.parse_args(argv)
    if a.plugins:
        print(plugins.describe(a.plugins), flush=True)
    return EvalConfig(run_dir=a.run_dir, splits_root=a.splits_root, methods=a.methods, scores=a.scores,
                      predictors=a.predictors, alphas=a.alphas, n_splits=a.n_splits,
                      pool_cal_fraction=a.pool_cal_fraction,
                      seed=a.seed, raps_lam=a.raps_lam, raps_k_reg=a.raps_k_reg, randomized=not a.no_randomized,
                      device=a.device, dtype=a.dtype, report=not a.no_report)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = run(_parse(argv))
    cols = ["method", "score", "predictor", "alpha", "accuracy", "coverage_mean", "size_mean", "covgap_mean",
            "undercovered_mean", "sscv_mean", "few_size_mean", "inf_threshold_frac"]
    with pl.Config(tbl_rows=-1, tbl_cols=-1, float_precision=4, tbl_width_chars=200):
        print(res.summary.select(cols))
    print(f"summary: {res.summary_path}")
    if res.report_path:
        print(f"report: {res.report_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
