"""Evaluation stage: agreement with a plain loop reference, with cact_ops.metrics, reruns, and bad inputs.

The run folders are written by hand (manifest + logits Parquet), so these tests need neither the split build
nor training nor Ray.
"""
from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cact_ops import engine as CP
from cact_ops import metrics as M
from cact_ops import ranking, scores as S
from stages import evaluate as E

# The toy pool's smallest class is deliberately too small for a class-wise threshold; tests that care assert it.
pytestmark = pytest.mark.filterwarnings("ignore:pool too small")

POOL_COUNTS = [60, 50, 40, 30, 20, 9]  # class 5: 5 calibration points, too few for a class-wise q at 0.1
TRAIN_COUNTS = [500, 200, 100, 50, 20, 5]
CLASSES = ["airplane", "bird", "cat", "deer", "frog", "ship"]


def make_logits(counts, seed: int, signal: float = 1.5, ties: bool = True, labels=None):
    """Shuffled labels (``counts`` per class) and float32 logits with some signal and a few exact ties."""
    rng = np.random.default_rng(seed)
    if labels is None:
        labels = np.repeat(np.arange(len(counts)), counts)
        rng.shuffle(labels)
    logits = rng.normal(size=(len(labels), len(counts))) + signal * np.eye(len(counts))[labels]
    logits = logits.astype(np.float32)
    if ties and len(counts) >= 4:  # equal logits give equal probabilities: exercises the tie rule of APS/RAPS
        logits[::7, 2] = logits[::7, 1]
        logits[::11, 3] = logits[::11, 0]
    return labels, logits


def write_logits(path: Path, sample_id, labels, logits, fmt: str = "list") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {"sample_id": pa.array(sample_id, pa.int64()), "label": pa.array(labels, pa.int64())}
    if fmt == "list":
        k = logits.shape[1]
        cols["logits"] = pa.FixedSizeListArray.from_arrays(pa.array(logits.ravel(), pa.float32()), k)
    else:
        cols.update({f"logit_{j}": pa.array(logits[:, j], pa.float32()) for j in range(logits.shape[1])})
    pq.write_table(pa.table(cols), path)
    return path


def make_run(root: Path, methods=("ce", "cact"), counts=POOL_COUNTS, train_counts=TRAIN_COUNTS,
             classes=CLASSES, history: bool = False) -> Path:
    """A run folder as infer/train leave it: splits/manifest.json, logits/<method>/pool.parquet, config.json."""
    run = root / "run"
    (run / "splits").mkdir(parents=True)
    manifest = {"dataset": "toy", "classes": list(classes), "num_classes": len(classes),
                "counts": {"train": list(train_counts), "val": [5] * len(classes), "pool": list(counts)},
                "payload": {"kind": "pixels", "column": "pixels", "shape": [2, 2, 1]}, "model_family": "small_cnn"}
    (run / "splits" / "manifest.json").write_text(json.dumps(manifest))
    (run / "config.json").write_text(json.dumps({"dataset": "toy", "epochs": 3, "methods": list(methods)}))
    labels, _ = make_logits(counts, seed=10)
    ids = np.arange(len(labels)) * 3 + 100
    for i, m in enumerate(methods):
        _, logits = make_logits(counts, seed=10 + i, labels=labels)
        # Same pool for every method, rows in a different order: evaluation aligns them by sample_id.
        order = np.random.default_rng(i).permutation(len(labels))
        write_logits(run / "logits" / m / "pool.parquet", ids[order], labels[order], logits[order])
        if history:
            k = len(classes)
            rows = [{"method": m, "epoch": e, "class": c, "lambda": (1e-6 if m == "ce" else 0.1 * (e + 1) * (c + 1)),
                     "rho": 1.0, "constraint": 0.5 - 0.1 * e, "val_coverage": 0.9, "val_size": 2.0 - 0.1 * e}
                    for e in range(4) for c in range(k)]
            (run / "train" / m).mkdir(parents=True)
            pl.DataFrame(rows).write_parquet(run / "train" / m / "history.parquet")
    return run


# ----------------------------------------------------------------------------------------------------------
# A straightforward reference: NumPy float64, explicit loops, exact conformal ranks.


