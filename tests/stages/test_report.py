"""Report: report.md content (config, tables with the best marked, warnings) and the four PNG plots."""
from __future__ import annotations

import polars as pl
import pytest

from stages import evaluate as E
from stages import report as R
from tests.stages.test_evaluate import make_run

pytestmark = pytest.mark.filterwarnings("ignore:pool too small")

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_and_plots(tmp_path):
    run = make_run(tmp_path, history=True)
    (run / "plots").mkdir()
    (run / "plots" / "stale.png").write_bytes(PNG)  # from an older report: must not survive
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
    assert "**" in table and " ± " in table
    files = sorted(p.name for p in (run / "plots").iterdir())
    assert files == sorted(R.PLOTS)
    for name in R.PLOTS:
        data = (run / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
        assert f"(plots/{name})" in text


def test_report_without_history_or_config(tmp_path):
    run = make_run(tmp_path, methods=("ce",))
    (run / "config.json").unlink()
    E.run(E.EvalConfig(run, n_splits=2, alphas=(0.1,), scores=("lac",), report=False))
    path = R.write_report(run)  # reads eval/summary.parquet, per_class.parquet and manifest.json
    text = path.read_text()
    assert "No `config.json`" in text and "No training history" in text
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(set(R.PLOTS) - {"lambda_evolution.png"})


def test_markdown_table_marks_best():
    df = pl.DataFrame({"method": ["ce", "cact"], "accuracy": [0.8, 0.8], "size_mean": [3.0, 2.0],
                       "size_std": [float("nan"), 0.1], "few_size_mean": [None, 4.0]})
    lines = R.markdown_table(df).splitlines()
    assert lines[2] == "| ce | **0.800** | 3.00 | – |"  # ties are all best; NaN std and missing values shown plainly
    assert lines[3] == "| cact | **0.800** | **2.00** ± 0.10 | 4.00 |"


def test_report_many_classes_and_many_panels(tmp_path):
    """Above 50 classes the per-class plots draw group means; five methods with multipliers wrap into rows."""
    k = 60
    methods = ("ce", "conftr", "conftr_class", "cact_uniform", "cact")
    run = make_run(tmp_path, methods=methods, counts=[6] * k, train_counts=[500 - 8 * c for c in range(k)],
                   classes=[f"c{c}" for c in range(k)], history=True)
    res = E.run(E.EvalConfig(run, n_splits=2, alphas=(0.2,), scores=("lac",)))
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(R.PLOTS)
    assert res.report_path.read_text().count("| cact_uniform |") == 2  # one table per predictor
