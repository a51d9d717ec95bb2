"""Report: report.md content (config, tables with the significant best marked, paired differences against the
control, multipliers at their floor, warnings), the four PNG plots, the recomputed per-split data behind their
error bars and curves, and report.html (self-contained; rendered in headless Chromium when one is installed)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import polars as pl
import pytest

from stages import evaluate as E
from stages import report as R
from stages import report_data
from tests.stages.test_evaluate import make_logits, make_run, write_logits

pytestmark = pytest.mark.filterwarnings("ignore:pool too small")

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_and_plots(tmp_path):
    run = make_run(tmp_path, history=True)
    (run / "plots").mkdir()
    (run / "plots" / "mine.png").write_bytes(PNG)  # not the report's: must survive, untouched
    (run / "plots" / "notes.txt").write_text("keep")
    (run / "plots" / "class_coverage.png").write_bytes(PNG)  # the report's own, from an older report: replaced
    res = E.run(E.EvalConfig(run, n_splits=3, alphas=(0.1, 0.05)))
    assert res.report_path == run / "report.md"
    text = res.report_path.read_text()
    assert '"epochs": 3' in text  # the pipeline's config.json
    assert "| n_splits | `3` |" in text  # the evaluation config
    assert "## Warnings" in text and "alpha=0.05" in text  # class 5 is too small for class-wise thresholds
    for a in ("0.1", "0.05"):
        assert f"### alpha = {a}" in text
    for s in ("LAC", "APS", "RAPS"):
        assert f"#### {s}, standard CP" in text and f"#### {s}, classwise CP" in text
    table = text.split("#### APS, standard CP")[1].split("####")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ce") or line.startswith("| cact")]
    assert [r.split("|")[1].strip() for r in rows] == ["ce", "cact"]  # canonical method order
    assert "**" in table and " ± " in table  # this toy data has significant bests
    assert "**Bold**: the best value of a ranked column, only where the paired 95%" in text
    assert "Paired differences against ce_finetune" in text and "ce_finetune was not evaluated" in text
    files = sorted(p.name for p in (run / "plots").iterdir())
    assert files == sorted([*R.PLOTS, "mine.png", "notes.txt"])
    assert (run / "plots" / "mine.png").read_bytes() == PNG and (run / "plots" / "notes.txt").read_text() == "keep"
    for name in R.PLOTS:
        data = (run / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
        assert f"(plots/{name})" in text
    assert "Error bars: ± one standard deviation across the R = 3 splits" in text
    # report.html: the same content, self-contained (every image inline, nothing fetched)
    page = (run / "report.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(links) == len(R.PLOTS) and all(u.startswith("data:image/png;base64,") for u in links)
    assert "http" not in page and page.count("<table>") == text.count("|---|") and "<strong>" in page
    # The recomputed per-split values: their means are the evaluation's, and the curves pass through the summary.
    data = report_data.recompute(run, res.per_class, "aps", 0.1, ["ce", "cact"], ["standard", "classwise"],
                                 json.loads((run / "eval" / "manifest.json").read_text())["config"])
    assert data.why is None and data.per_split["split"].n_unique() == 3
    means = data.per_split.group_by("method", "predictor", "class").agg(pl.col("coverage", "size").mean())
    ref = res.per_class.filter(pl.col("score") == "aps", pl.col("alpha") == 0.1).join(
        means, on=["method", "predictor", "class"])
    assert ref.height == 2 * 2 * 6 and np.allclose(ref["coverage"], ref["coverage_mean"], atol=1e-9, rtol=0)
    assert np.allclose(ref["size"], ref["size_mean"], atol=1e-9, rtol=0)
    assert set(data.curve["alpha"]) == set(report_data.ALPHA_GRID)  # 0.1 and 0.05 are in the grid
    at = data.curve.filter(pl.col("evaluated")).join(res.summary.filter(pl.col("score") == "aps"),
                                                     on=["method", "predictor", "alpha"])
    assert at.height == 2 * 2 * 2 and np.allclose(at["size_mean"], at["size_mean_right"], atol=1e-9, rtol=0)
    assert np.allclose(at["coverage_mean"], at["coverage_mean_right"], atol=1e-9, rtol=0)


def test_report_without_history_or_config(tmp_path):
    run = make_run(tmp_path, methods=("ce",))
    (run / "config.json").unlink()
    E.run(E.EvalConfig(run, n_splits=2, alphas=(0.1,), scores=("lac",), report=False))
    path = R.write_report(run)  # reads eval/summary.parquet, per_class.parquet and manifest.json
    text = path.read_text()
    assert "No `config.json`" in text and "No training history" in text
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(set(R.PLOTS) - {"lambda_evolution.png"})
    assert "No error bars" not in text and "(large markers: the evaluated alphas" in text
    # a plot of the report's own with nothing to show this time is removed; another file there stays
    (run / "plots" / "lambda_evolution.png").write_bytes(PNG)
    (run / "plots" / "mine.png").write_bytes(PNG)
    # logits rewritten after the evaluation: the report does not mix them with the evaluation's numbers
    labels, logits = make_logits([60, 50, 40, 30, 20, 9], seed=99)
    write_logits(run / "logits" / "ce" / "pool.parquet", np.arange(len(labels)) * 3 + 100, labels, logits)
    text = R.write_report(run).read_text()
    assert "No error bars: the logits no longer give the evaluation's per-class means" in text
    assert "The evaluated alphas only" in text
    assert sorted(p.name for p in (run / "plots").iterdir()) == \
        sorted(set(R.PLOTS) - {"lambda_evolution.png"} | {"mine.png"})


def test_markdown_table_bolds_only_significant_best():
    df = pl.DataFrame({"method": ["ce", "conftr", "cact"], "accuracy": [0.8, 0.8, 0.7],
                       "size_mean": [3.0, 2.5, 2.0], "size_std": [float("nan"), 0.1, 0.1],
                       "covgap_mean": [5.0, 4.0, 4.5], "few_size_mean": [None, 4.0, 5.0]})
    # Without per-split values nothing is bold; NaN std and missing values are shown plainly.
    lines = R.markdown_table(df).splitlines()
    assert "**" not in "\n".join(lines)
    assert lines[2] == "| ce | 0.800 | 3.00 | 5.00 | – |"
    # size: cact beats the runner-up conftr by 0.5 on every split (significant); CovGap: conftr's mean is best but
    # its paired difference with cact changes sign (not significant); accuracy: a tie (not significant).
    splits = pl.DataFrame({"method": [m for m in ("ce", "conftr", "cact") for _ in range(3)],
                           "split": [0, 1, 2] * 3,
                           "accuracy": [0.8] * 6 + [0.7] * 3,
                           "size": [3.0, 3.0, 3.0, 2.4, 2.5, 2.6, 1.9, 2.0, 2.1],
                           "covgap": [5.0] * 3 + [2.0, 6.0, 4.0] + [4.5, 4.5, 4.5],
                           "few_size": [float("nan")] * 3 + [4.0] * 3 + [5.0] * 3})
    lines = R.markdown_table(df, splits).splitlines()
    assert lines[2] == "| ce | 0.800 | 3.00 | 5.00 | – |"
    assert lines[3] == "| conftr | 0.800 | 2.50 ± 0.10 | 4.00 | **4.00** |"
    assert lines[4] == "| cact | 0.700 | **2.00** ± 0.10 | 4.50 | 5.00 |"
    assert R.significant_best(df, splits, "covgap_mean", lower=True) is None
    assert R.significant_best(df, splits, "size_mean", lower=True) == "cact"


def test_report_many_classes_and_many_panels(tmp_path):
    """Above 50 classes the per-class plots draw group means; five methods with multipliers wrap into rows."""
    k = 60
    methods = ("ce", "conftr", "conftr_class", "cact_uniform", "cact")
    run = make_run(tmp_path, methods=methods, counts=[6] * k, train_counts=[500 - 8 * c for c in range(k)],
                   classes=[f"c{c}" for c in range(k)], history=True)
    res = E.run(E.EvalConfig(run, n_splits=2, alphas=(0.2,), scores=("lac",)))
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(R.PLOTS)
    assert res.report_path.read_text().count("| cact_uniform |") == 2  # one table per predictor


def _table_rows(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.startswith("|"))


@pytest.fixture(scope="module")
def twin_report(tmp_path_factory):
    """A small report (one score, one alpha) of two methods with the same logits: their lines coincide."""
    run = make_run(tmp_path_factory.mktemp("twins"), methods=("ce_finetune", "cact"), history=True)
    (run / "logits" / "cact" / "pool.parquet").write_bytes((run / "logits" / "ce_finetune" / "pool.parquet").read_bytes())
    return E.run(E.EvalConfig(run, n_splits=4, alphas=(0.1,), scores=("aps",)))


def test_identical_to_control_not_bold(twin_report):
    """A method with the control's logits: zero difference, a zero-width interval, nothing bold between the two."""
    text = twin_report.report_path.read_text()
    assert "**" not in _table_rows(text.split("## Summary")[1])
    paired = text.split("## Paired differences against ce_finetune")[1].split("## Plots")[0]
    assert "| standard | cact | +0.000 [+0.000, +0.000] | +0.00 [+0.00, +0.00] |" in paired
    assert "this one training seed: they do not include seed-to-seed variation" in paired