def ref_scores(logits: np.ndarray, score: str, u: np.ndarray, lam: float, k_reg: int) -> np.ndarray:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    n, k = p.shape
    s = np.empty((n, k))
    for i in range(n):
        for c in range(k):
            above = sum(p[i, j] for j in range(k) if p[i, j] > p[i, c])
            rank = 1 + sum(1 for j in range(k) if p[i, j] > p[i, c])
            if score == "lac":
                s[i, c] = 1 - p[i, c]
            elif score == "aps":
                s[i, c] = above + u[i] * p[i, c]
            else:
                s[i, c] = above + u[i] * p[i, c] + lam * max(0, rank - k_reg)
    return s


def ref_quantile(values, alpha: float) -> float:
    n = len(values)
    rank = math.ceil((n + 1) * (1 - Fraction(str(alpha))))
    return float("inf") if rank > n else float(sorted(values)[rank - 1])


def ref_shot_groups(train_counts):
    k = len(train_counts)
    if k > 10:
        return [0 if c > 100 else 1 if c >= 20 else 2 for c in train_counts]
    order = sorted(range(k), key=lambda c: -train_counts[c])
    groups = [0] * k
    for pos, c in enumerate(order):
        groups[c] = 0 if pos < math.ceil(k / 3) else 1 if pos < math.ceil(2 * k / 3) else 2
    return groups


def ref_metrics(sets: np.ndarray, y: np.ndarray, alpha: float, train_counts) -> dict:
    m, k = sets.shape
    covered = np.array([sets[i, y[i]] for i in range(m)])
    sizes = sets.sum(axis=1)
    cov_k, size_k = [], []
    for c in range(k):
        idx = [i for i in range(m) if y[i] == c]
        cov_k.append(np.mean(covered[idx]) if idx else np.nan)
        size_k.append(np.mean(sizes[idx]) if idx else np.nan)
    present = [c for c in range(k) if not np.isnan(cov_k[c])]
    strata = [(0, 1), (2, 3), (4, 10), (11, 100), (101, 1000), (1001, 10**9)]
    viol = []
    for lo, hi in strata:
        idx = [i for i in range(m) if lo <= sizes[i] <= hi]
        if idx:
            viol.append(abs(np.mean(covered[idx]) - (1 - alpha)))
    groups = ref_shot_groups(train_counts)
    shot = {}
    for g, name in enumerate(("many", "medium", "few")):
        idx = [i for i in range(m) if groups[y[i]] == g]
        shot[name] = np.mean(sizes[idx]) if idx else np.nan
    return {"coverage": covered.mean(), "size": sizes.mean(),
            "covgap": 100 * np.mean([abs(cov_k[c] - (1 - alpha)) for c in present]),
            "undercovered": np.mean([cov_k[c] < 1 - alpha for c in present]), "sscv": max(viol),
            **{f"{g}_size": shot[g] for g in shot}, "class_coverage": cov_k, "class_size": size_k}


def reference_summary(logits, labels, cal, test, alphas, train_counts, u, lam=0.01, k_reg=5):
    rows = {}
    k = logits.shape[1]
    acc_splits = [np.mean([logits[i].argmax() == labels[i] for i in t]) for t in test]
    for score in ("lac", "aps", "raps"):
        s = ref_scores(logits, score, u, lam, k_reg)
        for predictor in ("standard", "classwise"):
            for alpha in alphas:
                per_split = []
                for c_idx, t_idx in zip(cal, test):
                    true_cal = [s[i, labels[i]] for i in c_idx]
                    if predictor == "standard":
                        q = np.full(k, ref_quantile(true_cal, alpha))
                    else:
                        q = np.array([ref_quantile([s[i, labels[i]] for i in c_idx if labels[i] == c], alpha)
                                      if any(labels[i] == c for i in c_idx) else np.inf for c in range(k)])
                    sets = np.array([[s[i, c] <= q[c] for c in range(k)] for i in t_idx])
                    per_split.append(ref_metrics(sets, labels[t_idx], alpha, train_counts))
                rows[(score, predictor, alpha)] = per_split, acc_splits
    return rows


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path)


