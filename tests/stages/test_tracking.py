"""Experiment tracking (stages.tracking): a finished run folder, written by hand (no Ray, no training), logged to an
MLflow file store under tmp_path and read back with mlflow.search_runs; logging again never duplicates a run."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import polars as pl
import pytest

from cact_ops.training import TrainConfig
from stages import _io, evaluate, sweep, tracking, train_run
from stages.train import TrainStageConfig

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
METHODS = ("ce", "cact")


def _method(run: Path, method: str, epochs: int, val_accuracy: list[float]) -> None:
    """train/<method>/, written by the training stage's own writer."""
    config = TrainStageConfig(out=str(run), loop=TrainConfig(method=method, epochs=epochs, lr=0.05 if method == "ce"
                                                             else 0.005))
    spec = {"family": "linear", "num_classes": 3, "kwargs": {"in_features": 4}}
    from cact_ops.models import build_model

    state = {"model": build_model("linear", 3, in_features=4).state_dict(), "epoch": epochs,
             "history": [{"epoch": e, "class": k, "lambda": 0.1 * e} for e in range(epochs) for k in range(3)],
             "metrics": [{"epoch": e, "val_accuracy": a, "val_size": 2.0 - 0.1 * e, "val_tau": math.nan}
                         for e, a in enumerate(val_accuracy)], "dual": None}
    train_run.write_outputs(config, spec, state, 1.0)


def _summary(methods=METHODS) -> pl.DataFrame:
    """eval/summary.parquet's shape: one row per method x score x predictor x alpha, every column of the stage."""
    rows = []
    for i, m in enumerate(methods):
        for score in ("lac", "aps"):
            for predictor in ("standard", "classwise"):
                for alpha in (0.1, 0.2):
                    row = {c: 0.5 + 0.01 * i for c in evaluate.SUMMARY_COLUMNS}
                    row |= {"method": m, "score": score, "predictor": predictor, "alpha": alpha, "n_splits": 5,
                            "control": "ce_finetune", "coverage_mean": 1 - alpha + 0.001 * i,
                            "size_diff_mean": math.nan if m == "ce" else -0.3}
                    rows.append(row)
    return pl.DataFrame(rows).select(evaluate.SUMMARY_COLUMNS)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A finished two-method run folder: marker, config.json, train/, eval/, report.md, plots/."""
    run = _io.claim_run_folder(tmp_path / "digits-run")
    args = {"methods": ",".join(METHODS), "epochs": 3, "imbalance_factor": 10.0, "alpha": [0.1, 0.2], "eta": None}
    _io.write_json({"pipeline": "digits", "argv": ["--epochs", "3"], "args": args}, run / "config.json")
    _method(run, "ce", 3, [0.5, 0.6, 0.7])
    _method(run, "cact", 2, [0.72, 0.74])
    summary = _summary()
    (run / "eval").mkdir()
    _io.write_parquet(summary.to_arrow(), run / "eval" / "summary.parquet")
    summary.write_csv(run / "eval" / "summary.csv")
    (run / "report.md").write_text("# report\n")
    (run / "plots").mkdir()
    for name in ("class_coverage.png", "coverage_vs_size.png"):
        (run / "plots" / name).write_bytes(b"\x89PNG\r\n\x1a\n" + name.encode())
    return run


@pytest.fixture
def uri(tmp_path, monkeypatch) -> str:
    # log_run itself allows the file store (MLflow 3 refuses one unless MLFLOW_ALLOW_FILE_STORE=true)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset-by-the-test")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    return f"file:{tmp_path / 'mlruns'}"


@pytest.fixture
def search(uri):
    """mlflow.search_runs on the test's store (the global tracking URI is reset afterwards)."""

    def run(experiment="cact-digits", **kw):
        mlflow.set_tracking_uri(uri)
        return mlflow.search_runs(experiment_names=[experiment], **kw)

    yield run
    mlflow.set_tracking_uri(None)


