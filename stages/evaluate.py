"""Evaluation stage: hard split conformal prediction over R random calibration/test splits of the pool.

For every method x score (``lac``, ``aps``, ``raps``) x predictor (``standard``, ``classwise``) x alpha, the
pool is split ``n_splits`` times (stratified, seeded) into a calibration part and a test part; thresholds come
from the calibration part (the finite-sample quantile of :mod:`cact_ops.cp`), sets are predicted on the test
part, and the metrics of :mod:`cact_ops.metrics` are computed there: accuracy, coverage, average size, CovGap,
under-covered class ratio, SSCV, many/medium/few-shot set size, per-class coverage and size. Training-time
smoothing plays no part here: the guarantee holds whatever training did (Marani et al., Class Adaptive
Conformal Training, arXiv 2601.09522).

Inputs, from the earlier stages: ``<run>/logits/<method>/pool.parquet`` (``sample_id``, ``label``,
``logits`` fixed-size list, or ``logit_0..logit_{K-1}`` columns) and the split manifest
(``<run>/splits/manifest.json``: class names, training counts, pool counts). Outputs, all written atomically
(a rerun replaces them): ``eval/summary.parquet`` (+ ``summary.csv``), ``eval/per_class.parquet``,
``eval/per_split.parquet`` (the per-split values the summary averages), ``eval/manifest.json`` (the evaluation
config and the SHA-256 of every input) and, through :mod:`stages.report`, ``report.md`` and ``plots/*.png``.

Paired comparison with the control (:func:`cact_ops.methods.control`, the CE fine-tune): every method sees the
same splits, so when the control was evaluated too, the summary gets, per method, the mean over splits of
(method - control) and its 95% Student-t interval (``<metric>_diff_mean/_lo/_hi`` for the metrics of
``PAIRED_METRICS``, and ``control``); they are NaN (``control`` null) for the control itself and when it is
absent. The intervals are over calibration/test splits of one trained model: seed-to-seed variation is not in
them.

How it stays fast (see docs/BENCHMARKS.md). Everything that does not depend on the split is done once per
method: the softmax and one sort of every pool row (shared by the three scores), the score matrices, the
true-class scores. A split is then just index arithmetic: thresholds for all splits and alphas come from one
sort of the calibration scores; standard set sizes are a binary search in each row's rank-ordered scores
(sets of LAC, APS and RAPS are prefixes of the classes ranked by probability, so the size is the number of
rank-ordered scores <= q); class-wise set sizes are one comparison per test row; all metrics are bincounts
over the split axis. The metrics are computed from the two sufficient statistics of a set, its size and
whether it covers the label; ``tests/stages/test_evaluate.py`` checks them against :mod:`cact_ops.metrics`
applied to the explicit sets, and against a plain loop reference.

Randomness (the splits and the APS/RAPS U) comes from ``EvalConfig.seed`` only: a rerun gives identical
numbers. U is drawn once per pool sample (shared by APS and RAPS and by every method: common random numbers
make method comparisons paired); each split then uses independent U's for its calibration and test samples.

CLI (re-evaluate a finished run, no retraining)::

    python -m stages.evaluate runs/digits --alphas 0.1 0.05 0.2 --scores lac aps --n-splits 50
"""
from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cact_ops import methods as registry
from cact_ops.cp import conformal_rank
from cact_ops.methods import order_key
from cact_ops.metrics import DEFAULT_SIZE_BINS, SHOT_GROUPS, paired_difference, shot_groups

from . import _io

log = logging.getLogger(__name__)

SCORES = ("lac", "aps", "raps")
# Up to this many (split x alpha) thresholds, LAC's standard set sizes are counted directly (one comparison pass
# each) rather than after a sort of every row (which costs about as much as 4-8 comparison passes).
_DIRECT_COUNT_MAX = 4
PREDICTORS = ("standard", "classwise")
# Metrics compared with the control, split by split: summary columns <metric>_diff_mean, _diff_lo, _diff_hi.
PAIRED_METRICS = ("size", "covgap", "few_size", "coverage", "accuracy", "medium_size", "many_size")
PAIRED_COLUMNS = tuple(f"{m}_diff_{s}" for m in PAIRED_METRICS for s in ("mean", "lo", "hi")) + ("control",)
SUMMARY_COLUMNS = (
    "method", "score", "predictor", "alpha", "n_splits", "accuracy", "coverage_mean", "coverage_std",
    "size_mean", "size_std", "covgap_mean", "covgap_std", "undercovered_mean", "sscv_mean",
    "many_size_mean", "medium_size_mean", "few_size_mean", "inf_threshold_frac",
) + PAIRED_COLUMNS
PER_SPLIT_METRICS = ("accuracy", "coverage", "size", "covgap", "undercovered", "sscv", "many_size", "medium_size",
                     "few_size")
