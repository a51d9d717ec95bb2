"""The embedded-default recipe, run through its real command line with small overrides (torchtune style):
end to end, rerun, a damaged output, MLflow, and a driver killed in every stage in turn."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from tests.pipelines._faults import kill_in_every_stage
from tests.stages.test_report import _CHROMIUM, assert_renders_in_chromium

pytestmark = pytest.mark.ray

SCRIPT = Path(__file__).resolve().parents[2] / "pipelines" / "digits_lt.py"


def _run(argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    runpy.run_path(str(SCRIPT), run_name="__main__")
    return capsys.readouterr().out


def _mlflow_runs(uri: str):
    """Every active MLflow run of the digits experiment, read back with mlflow.search_runs."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs(experiment_names=["cact-digits"])
    finally:
        mlflow.set_tracking_uri(None)


def test_digits_pipeline_end_to_end_and_rerun(ray_cluster, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    mlflow_uri = f"file:{tmp_path / 'mlruns'}"
    # 30 CE epochs: long enough for the fault injection below to kill the driver during training
    common = ["--methods", "ce,ce_finetune,cact", "--epochs", "30", "--finetune-epochs", "2", "--n-splits", "5",
              "--alpha", "0.1", "0.2"]
    argv = ["--out", str(out), *common, "--mlflow-uri", mlflow_uri]
    printed = _run(argv, monkeypatch, capsys)
    summary = pl.read_parquet(out / "eval" / "summary.parquet")
    # 3 methods x 3 scores x 2 predictors x 2 alphas, every one a measured row
    assert summary.height == 36
    assert set(summary["method"]) == {"ce", "ce_finetune", "cact"}
    # every method is compared with the CE fine-tune control, paired over the splits
    cact = summary.filter(pl.col("method") == "cact")
    assert (cact["control"] == "ce_finetune").all()
    assert ((cact["size_diff_lo"] <= cact["size_diff_mean"]) & (cact["size_diff_mean"] <= cact["size_diff_hi"])).all()
    assert summary.filter(pl.col("method") == "ce_finetune")["size_diff_mean"].is_nan().all()
    assert (out / "eval" / "per_split.parquet").is_file()
    assert "Paired differences against ce_finetune" in (out / "report.md").read_text()
    assert summary["n_splits"].unique().to_list() == [5]
    # The pool holds ~716 points, so the test half ~358: one split's coverage has sd <= ~0.03 and the mean over
    # 5 splits sits within 0.06 of its target with ample margin. Split CP must hold for every method.
    std = summary.filter(pl.col("predictor") == "standard")
    assert (std["coverage_mean"] >= 1 - std["alpha"] - 0.06).all()
    assert (std["size_mean"] >= 0.5).all() and (std["size_mean"] <= 10).all()
    # what a user reads at the end
    assert "report:" in printed and (out / "report.md").is_file()
    assert "alpha = 0.1" in printed and "cact" in printed
    assert "Traceback" not in printed and "eprecat" not in printed
    assert any((out / "plots").glob("*.png"))
    if _CHROMIUM:  # the demo's own report.html, as a browser shows it (the report tests skip without chromium too)
        assert_renders_in_chromium(out / "report.html", tmp_path, height=12000)  # 3 methods: ~7,000 px
    hist = pl.read_parquet(out / "train" / "cact" / "history.parquet")
    assert hist.height == 2 * 10 and hist["lambda"].is_finite().all()
    assert hist["lambda"].max() > 1e-3  # the default size target (eta_relative) binds: the multipliers move
    # --mlflow-uri: one parent run for the pipeline run, a nested run per method with its config and metrics
    runs = _mlflow_runs(mlflow_uri)
    parent = runs[runs["tags.cact.role"] == "pipeline"]
    children = runs[runs["tags.cact.role"] == "method"].set_index("tags.cact.method")
    assert len(runs) == 4 and len(parent) == 1 and sorted(children.index) == ["cact", "ce", "ce_finetune"]
    assert (children["tags.mlflow.parentRunId"] == parent["run_id"].iloc[0]).all()
    assert children["metrics.coverage_mean/aps/standard/alpha0.1"].between(0.5, 1).all()
    assert children.loc["cact", "params.method"] == "cact" and children.loc["cact", "metrics.val_coverage"] > 0
    assert "mlflow: experiment 'cact-digits'" in printed
    # A rerun reuses every finished stage: nothing retrained, nothing appended (in MLflow neither).
    printed = _run(argv, monkeypatch, capsys)
    assert printed.count("reused") >= 3
    again = _mlflow_runs(mlflow_uri)
    assert len(again) == 4 and set(again["run_id"]) == set(runs["run_id"])
    assert pl.read_parquet(out / "eval" / "summary.parquet").equals(summary)
    assert pl.read_parquet(out / "train" / "cact" / "history.parquet").height == 20
    assert json.loads((out / ".cact-run.json").read_text())["project"] == "cact"  # the folder is the project's
    # A damaged output is not reused: a truncated model.pt of the job in the middle of the worker group is trained
    # again, alone and afresh (not from the group's last checkpoint, which is cact's), and equals the original.
    # The report replaces only its own plots.
    ft = out / "train" / "ce_finetune"
    history, weights = pl.read_parquet(ft / "history.parquet"), torch.load(ft / "model.pt", weights_only=True)["model"]
    (ft / "model.pt").write_bytes((ft / "model.pt").read_bytes()[:100])
    # A user's files in every folder the pipeline writes into survive a rerun that rewrites them (the project
    # never deletes or overwrites a file it did not write).
    planted = [out / d / "mine.txt" for d in (".", "splits", "train", "train/ce_finetune", "train/cact", "logits",
                                                "logits/cact", "eval", "plots", "ray_storage")]
    for p in planted:
        p.write_text("keep")
    with pytest.warns(UserWarning, match=r"ce_finetune/model.pt is damaged.*training ce_finetune again"):
        printed = _run(argv, monkeypatch, capsys)
    assert printed.count("reused") == 2 and "trained ce_finetune" in printed
    assert pl.read_parquet(ft / "history.parquet").equals(history)
    for k, v in torch.load(ft / "model.pt", weights_only=True)["model"].items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    assert pl.read_parquet(out / "eval" / "summary.parquet").equals(summary)
    assert all(p.read_text() == "keep" for p in planted)
    # Killed at a random point of every stage in turn and rerun each time, the same command ends with this
    # unbroken run's tables (summary.csv byte for byte); the CE backbone continued from its checkpoint.
    killed = tmp_path / "killed"
    resumed, printed = kill_in_every_stage(common, killed, ray_cluster.get_runtime_context().gcs_address)
    assert "resumed from epoch" in resumed, resumed
    assert pl.read_parquet(killed / "train" / "ce" / "metrics.parquet")["epoch"].to_list() == list(range(30))
    assert "summary:" in printed
    for name in ("summary.parquet", "per_class.parquet", "per_split.parquet"):
        assert pl.read_parquet(killed / "eval" / name).equals(pl.read_parquet(out / "eval" / name)), name
    assert (killed / "eval" / "summary.csv").read_bytes() == (out / "eval" / "summary.csv").read_bytes()


def test_bad_method_name_is_refused(monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit, match="unknown \\['bogus'\\]"):
        _run(["--out", str(tmp_path), "--methods", "ce,bogus"], monkeypatch, capsys)


def test_frozen_features_mode_trains_heads_on_the_backbone_features(ray_cluster, tmp_path, monkeypatch, capsys,
                                                                    toy_plugin):
    """Also the extension story, end to end: a plugin's toy score, metric and method (tests/toy_plugin.py, loaded
    with --plugins) reach the Ray Train workers and the run's summary."""
    out = tmp_path / "run"
    printed = _run(["--out", str(out), "--plugins", toy_plugin, "--methods", "ce,conftr,ce_smoothed", "--epochs", "1",
                    "--finetune-epochs", "1", "--n-splits", "2", "--alpha", "0.1", "--scores", "lac,class_offset",
                    "--frozen-features"], monkeypatch, capsys)
    assert "plugin tests.toy_plugin: score class_offset, metric singletons, method ce_smoothed" in printed
    assert (out / "backbone" / "train" / "ce" / "model.pt").is_file()
    manifest = json.loads((out / "features" / "manifest.json").read_text())
    assert manifest["payload"]["kind"] == "features" and manifest["payload"]["dim"] == 128  # SmallCNN's hidden
    assert manifest["features_from"]["model"] == str((out / "backbone" / "train" / "ce" / "model.pt").resolve())
    # every method is a head on the features, trained with the ConfTr reference's settings
    from stages.features import REFERENCE_HEAD

    for method in ("ce", "conftr"):
        blob = torch.load(out / "train" / method / "model.pt", weights_only=True)
        assert blob["model_spec"]["family"] == "head" and blob["model_spec"]["kwargs"]["in_features"] == 128
        # trained: the train split (358 rows) is smaller than the reference's batch of 500, and still one batch
        assert pl.read_parquet(out / "train" / method / "metrics.parquet")["train_ce"].min() > 0
    conftr = json.loads((out / "train" / "conftr" / "config.json").read_text())["loop"]
    assert (conftr["batch_size"], conftr["conftr_lambda"], conftr["size_transform"], conftr["temperature"]) == \
        (REFERENCE_HEAD["batch_size"], 0.05, "log", 1.0)
    summary = pl.read_parquet(out / "eval" / "summary.parquet")
    assert set(summary["method"]) == {"ce", "conftr", "ce_smoothed"} and summary["coverage_mean"].is_finite().all()
    assert set(summary["score"]) == {"lac", "class_offset"}
    assert summary["singletons_mean"].is_between(0, 1).all()  # (0 here: a 1-epoch backbone's sets are large)
    standard = summary.filter(pl.col("predictor") == "standard", pl.col("method") == "ce")
    assert standard["size_mean"].n_unique() == 2  # the toy score's own sets, not LAC's
    assert "singleton sets" in (out / "report.md").read_text()
    smoothed = json.loads((out / "train" / "ce_smoothed" / "config.json").read_text())["loop"]
    assert smoothed["method"] == "ce_smoothed"
    assert "features: 128 per row" in printed