def test_a_run_folder_becomes_one_parent_run_with_a_nested_run_per_method(run_dir, uri, search):
    res = tracking.log_run(run_dir, uri)
    assert res.experiment == "cact-digits" and res.logged == ["run", "ce", "cact"] and not res.unchanged
    runs = search()
    assert len(runs) == 3 and set(runs["tags.cact.run_id"]) == {res.run_id}
    parent = runs[runs["tags.cact.role"] == "pipeline"].iloc[0]
    assert parent["run_id"] == res.parent_run_id and parent["tags.mlflow.runName"] == "digits-run"
    assert parent["params.pipeline"] == "digits" and parent["params.imbalance_factor"] == "10.0"
    assert parent["params.argv"] == "--epochs 3" and parent["status"] == "FINISHED"
    children = runs[runs["tags.cact.role"] == "method"].set_index("tags.cact.method")
    assert sorted(children.index) == ["cact", "ce"]
    assert (children["tags.mlflow.parentRunId"] == res.parent_run_id).all()
    assert dict(children["run_id"]) == res.method_run_ids
    # params: the method's TrainConfig, its stage fields and the pipeline's flags
    cact = children.loc["cact"]
    assert cact["params.method"] == "cact" and cact["params.lr"] == "0.005" and cact["params.epochs"] == "2"
    assert cact["params.eta_relative"] == "0.9" and cact["params.milestones"] == "[]"
    assert cact["params.stage.num_workers"] == "1" and cact["params.pipeline.epochs"] == "3"
    assert children.loc["ce", "params.lr"] == "0.05"
    # per-epoch metrics (step = epoch) and the summary rows (last value; NaN never logged)
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(res.method_run_ids["ce"], "val_accuracy")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 0.5), (1, 0.6), (2, 0.7)]
    assert client.get_metric_history(res.method_run_ids["ce"], "val_tau") == []
    assert cact["metrics.val_accuracy"] == pytest.approx(0.74)
    assert cact["metrics.coverage_mean/aps/standard/alpha0.1"] == pytest.approx(0.901)
    assert children.loc["ce", "metrics.coverage_mean/lac/classwise/alpha0.2"] == pytest.approx(0.8)
    assert cact["metrics.size_diff_mean/aps/classwise/alpha0.2"] == pytest.approx(-0.3)
    assert math.isnan(children.loc["ce", "metrics.size_diff_mean/aps/classwise/alpha0.2"])  # not logged for ce
    assert cact["metrics.n_splits/lac/standard/alpha0.1"] == 5
    # artifacts: the report, the summary table, the plots and the configs
    top = {a.path for a in client.list_artifacts(res.parent_run_id)}
    assert top == {"config.json", "report.md", "eval", "plots"}
    assert [a.path for a in client.list_artifacts(res.parent_run_id, "eval")] == ["eval/summary.csv"]
    assert {a.path for a in client.list_artifacts(res.parent_run_id, "plots")} == \
        {"plots/class_coverage.png", "plots/coverage_vs_size.png"}
    assert [a.path for a in client.list_artifacts(res.method_run_ids["cact"])] == ["config.json"]


def test_logging_again_adds_no_run_and_a_changed_folder_replaces_only_what_changed(run_dir, uri, search):
    first = tracking.log_run(run_dir, uri)
    again = tracking.log_run(run_dir, uri)
    assert again.unchanged == ["run", "ce", "cact"] and not again.logged
    assert (again.parent_run_id, again.method_run_ids) == (first.parent_run_id, first.method_run_ids)
    assert len(search()) == 3
    client = MlflowClient(tracking_uri=uri)
    assert len(client.get_metric_history(first.method_run_ids["ce"], "val_accuracy")) == 3  # no repeated points
    # cact trained again (one more epoch): its run is replaced; ce's and the parent stay as they are
    _method(run_dir, "cact", 3, [0.72, 0.74, 0.76])
    third = tracking.log_run(run_dir, uri)
    assert third.logged == third.replaced == ["cact"] and third.unchanged == ["run", "ce"]
    assert third.method_run_ids["ce"] == first.method_run_ids["ce"]
    assert third.method_run_ids["cact"] != first.method_run_ids["cact"]
    assert client.get_run(first.method_run_ids["cact"]).info.lifecycle_stage == "deleted"
    runs = search()
    assert len(runs) == 3 and runs.set_index("tags.cact.method").loc["cact", "metrics.val_accuracy"] == 0.76
    # a new report (the parent's artifact) replaces the parent; the unchanged method runs move under the new one
    (run_dir / "report.md").write_text("# report, again\n")
    fourth = tracking.log_run(run_dir, uri)
    assert fourth.logged == ["run"] and fourth.parent_run_id != first.parent_run_id
    runs = search()
    assert len(runs) == 3
    assert (runs[runs["tags.cact.role"] == "method"]["tags.mlflow.parentRunId"] == fourth.parent_run_id).all()