def test_paired_tables_in_registry_order(tmp_path):
    run = make_run(tmp_path, methods=("ce", "ce_finetune", "conftr", "cact"))
    res = E.run(E.EvalConfig(run, methods=("cact", "conftr", "ce", "ce_finetune"), n_splits=3, alphas=(0.1, 0.05),
                             scores=("lac", "aps")))
    text = res.report_path.read_text()
    summary = text.split("#### APS, standard CP")[1].split("####")[0]
    assert [r.split("|")[1].strip() for r in summary.splitlines() if r.startswith("| c")] == \
        ["ce", "ce_finetune", "conftr", "cact"]
    paired = text.split("## Paired differences against ce_finetune")[1].split("## Plots")[0]
    assert paired.count("### alpha =") == 2  # one table per alpha, APS only
    rows = [r.split("|")[1:3] for r in paired.splitlines() if r.startswith("| standard") or r.startswith("| classwise")]
    assert [(p.strip(), m.strip()) for p, m in rows[:6]] == [
        ("standard", "ce"), ("standard", "conftr"), ("standard", "cact"),
        ("classwise", "ce"), ("classwise", "conftr"), ("classwise", "cact")]
    # Bold in the paired tables exactly where the interval excludes zero.
    for row in res.summary.filter((pl.col("score") == "aps") & (pl.col("method") != "ce_finetune")).iter_rows(
            named=True):
        lo, hi = row["size_diff_lo"], row["size_diff_hi"]
        cell = f"{row['size_diff_mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        line = next(r for r in paired.split(f"### alpha = {row['alpha']:g}")[1].splitlines()
                    if r.startswith(f"| {row['predictor']} | {row['method']} |"))
        assert (f"**{cell}**" in line) == (lo > 0 or hi < 0) and cell in line