PER_SPLIT_COLUMNS = ("method", "score", "predictor", "alpha", "split") + PER_SPLIT_METRICS
PER_CLASS_COLUMNS = (
    "method", "score", "predictor", "alpha", "class", "class_name", "shot", "train_count", "test_count",
    "coverage_mean", "size_mean",
)


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
    scores: Sequence[str] = SCORES
    predictors: Sequence[str] = PREDICTORS
    alphas: Sequence[float] = (0.1, 0.05)
    n_splits: int = 20  # R random calibration/test splits of the pool
    cal_fraction: float = 0.5  # share of each class's pool points that goes to calibration
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
        for name, values, known in (("score", self.scores, SCORES), ("predictor", self.predictors, PREDICTORS)):
            bad = [v for v in values if v not in known]
            if bad or not values:
                raise ValueError(f"unknown or no {name}(s) {bad}; known: {', '.join(known)}")
        if not self.alphas or any(not 0.0 < a < 1.0 for a in self.alphas):
            raise ValueError(f"alphas must be non-empty and lie in (0, 1), got {self.alphas}")
        if len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"alphas must be distinct, got {self.alphas}")
        if self.n_splits < 1:
            raise ValueError(f"n_splits must be >= 1, got {self.n_splits}")
        if not 0.0 < self.cal_fraction < 1.0:
            raise ValueError(f"cal_fraction must lie in (0, 1), got {self.cal_fraction}")
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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, f"logits file not found: {path} (run stages.infer first)", str(path))
    table = pq.read_table(path)
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
    path = Path(splits_root) / "manifest.json"
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
    root = Path(run_dir) / "logits"
    found = sorted(p.parent.name for p in root.glob("*/pool.parquet")) if root.is_dir() else []
    return tuple(sorted(found, key=order_key))


# ----------------------------------------------------------------------------------------------------------
# The evaluation engine: pure tensor functions


def _stream_seed(seed: int, stream: str) -> int:
    """An independent 63-bit seed per random stream ("splits", "u"), derived from the one config seed."""
    state = np.random.SeedSequence([int(seed), zlib.crc32(stream.encode())]).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


def split_indices(labels: torch.Tensor, n_splits: int, cal_fraction: float = 0.5, seed: int = 0):
    """Stratified random calibration/test splits of a pool: index tensors ``cal`` [R, n_cal], ``test`` [R, n_test].

    Class k gives ``floor(cal_fraction * n_k + 0.5)`` calibration points to every split. Both halves are grouped
    by class in ascending order, so ``labels[cal[r]]`` (and ``labels[test[r]]``) is the same for every split r.
    One argsort of random keys offset by the label does the grouping and the shuffle at once.

    >>> cal, test = split_indices(torch.tensor([0, 1, 0, 1, 1, 0]), n_splits=3)
    >>> cal.shape, torch.tensor([0, 1, 0, 1, 1, 0])[cal[0]].tolist()
    (torch.Size([3, 4]), [0, 0, 1, 1])
    """
    labels = torch.as_tensor(labels).long().cpu()
    n = labels.numel()
    gen = torch.Generator().manual_seed(_stream_seed(seed, "splits"))
    keys = torch.rand(n_splits, n, generator=gen, dtype=torch.float64) + labels.double()
    perm = keys.argsort(dim=1, stable=True)
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if n else 0)
    sorted_labels = labels.sort().values
    starts = counts.cumsum(0) - counts
    position = torch.arange(n) - starts[sorted_labels]
    n_cal = torch.floor(counts.double() * cal_fraction + 0.5).long()
    is_cal = position < n_cal[sorted_labels]
    return perm[:, is_cal], perm[:, ~is_cal]


def draw_u(n: int, seed: int = 0) -> torch.Tensor:
    """U ~ Unif(0, 1) per pool sample for randomised APS/RAPS (float64, seeded).

    >>> bool((draw_u(4, seed=1) == draw_u(4, seed=1)).all())
    True
    """
    gen = torch.Generator().manual_seed(_stream_seed(seed, "u"))
    return torch.rand(n, generator=gen, dtype=torch.float64)