def test_the_standalone_command_logs_any_finished_run_folder(run_dir, uri, search, capsys):
    res = tracking.main([str(run_dir), "--mlflow-uri", uri, "--mlflow-experiment", "mine"])
    assert f"experiment 'mine' at {uri}" in capsys.readouterr().out
    assert len(search("mine")) == 3 and res.parent_run_id in set(search("mine")["run_id"])
    with pytest.raises(SystemExit, match="no finished method"):
        tracking.main([str(_io.claim_run_folder(run_dir.parent / "empty")), "--mlflow-uri", uri])


def test_the_pipeline_flag_is_checked_before_ray_starts(monkeypatch):
    monkeypatch.syspath_prepend(str(PIPELINES))
    from _common import Preset, check_flags, parser

    p = parser("test", Preset("digits", needs_data_root=False))
    args = p.parse_args(["--mlflow-uri", "file:/tmp/x"])
    assert args.mlflow_experiment == "cact-digits"
    check_flags(args)  # mlflow installed: accepted
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    with pytest.raises(SystemExit, match=r"--mlflow-uri needs MLflow: .*pip install -e '\.\[tracking\]'"):
        check_flags(args)
    with pytest.raises(SystemExit, match="--mlflow-experiment must be a non-empty"):
        check_flags(p.parse_args(["--mlflow-uri", "file:/tmp/x", "--mlflow-experiment", ""]))
    check_flags(p.parse_args([]))  # no URI: MLflow is not needed


def test_tune_trials_are_logged_by_ray_s_mlflow_callback(run_dir, uri, search):
    """The sweep's Tune callback, driven by hand as Tune's controller drives it (no Ray run)."""
    base = TrainStageConfig(out=str(run_dir), loop=TrainConfig(method="cact"))
    assert sweep._callbacks(sweep.SweepConfig(base=base), run_dir / "sweep" / "cact") is None
    config = sweep.SweepConfig(base=base, mlflow_uri=uri, mlflow_experiment="cact-digits-sweeps")
    (callback,) = sweep._callbacks(config, run_dir / "sweep" / "cact")

    class Trial:
        config = {"lr": 0.01, "temperature": 0.5}
        local_path = str(run_dir)

        def __str__(self):
            return "trial_00000"

    trial = Trial()
    callback.setup()
    callback.log_trial_start(trial)
    for it in (1, 2):
        callback.log_trial_result(it, trial, {"training_iteration": it, "val_objective": 3.0 - it, "note": "x"})
    callback.log_trial_end(trial)
    runs = search("cact-digits-sweeps")
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["tags.cact.role"] == "trial" and row["tags.cact.method"] == "cact"
    assert row["tags.cact.run_id"] == tracking.run_identity(run_dir) and row["params.lr"] == "0.01"
    history = MlflowClient(tracking_uri=uri).get_metric_history(row["run_id"], "val_objective")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.0)]


def test_metric_keys_and_file_stores():
    assert tracking.metric_key("coverage_mean/aps/standard/alpha0.05") == "coverage_mean/aps/standard/alpha0.05"
    assert tracking.metric_key("a|b*c") == "a_b_c"
    assert tracking.is_file_store("file:/x") and tracking.is_file_store("mlruns")
    assert not tracking.is_file_store("sqlite:///m.db") and not tracking.is_file_store("http://h:5000")


def test_run_identity_follows_the_marker(tmp_path):
    a, b = _io.claim_run_folder(tmp_path / "a"), _io.claim_run_folder(tmp_path / "b")
    assert tracking.run_identity(a) == tracking.run_identity(tmp_path / "b" / ".." / "a") != tracking.run_identity(b)
    before = tracking.run_identity(a)
    marker = json.loads((a / _io.RUN_MARKER).read_text())
    (a / _io.RUN_MARKER).write_text(json.dumps({**marker, "created": "another time"}))  # another run, same path
    assert tracking.run_identity(a) != before