def test_matches_loop_reference(run_dir):
    """Every summary and per-class number equals the loop reference on the same logits and split indices."""
    cfg = E.EvalConfig(run_dir, n_splits=3, alphas=(0.1, 0.05), dtype="float64", report=False)
    with pytest.warns(UserWarning, match="pool too small"):
        res = E.run(cfg)
    assert res.summary.columns == list(E.SUMMARY_COLUMNS)
    assert res.per_split.columns == list(E.PER_SPLIT_COLUMNS)
    assert res.summary.height == 2 * 3 * 2 * 2
    for method in ("ce", "cact"):
        pool = E.read_logits(run_dir / "logits" / method / "pool.parquet")
        labels = pool.labels.numpy()
        cal, test = CP.split_indices(pool.labels, 3, 0.5, seed=0)
        u = CP.draw_u(len(labels), seed=0).numpy()
        ref = reference_summary(pool.logits.numpy(), labels, cal.numpy(), test.numpy(), (0.1, 0.05),
                                TRAIN_COUNTS, u)
        for (score, predictor, alpha), (per_split, acc) in ref.items():
            key = ((pl.col("method") == method) & (pl.col("score") == score)
                   & (pl.col("predictor") == predictor) & (pl.col("alpha") == alpha))
            row = res.summary.filter(key).row(0, named=True)
            assert row["n_splits"] == 3
            assert row["accuracy"] == pytest.approx(np.mean(acc), abs=1e-12)
            for name in ("coverage", "size", "covgap"):
                vals = [s[name] for s in per_split]
                assert row[f"{name}_mean"] == pytest.approx(np.mean(vals), abs=1e-10), (score, predictor, alpha, name)
                assert row[f"{name}_std"] == pytest.approx(np.std(vals, ddof=1), abs=1e-10)
            for name in ("undercovered", "sscv", "many_size", "medium_size", "few_size"):
                assert row[f"{name}_mean"] == pytest.approx(np.mean([s[name] for s in per_split]), abs=1e-10), name
            splits = res.per_split.filter(key).sort("split")
            assert splits["split"].to_list() == [0, 1, 2]
            np.testing.assert_allclose(splits["accuracy"].to_numpy(), acc, atol=1e-12)
            for name in E.PER_SPLIT_METRICS[1:]:
                np.testing.assert_allclose(splits[name].to_numpy(), [s[name] for s in per_split], atol=1e-10)
            cls = res.per_class.filter(key).sort("class")
            assert cls["class_name"].to_list() == CLASSES
            assert cls["train_count"].to_list() == TRAIN_COUNTS
            np.testing.assert_allclose(cls["coverage_mean"].to_numpy(),
                                       np.mean([s["class_coverage"] for s in per_split], axis=0), atol=1e-10)
            np.testing.assert_allclose(cls["size_mean"].to_numpy(),
                                       np.mean([s["class_size"] for s in per_split], axis=0), atol=1e-10)
    # Calibration points per class: 30, 25, 20, 15, 10, 5. Rank ceil((n+1)(1-alpha)) exceeds n for the last
    # class at alpha=0.1 and for the last three at 0.05: +inf class thresholds (full sets).
    cw = res.summary.filter(pl.col("predictor") == "classwise")
    expected = cw["alpha"].replace_strict({0.1: 1 / 6, 0.05: 3 / 6}).to_list()
    assert cw["inf_threshold_frac"].to_list() == pytest.approx(expected, abs=1e-12)
    assert res.summary.filter(pl.col("predictor") == "standard")["inf_threshold_frac"].sum() == 0


def test_set_metrics_match_cact_ops_metrics():
    """The batched metrics the engine computes equal cact_ops.metrics' functions on the explicit sets."""
    g = torch.Generator().manual_seed(3)
    k, m = 12, 400
    sets = torch.rand(2, m, k, generator=g) < torch.rand(2, m, 1, generator=g)
    labels = torch.randint(0, k - 1, (m,), generator=g)  # class k-1 absent from the test labels
    train_counts = [300, 250, 150, 120, 90, 60, 40, 25, 19, 10, 5, 2]
    alphas = (0.1, 0.3)
    covered = sets[:, torch.arange(m), labels]
    got = M.set_metrics(covered, sets.sum(-1), labels, alphas, k, M.shot_groups(train_counts))
    for a, alpha in enumerate(alphas):
        s = sets[a]
        assert float(got["coverage"][a]) == pytest.approx(float(M.coverage(s, labels)), abs=1e-6)
        assert float(got["size"][a]) == pytest.approx(float(M.average_size(s)), abs=1e-5)
        assert float(got["covgap"][a]) == pytest.approx(float(M.covgap(s, labels, alpha, k)), abs=1e-4)
        assert float(got["undercovered"][a]) == pytest.approx(float(M.undercovered_ratio(s, labels, alpha, k)))
        assert float(got["sscv"][a]) == pytest.approx(float(M.sscv(s, labels, alpha)), abs=1e-6)
        torch.testing.assert_close(got["class_coverage"][a].float(), M.class_coverage(s, labels, k), equal_nan=True)
        torch.testing.assert_close(got["class_size"][a].float(), M.class_size(s, labels, k), equal_nan=True)
        for name, v in M.shot_group_sizes(s, labels, train_counts).items():
            assert float(got[f"{name}_size"][a]) == pytest.approx(float(v), abs=1e-5, nan_ok=True)