def test_no_per_split_bolds_nothing(tmp_path):
    """Old run folders (no eval/per_split.parquet) and a summary passed alone: no bold, and the report says why."""
    run = make_run(tmp_path, methods=("ce", "ce_finetune", "cact"))
    res = E.run(E.EvalConfig(run, n_splits=3, alphas=(0.1,), scores=("lac",)))
    assert "**" in _table_rows(res.report_path.read_text().split("## Summary")[1].split("## Paired")[0])
    for call in (lambda: R.write_report(run, summary=res.summary, per_class=res.per_class),
                 lambda: (run / "eval" / "per_split.parquet").unlink() or R.write_report(run)):
        text = call().read_text()
        assert "**" not in _table_rows(text.split("## Summary")[1].split("## Paired")[0])
        assert "Nothing is in bold: there are no per-split results" in text
    old = res.summary.drop(E.PAIRED_COLUMNS)  # a summary from before the paired columns
    text = R.write_report(run, summary=old, per_class=res.per_class).read_text()
    assert "Not in this summary" in text


def _history(run, method, lam):
    k = 6
    rows = [{"method": method, "epoch": e, "class": c, "lambda": lam(e, c), "rho": 1.0, "constraint": 0.1,
             "val_coverage": 0.9, "val_size": 2.0, "train_soft_size": 2.5} for e in range(3) for c in range(k)]
    (run / "train" / method).mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows).write_parquet(run / "train" / method / "history.parquet")


def test_lambda_at_floor_note(tmp_path):
    run = make_run(tmp_path, methods=("ce", "ce_finetune", "cact_uniform", "cact"))
    for m in ("ce", "ce_finetune"):
        _history(run, m, lambda e, c: 1e-6)  # no multipliers: never noted
    _history(run, "cact", lambda e, c: 1e-6)
    _history(run, "cact_uniform", lambda e, c: 0.1 * (e + 1))  # growing: not at the floor
    res = E.run(E.EvalConfig(run, n_splits=2, alphas=(0.1,), scores=("lac",)))
    text = res.report_path.read_text()
    assert ("every multiplier of cact stayed at its floor: the CE backbone already meets every class's size target "
            "on D_val, so cact reduced to CE fine-tuning here; see eta / --eta-relative") in text
    for m in ("cact_uniform", "ce", "ce_finetune"):
        assert f"every multiplier of {m} " not in text
    # The floor is 10 x the run's lambda_min when that is above 1e-3.
    _history(run, "cact_uniform", lambda e, c: 0.5 if e < 2 else 0.005)
    assert "every multiplier of cact_uniform " not in R.write_report(run).read_text()
    (run / "train" / "cact_uniform" / "config.json").write_text(json.dumps({"loop": {"lambda_min": 1e-3}}))
    assert "every multiplier of cact_uniform stayed at its floor" in R.write_report(run).read_text()


_CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(_CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium; "
                                               ".ci/run installs it): report.html is not rendered")
def test_report_html_renders_in_headless_chromium(twin_report, tmp_path):
    """report.html opened from disk in headless Chromium: the screenshot shows text, tables and the inline plots."""
    assert_renders_in_chromium(twin_report.run_dir / "report.html", tmp_path)


def assert_renders_in_chromium(page, tmp_path, height: int = 6000) -> None:
    """Screenshot ``page`` (the top ``height`` pixels, 1200 wide) in headless Chromium; it must show text, tables and
    plots (not a blank page)."""
    from matplotlib.image import imread

    shot = tmp_path / "shot.png"
    # Tall enough for the whole page, plots included (they come last).
    subprocess.run([_CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", f"--window-size=1200,{height}",
                    page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    rgb = (imread(shot)[..., :3] * 255).round().astype(int)
    assert rgb.shape[:2] == (height, 1200)
    assert (rgb.min(axis=2) < 200).mean() > 0.01  # text and lines: not a blank page
    assert (rgb.max(axis=2) - rgb.min(axis=2) > 60).sum() > 5000  # saturated pixels: the plots rendered
    assert len(np.unique(rgb @ np.array([1 << 16, 1 << 8, 1]))) > 500  # distinct colours