@dataclass
class RankedPool:
    """Probabilities of every pool row sorted in decreasing order, once per method (shared by all scores).

    ``tie_*`` list the entries whose probability equals the one ranked just above: a tied class gets the score
    of its group's first rank, so a score depends on the probabilities only (sum of strictly larger p's for
    APS, 1 + number of strictly larger p's as the RAPS rank), whatever order the sort put ties in.
    """

    probs: torch.Tensor  # [n, K]
    desc: torch.Tensor  # [n, K] probabilities, largest first
    order: torch.Tensor | None  # [n, K] class at each rank; only built when class-order scores are needed
    rank_y: torch.Tensor  # [n] 0-based rank of the true class (number of strictly larger probabilities)
    tie_rows: torch.Tensor
    tie_cols: torch.Tensor
    tie_start: torch.Tensor


# On the CPU, NumPy's sort, comparisons and bool counts are several times faster than torch's (measured on the
# CI machine); elsewhere the torch code runs on the tensors' device. Tests switch this off to run that code here.
_NUMPY_ON_CPU = True


def _numpy_path(t: torch.Tensor) -> bool:
    return _NUMPY_ON_CPU and t.device.type == "cpu"


def _in_threads(fn, n: int, min_block: int = 1024) -> None:
    """Run ``fn(slice)`` over up to ``torch.get_num_threads()`` contiguous blocks of ``range(n)`` in threads.

    NumPy releases the GIL in sorts, ufuncs and reductions, so blocks run in parallel (NumPy itself is
    single-threaded); with one thread, or fewer than two blocks of ``min_block``, it is a plain call.
    """
    parts = max(1, min(torch.get_num_threads(), n // max(min_block, 1)))
    if parts == 1:
        fn(slice(0, n))
        return
    bounds = np.linspace(0, n, parts + 1).astype(int)
    with ThreadPoolExecutor(parts) as pool:
        list(pool.map(fn, [slice(bounds[i], bounds[i + 1]) for i in range(parts)]))


def rank_pool(probs: torch.Tensor, labels: torch.Tensor, need_order: bool) -> RankedPool:
    """Sort each row of ``probs`` once, largest first (NumPy's SIMD sort on the CPU, ``torch.sort`` elsewhere)."""
    labels = labels.to(probs.device)
    cpu = _numpy_path(probs)
    if cpu:
        neg = np.negative(probs.numpy())  # ascending sort of -p = descending p, without a reversed copy
        if need_order:
            order_np = np.empty(neg.shape, dtype=np.int64)

            def argsort_rows(rows: slice):
                order_np[rows] = np.argsort(neg[rows], axis=1)

            _in_threads(argsort_rows, neg.shape[0])
            order = torch.from_numpy(order_np)
            desc = probs.gather(1, order)
        else:
            _in_threads(lambda rows: neg[rows].sort(axis=1), neg.shape[0])  # in place: np.sort would copy
            desc, order = torch.from_numpy(np.negative(neg, out=neg)), None
    else:
        desc, order = probs.sort(dim=1, descending=True)
        order = order if need_order else None
    tied = desc[:, 1:] == desc[:, :-1]
    rows, cols = tied.nonzero(as_tuple=True)
    cols = cols + 1
    start = cols - 1
    # Runs of ties are short; walk each tied entry back to its group's first rank.
    while True:
        more = (start > 0) & tied[rows, (start - 1).clamp(min=0)]
        if not bool(more.any()):
            break
        start = torch.where(more, start - 1, start)
    p_y = probs.gather(1, labels[:, None])
    rank_y = _count_true(torch.from_numpy(probs.numpy() > p_y.numpy()) if cpu else probs > p_y)
    return RankedPool(probs, desc, order, rank_y, rows, cols, start)


def _count_true(mask: torch.Tensor) -> torch.Tensor:
    """Per-row number of True entries of a bool [n, K] mask (NumPy on the CPU: several times faster there)."""
    if _numpy_path(mask):
        return torch.from_numpy(mask.numpy().sum(axis=1, dtype=np.int64))
    return mask.sum(dim=1)


def classwise_sizes(s_class: torch.Tensor, test: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Class-wise set sizes |{k : s(x, k) <= q_k}| of the test rows: [R, A, m] from scores [n, K], q [R, A, K].

    The one O(m K) step per (split, alpha); the rows of a split are gathered once and shared by the alphas.
    """
    r_, a_, _ = q.shape
    m = test.shape[1]
    if not _numpy_path(s_class):
        out = torch.empty(r_, a_, m, dtype=torch.int64, device=s_class.device)
        for r in range(r_):
            rows = s_class.index_select(0, test[r])
            for a in range(a_):
                out[r, a] = (rows <= q[r, a]).sum(dim=1)
        return out
    s_np, q_np, test_np = s_class.numpy(), q.numpy(), test.numpy()
    out = np.empty((r_, a_, m), dtype=np.int64)

    def splits(block: slice):  # one thread per block of splits, each with its own buffers
        rows = np.empty((m, s_np.shape[1]), dtype=s_np.dtype)
        mask = np.empty(rows.shape, dtype=bool)
        for r in range(block.start, block.stop):
            np.take(s_np, test_np[r], axis=0, out=rows)
            for a in range(a_):
                np.less_equal(rows, q_np[r, a], out=mask)
                out[r, a] = mask.sum(axis=1, dtype=np.int32)

    _in_threads(splits, r_, min_block=1 if m * s_np.shape[1] >= 1 << 20 else r_)  # threads for big splits only
    return torch.from_numpy(out)


def rank_ordered_scores(ranked: RankedPool, score: str, u: torch.Tensor | None, lam: float = 0.01,
                        k_reg: int = 5) -> torch.Tensor:
    """Non-conformity scores s(x, k) in rank order (column r = the class with the r-th largest probability).

    Same definitions as :mod:`cact_ops.scores`: LAC 1 - p; APS = mass of strictly more probable classes + U p;
    RAPS = APS + lam * max(0, rank - k_reg). Each row is non-decreasing, exactly, also in floating point: APS
    uses the exclusive cumulative sum (not cumsum - p), and fl() is monotone. So a standard set is a prefix of
    the rank order and its size is a binary search.

    >>> p = torch.tensor([[0.2, 0.7, 0.1]])
    >>> rank_ordered_scores(rank_pool(p, torch.tensor([0]), False), "aps", u=torch.ones(1))
    tensor([[0.7000, 0.9000, 1.0000]])
    """
    d = ranked.desc
    if score == "lac":
        return 1.0 - d  # ties already share their value
    if score not in ("aps", "raps"):
        raise ValueError(f"unknown score {score!r}; known: {', '.join(SCORES)}")
    u = torch.ones(d.shape[0], dtype=d.dtype, device=d.device) if u is None else u.to(d.device, d.dtype)
    s = torch.empty_like(d)
    s[:, 0] = 0
    torch.cumsum(d[:, :-1], dim=1, out=s[:, 1:])  # exclusive cumulative mass: sum of strictly higher ranks
    s.addcmul_(u[:, None], d)
    if score == "raps":
        rank = torch.arange(1, d.shape[1] + 1, device=d.device, dtype=d.dtype)
        s += lam * (rank - k_reg).clamp(min=0)
    if ranked.tie_rows.numel():
        s[ranked.tie_rows, ranked.tie_cols] = s[ranked.tie_rows, ranked.tie_start]
    return s


def class_ordered_scores(ranked: RankedPool, score: str, s_rank: torch.Tensor) -> torch.Tensor:
    """The same scores in class order (column k = class k), for class-wise thresholds."""
    if score == "lac":
        return 1.0 - ranked.probs
    if ranked.order is None:
        raise ValueError("rank_pool(..., need_order=True) is needed for class-order APS/RAPS scores")
    return torch.empty_like(s_rank).scatter_(1, ranked.order, s_rank)


def thresholds(cal_scores: torch.Tensor, cal_labels: torch.Tensor, alphas: Sequence[float], num_classes: int,
               classwise: bool):
    """Conformal thresholds for R splits at once: [R, A] (standard) or [R, A, K] (class-wise), and the share of
    +inf thresholds per alpha ([A]).

    ``cal_scores`` [R, n_cal] are true-class scores whose columns are grouped by class as ``cal_labels`` (the
    layout of :func:`split_indices`). Ranks come from :func:`cact_ops.cp.conformal_rank`; a rank above the
    number of calibration points gives +inf (full sets).

    >>> q, inf = thresholds(torch.tensor([[0.3, 0.1, 0.2]], dtype=torch.float64), torch.tensor([0, 0, 1]),
    ...                     [0.4], 2, classwise=False)
    >>> q.tolist(), inf.tolist()
    ([[0.3]], [0.0])
    """
    r, n_cal = cal_scores.shape
    inf = torch.tensor(float("inf"), dtype=cal_scores.dtype, device=cal_scores.device)
    if not classwise:
        ranks = [conformal_rank(n_cal, a) for a in alphas]
        srt = cal_scores.sort(dim=1).values
        q = torch.stack([srt[:, k - 1] if k <= n_cal else inf.expand(r) for k in ranks], dim=1)
        return q, torch.tensor([float(k > n_cal) for k in ranks], dtype=torch.float64)
    counts = torch.bincount(cal_labels.cpu(), minlength=num_classes)
    starts = counts.cumsum(0) - counts
    vals, idx = cal_scores.sort(dim=1, stable=True)
    # Stable re-sort by class: scores ascending inside each class's block, blocks at fixed positions.
    by_class = vals.gather(1, cal_labels.to(idx.device)[idx].argsort(dim=1, stable=True))
    qs, fracs = [], []
    for a in alphas:
        ranks = torch.tensor([conformal_rank(int(c), a) for c in counts.tolist()])
        ok = ranks <= counts
        pos = (starts + ranks - 1).clamp(0, max(n_cal - 1, 0)).to(cal_scores.device)
        picked = by_class[:, pos] if n_cal else inf.expand(r, num_classes)
        qs.append(torch.where(ok.to(cal_scores.device), picked, inf))
        fracs.append(float((~ok).double().mean()))
    return torch.stack(qs, dim=1), torch.tensor(fracs, dtype=torch.float64)


def set_metrics(covered: torch.Tensor, sizes: torch.Tensor, labels: torch.Tensor, alphas: Sequence[float],
                num_classes: int, groups: torch.Tensor, size_bins=DEFAULT_SIZE_BINS) -> dict[str, torch.Tensor]:
    """All set metrics of :mod:`cact_ops.metrics` from per-sample statistics, batched over splits and alphas.

    ``covered`` (bool) and ``sizes`` (int) are [..., A, m] (A = len(alphas)) over the test samples with labels
    ``labels`` [m]; ``groups`` [K] is :func:`cact_ops.metrics.shot_groups`. Returns float64 tensors:
    ``coverage``, ``size``, ``covgap``, ``undercovered``, ``sscv``, ``many_size``/``medium_size``/``few_size`` of shape [..., A], and
    ``class_coverage``, ``class_size`` [..., A, K] (NaN for classes without a test sample).

    >>> m = set_metrics(torch.tensor([[True, False]]), torch.tensor([[1, 2]]), torch.tensor([0, 1]), [0.1], 2,
    ...                 torch.tensor([0, 2]))
    >>> m["coverage"].tolist(), m["covgap"].tolist(), m["few_size"].tolist()
    ([0.5], [50.0], [2.0])
    """
    dev = covered.device
    labels = labels.to(dev)
    cov = covered.to(torch.float64)
    size = sizes.to(torch.float64)
    # [A]: broadcasts over the alpha axis of [..., A] results; target[:, None] over [..., A, K] ones.
    target = torch.tensor([1.0 - a for a in alphas], dtype=torch.float64, device=dev)

    def per_bin(values, bins, n_bins):  # sums of values per bin along the last axis
        out = torch.zeros(*values.shape[:-1], n_bins, dtype=torch.float64, device=dev)
        return out.scatter_add_(-1, bins.expand_as(values), values)

    n_k = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    present = n_k > 0
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=dev)
    class_cov = torch.where(present, per_bin(cov, labels, num_classes) / n_k.clamp(min=1), nan)
    class_size = torch.where(present, per_bin(size, labels, num_classes) / n_k.clamp(min=1), nan)
    gap = (class_cov[..., present] - target[:, None]).abs()
    under = (class_cov[..., present] < target[:, None]).to(torch.float64)
    # SSCV: bucketize puts size <= edge[i] in stratum i, as cact_ops.metrics.sscv does.
    edges = torch.as_tensor(size_bins, dtype=sizes.dtype, device=dev)
    stratum = torch.bucketize(sizes, edges, right=False)
    n_strata = len(size_bins) + 1
    s_count = per_bin(torch.ones_like(cov), stratum, n_strata)
    s_hits = per_bin(cov, stratum, n_strata)
    viol = torch.where(s_count > 0, (s_hits / s_count.clamp(min=1) - target[:, None]).abs(), -torch.inf)
    g = groups.to(dev)[labels]
    g_count = torch.bincount(g, minlength=len(SHOT_GROUPS)).to(torch.float64)
    g_size = torch.where(g_count > 0, per_bin(size, g, len(SHOT_GROUPS)) / g_count.clamp(min=1), nan)
    out = {
        "coverage": cov.mean(-1),
        "size": size.mean(-1),
        "covgap": 100.0 * gap.mean(-1) if bool(present.any()) else nan.expand(cov.shape[:-1]),
        "undercovered": under.mean(-1) if bool(present.any()) else nan.expand(cov.shape[:-1]),
        "sscv": viol.amax(-1),
        "class_coverage": class_cov,
        "class_size": class_size,
    }
    for i, name in enumerate(SHOT_GROUPS):
        out[f"{name}_size"] = g_size[..., i]
    return out


@dataclass
class ScoreResult:
    """Metrics of one (score, predictor) over R splits x A alphas (tensors [R, A] and [R, A, K])."""

    score: str
    predictor: str
    metrics: dict[str, torch.Tensor]
    inf_frac: torch.Tensor  # [A] share of +inf thresholds


def evaluate_pool(logits: torch.Tensor, labels: torch.Tensor, train_counts: Sequence[int],
                  scores: Sequence[str] = SCORES, predictors: Sequence[str] = PREDICTORS,
                  alphas: Sequence[float] = (0.1, 0.05), n_splits: int = 20, cal_fraction: float = 0.5,
                  seed: int = 0, raps_lam: float = 0.01, raps_k_reg: int = 5, randomized: bool = True,
                  device: str = "cpu", dtype: torch.dtype = torch.float32, splits=None):
    """Hard split CP of one method's pool logits over ``n_splits`` splits: (accuracy [R], list of ScoreResult).

    ``splits`` may pass precomputed ``(cal, test)`` from :func:`split_indices` (the benchmark and the tests do);
    by default they are drawn from ``seed``.

    >>> _ = torch.manual_seed(0); x = torch.randn(200, 3); y = x.argmax(1)
    >>> acc, res = evaluate_pool(x, y, [50, 20, 5], scores=["lac"], predictors=["standard"], n_splits=2)
    >>> acc.tolist(), res[0].metrics["coverage"].shape
    ([1.0, 1.0], torch.Size([2, 2]))
    """
    num_classes = logits.shape[1]
    labels = labels.long()
    cal, test = split_indices(labels, n_splits, cal_fraction, seed) if splits is None else splits
    dev = torch.device(device)
    logits, labels_d = logits.to(dev, dtype), labels.to(dev)
    cal, test = cal.to(dev), test.to(dev)
    y_cal, y_test = labels_d[cal[0]], labels_d[test[0]]
    groups = shot_groups(train_counts)
    if groups.numel() != num_classes:
        raise ValueError(f"train_counts has {groups.numel()} classes but logits have {num_classes}")
    accuracy = (logits.argmax(dim=1) == labels_d)[test].to(torch.float64).mean(dim=1)
    probs = torch.softmax(logits, dim=1)
    r_, a_ = cal.shape[0], len(alphas)
    # One sort of every row serves APS/RAPS and LAC's standard sizes (a binary search per threshold). LAC alone
    # with a few thresholds is cheaper without it: one comparison pass per (split, alpha).
    need_sort = any(s != "lac" for s in scores) or ("standard" in predictors and r_ * a_ > _DIRECT_COUNT_MAX)
    need_order = "classwise" in predictors and any(s != "lac" for s in scores)
    ranked = rank_pool(probs, labels_d, need_order) if need_sort else None
    u = draw_u(len(labels), seed).to(dev, dtype) if randomized else None
    results = []
    for score in scores:
        if score == "lac":
            s_rank = None if ranked is None else rank_ordered_scores(ranked, score, u)
            s_class = 1.0 - probs if ("classwise" in predictors or s_rank is None) else None
            true = 1.0 - probs.gather(1, labels_d[:, None]).squeeze(1)  # = s_rank at the label's rank, bit for bit
        else:
            s_rank = rank_ordered_scores(ranked, score, u, raps_lam, raps_k_reg)
            true = s_rank.gather(1, ranked.rank_y[:, None]).squeeze(1)
            s_class = class_ordered_scores(ranked, score, s_rank) if "classwise" in predictors else None
        t_cal, t_test = true[cal], true[test]
        for predictor in predictors:
            classwise = predictor == "classwise"
            q, inf_frac = thresholds(t_cal, y_cal, alphas, num_classes, classwise)
            if classwise:
                covered = t_test[:, None, :] <= q[:, :, y_test]
                sizes = classwise_sizes(s_class, test, q)
            elif s_rank is None:
                covered = t_test[:, None, :] <= q[:, :, None]
                sizes = classwise_sizes(s_class, test, q[:, :, None].expand(r_, a_, num_classes).contiguous())
            else:
                covered = t_test[:, None, :] <= q[:, :, None]
                # Every pool row at once: one binary search per (row, split, alpha) in the row's sorted scores.
                flat = q.reshape(1, r_ * a_).expand(s_rank.shape[0], r_ * a_).contiguous()
                all_sizes = torch.searchsorted(s_rank, flat, right=True).view(-1, r_, a_)
                sizes = all_sizes.permute(1, 2, 0).gather(2, test[:, None, :].expand(r_, a_, -1))
            metrics = set_metrics(covered, sizes, y_test, alphas, num_classes, groups)
            results.append(ScoreResult(score, predictor, metrics, inf_frac))
    return accuracy, results


# ----------------------------------------------------------------------------------------------------------
# Summaries


def _std(x: torch.Tensor) -> float:
    return float(x.std(correction=1)) if x.numel() > 1 else float("nan")


def summarize(method: str, accuracy: torch.Tensor, results: Sequence[ScoreResult], alphas: Sequence[float],
              classes: Sequence[str], train_counts: Sequence[int], test_counts: Sequence[int]):
    """Rows of ``summary`` and ``per_class`` (lists of dicts) for one method: means (and stds) over splits."""
    groups = shot_groups(train_counts).tolist()
    acc = float(accuracy.mean())
    summary, per_class = [], []
    for res in results:
        m = {k: v.cpu() for k, v in res.metrics.items()}
        for a, alpha in enumerate(alphas):
            summary.append({
                "method": method, "score": res.score, "predictor": res.predictor, "alpha": float(alpha),
                "n_splits": int(accuracy.numel()), "accuracy": acc,
                "coverage_mean": float(m["coverage"][:, a].mean()), "coverage_std": _std(m["coverage"][:, a]),
                "size_mean": float(m["size"][:, a].mean()), "size_std": _std(m["size"][:, a]),
                "covgap_mean": float(m["covgap"][:, a].mean()), "covgap_std": _std(m["covgap"][:, a]),
                "undercovered_mean": float(m["undercovered"][:, a].mean()),
                "sscv_mean": float(m["sscv"][:, a].mean()),
                **{f"{g}_size_mean": float(m[f"{g}_size"][:, a].mean()) for g in SHOT_GROUPS},
                "inf_threshold_frac": float(res.inf_frac[a]),
            })
            cov_k = m["class_coverage"][:, a].mean(0).tolist()
            size_k = m["class_size"][:, a].mean(0).tolist()
            for k, name in enumerate(classes):
                per_class.append({
                    "method": method, "score": res.score, "predictor": res.predictor, "alpha": float(alpha),
                    "class": k, "class_name": str(name), "shot": SHOT_GROUPS[groups[k]],
                    "train_count": int(train_counts[k]), "test_count": int(test_counts[k]),
                    "coverage_mean": cov_k[k], "size_mean": size_k[k],
                })
    return summary, per_class


def per_split_rows(method: str, accuracy: torch.Tensor, results: Sequence[ScoreResult],
                   alphas: Sequence[float]) -> list[dict]:
    """Rows of ``per_split`` for one method: the values of every split that :func:`summarize` averages."""
    acc = accuracy.cpu().tolist()
    rows = []
    for res in results:
        m = {k: res.metrics[k].cpu() for k in PER_SPLIT_METRICS if k != "accuracy"}
        for a, alpha in enumerate(alphas):
            values = {k: v[:, a].tolist() for k, v in m.items()}
            for r in range(len(acc)):
                rows.append({"method": method, "score": res.score, "predictor": res.predictor, "alpha": float(alpha),
                             "split": r, "accuracy": acc[r], **{k: v[r] for k, v in values.items()}})
    return rows


def paired_differences(per_split: pl.DataFrame, control: str | None = None) -> pl.DataFrame:
    """Per (method, score, predictor, alpha): the paired mean of (method - control) over the splits and its 95%
    Student-t interval (:func:`cact_ops.metrics.paired_difference`) for ``PAIRED_METRICS``, and ``control``.

    ``control`` defaults to :func:`cact_ops.methods.control`. Rows of the control itself, and every row when the
    control is not in ``per_split``, have NaN differences and a null ``control``. The splits are matched by
    index, which pairs them: every method was evaluated on the same splits.
    """
    control = registry.control() if control is None else control
    by_block = {key: d.sort("split") for key, d in
                per_split.filter(pl.col("method") == control).group_by(["score", "predictor", "alpha"])}
    nan = float("nan")
    rows = []
    keys = ["method", "score", "predictor", "alpha"]
    for (method, score, predictor, alpha), d in per_split.group_by(keys, maintain_order=True):
        row = {"method": method, "score": score, "predictor": predictor, "alpha": alpha,
               **{c: nan for c in PAIRED_COLUMNS[:-1]}, "control": None}
        ref = by_block.get((score, predictor, alpha))
        if method != control and ref is not None:
            d = d.sort("split")
            if not d["split"].equals(ref["split"]):
                raise ValueError(f"{method} and {control} were evaluated on different splits ({score}, {predictor}, "
                                 f"alpha={alpha}): no paired comparison")
            for metric in PAIRED_METRICS:
                mean, lo, hi = paired_difference(d[metric].to_numpy(), ref[metric].to_numpy())
                row |= {f"{metric}_diff_mean": mean, f"{metric}_diff_lo": lo, f"{metric}_diff_hi": hi}
            row["control"] = control
        rows.append(row)
    return _frame(rows, keys + list(PAIRED_COLUMNS))


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
    run_dir = Path(config.run_dir)
    splits_root = Path(config.splits_root) if config.splits_root else run_dir / "splits"
    manifest = read_manifest(splits_root)
    methods = tuple(sorted(config.methods, key=order_key)) if config.methods else discover_methods(run_dir)
    if not methods:
        raise FileNotFoundError(2, f"no logits found under {run_dir / 'logits'} (run stages.infer first)",
                                str(run_dir / "logits"))
    classes, train_counts = manifest["classes"], manifest["counts"]["train"]
    dtype = getattr(torch, config.dtype)
    summary_rows, class_rows, split_rows, inputs = [], [], [], {}
    reference, splits = None, None
    for method in methods:
        t0 = time.perf_counter()
        pool = read_logits(run_dir / "logits" / method / "pool.parquet")
        check_against_manifest(pool, manifest)
        if reference is None:
            reference = pool
            splits = split_indices(pool.labels, config.n_splits, config.cal_fraction, config.seed)
        elif not (np.array_equal(pool.sample_id, reference.sample_id)
                  and torch.equal(pool.labels, reference.labels)):
            raise ValueError(f"{pool.path}: sample_id/label differ from {reference.path}; all methods must be "
                             "evaluated on the same pool")
        inputs[str(pool.path.relative_to(run_dir))] = _io.sha256_file(pool.path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one clear warning per alpha below, not one per split
            accuracy, results = evaluate_pool(
                pool.logits, pool.labels, train_counts, config.scores, config.predictors, config.alphas,
                config.n_splits, config.cal_fraction, config.seed, config.raps_lam, config.raps_k_reg,
                config.randomized, config.device, dtype, splits=splits)
        test_counts = torch.bincount(pool.labels[splits[1][0]], minlength=len(classes)).tolist()
        rows, cls_rows = summarize(method, accuracy, results, config.alphas, classes, train_counts, test_counts)
        summary_rows += rows
        class_rows += cls_rows
        split_rows += per_split_rows(method, accuracy, results, config.alphas)
        log.info("evaluated %s: %d rows x %d classes, %d splits, %.2fs", method, pool.logits.shape[0],
                 pool.logits.shape[1], config.n_splits, time.perf_counter() - t0)
        del pool
    per_split = _frame(split_rows, PER_SPLIT_COLUMNS)
    summary = _frame(summary_rows, SUMMARY_COLUMNS[:-len(PAIRED_COLUMNS)]).join(
        paired_differences(per_split), on=["method", "score", "predictor", "alpha"], how="left",
        maintain_order="left")
    per_class = _frame(class_rows, PER_CLASS_COLUMNS)
    _warn_infinite(summary, splits[0].shape[1])
    out = run_dir / "eval"
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
    p.add_argument("--scores", nargs="+", default=list(SCORES), choices=SCORES)
    p.add_argument("--predictors", nargs="+", default=list(PREDICTORS), choices=PREDICTORS)
    p.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.05])
    p.add_argument("--n-splits", type=int, default=20)
    p.add_argument("--cal-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raps-lam", type=float, default=0.01)
    p.add_argument("--raps-k-reg", type=int, default=5)
    p.add_argument("--no-randomized", action="store_true", help="APS/RAPS with U = 1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--no-report", action="store_true", help="skip report.md and the plots")
    a = p.parse_args(argv)
    return EvalConfig(run_dir=a.run_dir, splits_root=a.splits_root, methods=a.methods, scores=a.scores,
                      predictors=a.predictors, alphas=a.alphas, n_splits=a.n_splits, cal_fraction=a.cal_fraction,
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