def test_scores_and_thresholds_match_cact_ops():
    """Rank-ordered scores give cact_ops.scores' values; thresholds equal cact_ops.cp.calibrate per split."""
    from cact_ops import cp, scores

    labels_np, logits_np = make_logits([30, 25, 20, 15], seed=5, ties=False)
    logits, labels = torch.from_numpy(logits_np).double(), torch.from_numpy(labels_np)
    probs = torch.softmax(logits, 1)
    ranked = ranking.rank_pool(probs, labels, need_order=True)
    u = CP.draw_u(len(labels), seed=1).double()
    expected = {"lac": scores.lac(probs), "aps": scores.aps(probs, u=u), "raps": scores.raps(probs, 0.1, 1, u=u)}
    params = {"raps": dict(lam=0.1, k_reg=1)}
    cal, _ = CP.split_indices(labels, 2, 0.5, seed=4)
    for name, want in expected.items():
        score = S.score_object(name)
        s = score.rank_scores(ranked, u, **params.get(name, {}))
        torch.testing.assert_close(score.class_scores(probs, u, ranked=ranked, s_rank=s), want)
        torch.testing.assert_close(score(probs, u, **params.get(name, {})), want)  # the functional form
        assert bool((s[:, 1:] >= s[:, :-1]).all())
        true = s.gather(1, ranked.rank_y[:, None]).squeeze(1)
        for classwise in (False, True):
            q, _ = cp.thresholds(true[cal], labels[cal[0]], [0.2], 4, classwise)
            for r in range(2):
                want_q = cp.calibrate(want[cal[r]], labels[cal[r]], 0.2, classwise=classwise)
                torch.testing.assert_close(q[r, 0], want_q)


def test_split_indices_stratified_and_seeded():
    labels = torch.tensor([0] * 7 + [1] * 4 + [2] * 1)
    cal, test = CP.split_indices(labels, n_splits=5, cal_fraction=0.5, seed=9)
    assert cal.shape == (5, 4 + 2 + 1) and test.shape == (5, 3 + 2 + 0)
    for r in range(5):
        assert sorted(cal[r].tolist() + test[r].tolist()) == list(range(12))
        assert labels[cal[r]].tolist() == [0, 0, 0, 0, 1, 1, 2]
    assert not all(torch.equal(cal[0], cal[r]) for r in range(1, 5))
    again = CP.split_indices(labels, n_splits=5, cal_fraction=0.5, seed=9)
    assert torch.equal(cal, again[0]) and torch.equal(test, again[1])


def test_float32_close_to_float64():
    labels, logits = make_logits([40] * 5, seed=2)
    kw = dict(train_counts=[100, 50, 30, 20, 10], n_splits=4, alphas=(0.1,))
    acc32, r32 = CP.evaluate_pool(torch.from_numpy(logits), torch.from_numpy(labels), dtype=torch.float32, **kw)
    acc64, r64 = CP.evaluate_pool(torch.from_numpy(logits), torch.from_numpy(labels), dtype=torch.float64, **kw)
    assert torch.equal(acc32, acc64)
    for a, b in zip(r32, r64):
        assert (a.score, a.predictor) == (b.score, b.predictor)
        assert abs(float(a.metrics["coverage"].mean() - b.metrics["coverage"].mean())) < 0.01
        assert abs(float(a.metrics["size"].mean() - b.metrics["size"].mean())) < 0.05


def test_rerun_identical_and_replaces(run_dir):
    cfg = dict(n_splits=4, alphas=(0.1,), report=False)
    first = E.run(E.EvalConfig(run_dir, **cfg))
    again = E.run(E.EvalConfig(run_dir, **cfg))
    assert first.summary.equals(again.summary) and first.per_class.equals(again.per_class)
    assert first.per_split.equals(again.per_split)
    assert pl.read_parquet(first.summary_path).equals(first.summary)
    assert pl.read_csv(first.summary_csv_path).height == first.summary.height
    # Other alphas and scores: the files are replaced, not appended to; nothing left behind.
    other = E.run(E.EvalConfig(run_dir, alphas=(0.2,), scores=("lac",), n_splits=2, report=False))
    on_disk = pl.read_parquet(other.summary_path)
    assert on_disk["alpha"].unique().to_list() == [0.2] and on_disk.height == 2 * 2
    assert pl.read_parquet(other.per_class_path).height == 2 * 2 * len(CLASSES)
    assert pl.read_parquet(other.per_split_path).height == 2 * 2 * 2
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["manifest.json", "per_class.parquet",
                                                                   "per_split.parquet", "summary.csv",
                                                                   "summary.parquet"]
    assert json.loads((run_dir / "eval" / "manifest.json").read_text())["config"]["alphas"] == [0.2]
    # A different seed gives different splits, hence (in general) different numbers.
    seeded = E.run(E.EvalConfig(run_dir, seed=1, **cfg))
    assert not seeded.summary.equals(first.summary)


def test_list_and_column_formats_agree(tmp_path):
    labels, logits = make_logits([10, 10, 10], seed=1)
    ids = np.arange(30)
    a = E.read_logits(write_logits(tmp_path / "a.parquet", ids, labels, logits, "list"))
    b = E.read_logits(write_logits(tmp_path / "b.parquet", ids[::-1], labels[::-1], logits[::-1], "columns"))
    assert torch.equal(a.logits, b.logits) and torch.equal(a.labels, b.labels)


def test_nan_logits_named(run_dir):
    path = run_dir / "logits" / "cact" / "pool.parquet"
    t = pq.read_table(path)
    x = np.array(t.column("logits").combine_chunks().flatten()).reshape(t.num_rows, -1)
    x[[3, 17], 1] = np.nan
    write_logits(path, t.column("sample_id").to_numpy(), t.column("label").to_numpy(), x)
    with pytest.raises(ValueError, match=rf"{path.name}.*2 of {t.num_rows} rows have NaN"):
        E.run(E.EvalConfig(run_dir, n_splits=2, report=False))


def test_pool_too_small_warns_and_gives_full_sets(tmp_path):
    run = make_run(tmp_path, methods=("ce",), counts=[4, 4, 4], train_counts=[30, 10, 3], classes=["a", "b", "c"])
    with pytest.warns(UserWarning, match=r"pool too small for alpha=0.05 \(standard"):
        res = E.run(E.EvalConfig(run, alphas=(0.05,), scores=("lac",), n_splits=3, report=False))
    row = res.summary.filter(pl.col("predictor") == "standard").row(0, named=True)
    assert row["inf_threshold_frac"] == 1.0 and row["size_mean"] == 3.0 and row["coverage_mean"] == 1.0


def test_class_counts_disagree_with_manifest(run_dir):
    m = json.loads((run_dir / "splits" / "manifest.json").read_text())
    m["counts"]["pool"][0] += 1
    m["counts"]["pool"][1] -= 1
    (run_dir / "splits" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="disagree with the manifest"):
        E.run(E.EvalConfig(run_dir, n_splits=2, report=False))
    m["num_classes"], m["classes"], m["counts"]["train"] = 7, CLASSES + ["x"], TRAIN_COUNTS + [1]
    (run_dir / "splits" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="6 logits per row but the manifest has 7 classes"):
        E.run(E.EvalConfig(run_dir, n_splits=2, report=False))


def test_methods_must_share_the_pool(run_dir):
    path = run_dir / "logits" / "cact" / "pool.parquet"
    t = pq.read_table(path)
    ids = t.column("sample_id").to_numpy().copy()
    ids[0] = 10**9
    write_logits(path, ids, t.column("label").to_numpy(),
                 np.array(t.column("logits").combine_chunks().flatten()).reshape(t.num_rows, -1))
    with pytest.raises(ValueError, match="same pool"):
        E.run(E.EvalConfig(run_dir, n_splits=2, report=False))


def test_config_validation(run_dir):
    for bad in (dict(scores=("thr",)), dict(alphas=(0.0,)), dict(n_splits=0), dict(predictors=("mondrian",))):
        with pytest.raises(ValueError):
            E.run(E.EvalConfig(run_dir, **bad))


def test_cli_prints_summary(run_dir, capsys):
    assert E.main([str(run_dir), "--alphas", "0.2", "--scores", "lac", "aps", "--n-splits", "3",
                   "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "conftr" not in out and "cact" in out and "summary:" in out
    assert pl.read_parquet(run_dir / "eval" / "summary.parquet").height == 2 * 2 * 2


def test_lac_direct_count_equals_sorted_path():
    """LAC alone with few thresholds counts sets without sorting rows; the numbers equal the sorted path's."""
    labels, logits = make_logits([30, 30, 30, 30, 30], seed=4)
    x, y = torch.from_numpy(logits), torch.from_numpy(labels)
    kw = dict(train_counts=[100, 50, 30, 20, 10], n_splits=2, alphas=(0.1, 0.2), predictors=("standard",))
    _, direct = CP.evaluate_pool(x, y, scores=("lac",), **kw)
    _, sorted_ = CP.evaluate_pool(x, y, scores=("lac", "aps"), **kw)
    assert 2 * 2 <= CP._DIRECT_COUNT_MAX
    for name, v in direct[0].metrics.items():
        torch.testing.assert_close(v, sorted_[0].metrics[name], equal_nan=True, rtol=0, atol=0)


def test_torch_path_equals_numpy_path(monkeypatch):
    """The code a GPU runs (torch sort and counts) gives the numbers of the CPU's NumPy path."""
    labels, logits = make_logits([25, 20, 15, 10], seed=8)
    kw = dict(train_counts=[100, 50, 20, 5], n_splits=3, alphas=(0.1, 0.2))
    x, y = torch.from_numpy(logits), torch.from_numpy(labels)
    acc_np, res_np = CP.evaluate_pool(x, y, **kw)
    monkeypatch.setattr(ranking, "_NUMPY_ON_CPU", False)
    acc_t, res_t = CP.evaluate_pool(x, y, **kw)
    assert torch.equal(acc_np, acc_t)
    for a, b in zip(res_np, res_t):
        for name, v in a.metrics.items():
            torch.testing.assert_close(v, b.metrics[name], equal_nan=True, rtol=0, atol=0)


def test_threads_do_not_change_results():
    """Row blocks sorted in threads and splits counted in threads give the single-thread numbers."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4096, 512, generator=g), torch.randint(0, 512, (4096,), generator=g)
    kw = dict(train_counts=list(range(1, 513)), n_splits=2, alphas=(0.1,), scores=("lac", "aps"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, one = CP.evaluate_pool(x, y, **kw)
        torch.set_num_threads(2)
        _, two = CP.evaluate_pool(x, y, **kw)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        for name, v in a.metrics.items():
            torch.testing.assert_close(v, b.metrics[name], equal_nan=True, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Per-split results and paired differences against the control


def _block(frame: pl.DataFrame, method: str, score: str, predictor: str, alpha: float) -> pl.DataFrame:
    return frame.filter((pl.col("method") == method) & (pl.col("score") == score)
                        & (pl.col("predictor") == predictor) & (pl.col("alpha") == alpha))


def test_per_split_means_equal_summary(run_dir):
    """eval/per_split.parquet holds the values the summary averages: its means (and stds) are the summary's."""
    res = E.run(E.EvalConfig(run_dir, n_splits=4, alphas=(0.1, 0.05), report=False))
    on_disk = pl.read_parquet(res.per_split_path)
    assert res.per_split_path == run_dir / "eval" / "per_split.parquet" and on_disk.equals(res.per_split)
    assert on_disk.height == res.summary.height * 4
    for row in res.summary.iter_rows(named=True):
        d = _block(on_disk, row["method"], row["score"], row["predictor"], row["alpha"]).sort("split")
        assert d["split"].to_list() == [0, 1, 2, 3]
        assert d["accuracy"].mean() == pytest.approx(row["accuracy"], abs=1e-12)
        for name in E.PER_SPLIT_METRICS[1:]:
            assert d[name].mean() == pytest.approx(row[f"{name}_mean"], abs=1e-12, nan_ok=True), name
        for name in ("coverage", "size", "covgap"):
            assert d[name].std() == pytest.approx(row[f"{name}_std"], abs=1e-12), name


def test_paired_differences_against_hand_computation(tmp_path):
    """(method - ce_finetune) split by split, its mean and mean -+ t_{0.975, R-1} sd / sqrt(R)."""
    from scipy import stats

    run = make_run(tmp_path, methods=("ce", "ce_finetune", "cact"))
    r = 6
    res = E.run(E.EvalConfig(run, n_splits=r, alphas=(0.1, 0.2), scores=("lac", "aps"), report=False))
    t = stats.t.ppf(0.975, r - 1)
    for row in res.summary.iter_rows(named=True):
        if row["method"] == "ce_finetune":
            assert row["control"] is None
            assert all(math.isnan(row[c]) for c in E.PAIRED_COLUMNS[:-1])
            continue
        assert row["control"] == "ce_finetune"
        key = (row["score"], row["predictor"], row["alpha"])
        mine = _block(res.per_split, row["method"], *key).sort("split")
        ctrl = _block(res.per_split, "ce_finetune", *key).sort("split")
        for metric in E.PAIRED_METRICS:
            d = mine[metric].to_numpy() - ctrl[metric].to_numpy()
            half = t * d.std(ddof=1) / np.sqrt(r)
            got = (row[f"{metric}_diff_mean"], row[f"{metric}_diff_lo"], row[f"{metric}_diff_hi"])
            assert got == pytest.approx((d.mean(), d.mean() - half, d.mean() + half), abs=1e-9), (metric, key)


def test_method_identical_to_control_has_zero_difference(tmp_path):
    run = make_run(tmp_path, methods=("ce_finetune", "cact"))
    (run / "logits" / "cact" / "pool.parquet").write_bytes((run / "logits" / "ce_finetune" / "pool.parquet").read_bytes())
    res = E.run(E.EvalConfig(run, n_splits=4, alphas=(0.1,), report=False))
    cact = res.summary.filter(pl.col("method") == "cact")
    for metric in E.PAIRED_METRICS:
        for stat in ("mean", "lo", "hi"):
            assert cact[f"{metric}_diff_{stat}"].to_list() == [0.0] * cact.height, (metric, stat)


def test_no_control_no_paired_columns_and_single_split(run_dir, tmp_path):
    """Without ce_finetune the paired columns are NaN/null; with R = 1 the interval is NaN, the mean is not."""
    res = E.run(E.EvalConfig(run_dir, n_splits=3, alphas=(0.1,), scores=("lac",)))  # with the report
    assert res.summary.columns == list(E.SUMMARY_COLUMNS)
    assert res.summary["control"].null_count() == res.summary.height
    assert all(res.summary[c].is_nan().all() for c in E.PAIRED_COLUMNS[:-1])
    run = make_run(tmp_path / "one", methods=("ce_finetune", "cact"))
    one = E.run(E.EvalConfig(run, n_splits=1, alphas=(0.1,), scores=("lac",)))
    cact = one.summary.filter(pl.col("method") == "cact")
    assert cact["control"].to_list() == ["ce_finetune"] * 2
    assert not cact["size_diff_mean"].is_nan().any()
    assert cact["size_diff_lo"].is_nan().all() and cact["size_diff_hi"].is_nan().all()
    assert "intervals are undefined" in one.report_path.read_text()


def test_methods_in_registry_order(run_dir):
    res = E.run(E.EvalConfig(run_dir, methods=("cact", "ce"), n_splits=2, alphas=(0.1,), report=False))
    assert res.summary["method"].unique(maintain_order=True).to_list() == ["ce", "cact"]
    assert res.per_split["method"].unique(maintain_order=True).to_list() == ["ce", "cact"]


# ----------------------------------------------------------------------------------------------------------
# The registries: a new score and a new summary metric are one entry each


@pytest.mark.filterwarnings("ignore:class-wise calibration")
def test_registered_score_and_metric_reach_engine_stage_and_report(run_dir):
    """A score that is not monotone in the probability rank (class-weighted LAC) and a new summary metric (share
    of empty sets), registered through the public registries: the engine evaluates the score through its
    class-ordered scores (equal to explicit sets of cact_ops.cp), and the metric is a column of per_split, the
    summary (with paired columns), the report and ScoreResult.metrics. Unregistered afterwards."""
    from cact_ops import cp

    weights = torch.linspace(1.0, 2.0, len(CLASSES), dtype=torch.float64)
    toy = S.Score("weighted", lambda p: 1.0 - p * weights.to(p.dtype) / 2)
    empty = M.SummaryMetric("empty_frac", lambda st: (st.sizes == 0).double().mean(-1), "empty sets", True,
                            paired=True)
    S.register_score(toy)
    M.register_metric(empty)
    try:
        assert not toy.rank_monotone and S.get_score("weighted") is toy.fn and "weighted" in E.SCORES
        labels, logits = make_logits(POOL_COUNTS, seed=3)
        x, y = torch.from_numpy(logits).double(), torch.from_numpy(labels)
        cal, test = CP.split_indices(y, 3, 0.5, seed=0)
        alphas = (0.1, 0.3)
        _, results = CP.evaluate_pool(x, y, TRAIN_COUNTS, scores=("weighted", "aps"), alphas=alphas,
                                      splits=(cal, test), dtype=torch.float64)
        assert [(r.score, r.predictor) for r in results] == [("weighted", "standard"), ("weighted", "classwise"),
                                                            ("aps", "standard"), ("aps", "classwise")]
        s = toy(torch.softmax(x, 1))
        ranks = s.argsort(1)  # the toy's class order by score differs from the probability rank somewhere
        assert not torch.equal(ranks, (-torch.softmax(x, 1)).argsort(1))
        for res in results[:2]:
            assert "empty_frac" in res.metrics
            for r in range(3):
                yt = y[test[r]]
                for a, alpha in enumerate(alphas):
                    q = cp.calibrate(s[cal[r]], y[cal[r]], alpha, classwise=res.predictor == "classwise")
                    sets = cp.predict_sets(s[test[r]], q)
                    got = {k: float(v[r, a]) for k, v in res.metrics.items() if v.dim() == 2}
                    assert got["coverage"] == pytest.approx(float(M.coverage(sets, yt)), abs=1e-7)
                    assert got["size"] == pytest.approx(float(M.average_size(sets)), abs=1e-6)
                    assert got["covgap"] == pytest.approx(float(M.covgap(sets, yt, alpha, len(CLASSES))), abs=1e-4)
                    assert got["empty_frac"] == pytest.approx(float((sets.sum(1) == 0).double().mean()), abs=1e-12)
        # The stage: the score is accepted by name, the metric is a column everywhere, the report shows it.
        run = E.run(E.EvalConfig(run_dir, n_splits=3, alphas=(0.1,), scores=("lac", "weighted")))
        assert "empty_frac" in E.PER_SPLIT_METRICS and "empty_frac" in E.PAIRED_METRICS
        assert run.summary.columns == list(E.SUMMARY_COLUMNS) and run.per_split.columns == list(E.PER_SPLIT_COLUMNS)
        assert run.per_split.columns[-1] == "empty_frac"
        assert E.SUMMARY_COLUMNS[-4:] == ("empty_frac_diff_mean", "empty_frac_diff_lo", "empty_frac_diff_hi",
                                          "control")
        assert run.summary["score"].unique(maintain_order=True).to_list() == ["lac", "weighted"]
        for row in run.summary.iter_rows(named=True):
            d = _block(run.per_split, row["method"], row["score"], row["predictor"], row["alpha"])
            assert d["empty_frac"].mean() == pytest.approx(row["empty_frac_mean"], abs=1e-12)
        assert "| empty sets |" in run.report_path.read_text()
        assert E.main([str(run_dir), "--scores", "weighted", "--n-splits", "2", "--no-report"]) == 0
    finally:
        S.unregister_score("weighted")
        M.unregister_metric("empty_frac")
    assert "weighted" not in E.SCORES and "weighted" not in S.SCORES
    assert "empty_frac" not in E.PER_SPLIT_METRICS and not any("empty" in c for c in E.SUMMARY_COLUMNS)
    with pytest.raises(ValueError, match="unknown or no score"):
        E.EvalConfig(run_dir, scores=("weighted",)).validate()
