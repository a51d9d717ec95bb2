"""A pipeline refuses what it cannot run when it starts: every out-of-range flag and a foreign --out folder are
refused before Ray starts, before any split is built and before anything is written (no Ray needed here)."""
from __future__ import annotations

import dataclasses
import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "pipelines" / "digits_lt.py"


class _Started(Exception):
    """Raised by the stand-ins of ray.init and longtail.build: the pipeline got past its checks."""


@pytest.fixture
def pipeline(monkeypatch, tmp_path):
    import ray

    from stages import longtail

    def started(*a, **k):
        raise _Started

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", started)
    monkeypatch.setattr(longtail, "build", started)
    monkeypatch.syspath_prepend(str(SCRIPT.parent))

    def run(*argv: str, out: Path | None = None):
        out = out or tmp_path / "run"
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--out", str(out), *argv])
        runpy.run_path(str(SCRIPT), run_name="__main__")

    return run


BAD_FLAGS = [
    (["--alpha", "1.2"], "--alpha", "(0, 1)"),
    (["--alpha", "0"], "--alpha", "(0, 1)"),
    (["--alpha", "0.1", "0.1"], "--alpha", "distinct"),
    (["--n-splits", "0"], "--n-splits", ">= 1"),
    (["--train-alpha", "0"], "--train-alpha", "(0, 1)"),
    (["--lr", "0"], "--lr", "> 0"),
    (["--lr", "-0.1"], "--lr", "> 0"),
    (["--lr", "nan"], "--lr", "> 0"),
    (["--epochs", "0"], "--epochs", ">= 1"),
    (["--finetune-epochs", "0"], "--finetune-epochs", ">= 1"),
    (["--batch-size", "1"], "--batch-size", ">= 2"),
    (["--temperature", "0"], "--temperature", "> 0"),
    (["--val-fraction", "0"], "--val-fraction", "(0, 1)"),
    (["--val-fraction", "1"], "--val-fraction", "(0, 1)"),
    (["--imbalance-factor", "0.5"], "--imbalance-factor", ">= 1"),
    (["--num-workers", "-1"], "--num-workers", ">= 0 (0: local mode, this process trains)"),
    (["--sweep", "-1"], "--sweep", ">= 0"),
    (["--seed", "-1"], "--seed", ">= 0"),
    (["--eta-relative", "0"], "--eta-relative", "> 0"),
    (["--lambda-max", "0"], "--lambda-max", "> 0"),
    (["--dual-every-steps", "-1"], "--dual-every-steps", ">= 0"),
    (["--image-size", "0"], "--image-size", ">= 1"),
    (["--model", "bogus"], "--model", "small_cnn"),
    (["--frozen-features", "--sweep", "2"], "--frozen-features with --sweep", "not supported"),
    (["--rho-step", "-2"], "--rho-step", ">= 0"),
    (["--momentum", "1"], "--momentum", "[0, 1)"),
    (["--milestones", "5", "-1"], "--milestones", "epochs"),
    (["--lambda-init", "1e7"], "lambda_init <= lambda_max", "invalid training settings"),
    (["--eta", "1", "--eta-relative", "0.5"], "--eta and --eta-relative", "one of them"),
    (["--infer-actors", "0"], "--infer-actors", ">= 1"),
    (["--scores", "lac,bogus"], "--scores", "known: "),
    (["--out", "s3://bucket/run", "--mlflow-uri", "file:/tmp/mlruns"], "--mlflow-uri with a URI --out",
     "not supported yet"),
]


@pytest.mark.parametrize("argv, flag, accepted", BAD_FLAGS, ids=[" ".join(a) for a, _, _ in BAD_FLAGS])
def test_a_bad_flag_is_refused_before_anything_starts(pipeline, tmp_path, argv, flag, accepted):
    with pytest.raises(SystemExit) as e:
        pipeline(*argv)
    message = str(e.value)
    assert flag in message and accepted in message, message
    assert not (tmp_path / "run").exists()  # nothing written: not even the run folder


@pytest.mark.parametrize("argv, message", [
    (["--rho-init", "abc"], "argument --rho-init: invalid float value: 'abc'"),
    (["--quantile-operator", "bogus"],
     "argument --quantile-operator: invalid choice: 'bogus' (choose from l2, kl, sigmoid)"),
    (["--set", "rho_init=1"], "unrecognized arguments: --set"),
    (["--plugins", "no_such_plugin_module"], "--plugins: plugin 'no_such_plugin_module' could not be imported"),
    (["--augment", "bogus"], "invalid choice: 'bogus'"),
])
def test_a_malformed_flag_is_refused_by_the_parser(pipeline, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        pipeline(*argv)
    assert message in capsys.readouterr().err.replace("'l2', 'kl', 'sigmoid'", "l2, kl, sigmoid")
    assert not (tmp_path / "run").exists()


def test_every_bad_flag_is_named_at_once(pipeline, tmp_path):
    with pytest.raises(SystemExit) as e:
        pipeline("--lr", "0", "--epochs", "0", "--alpha", "2")
    assert all(flag in str(e.value) for flag in ("--lr", "--epochs", "--alpha"))


def test_good_flags_reach_ray_and_the_run_folder_is_marked(pipeline, tmp_path):
    with pytest.raises(_Started):
        pipeline("--epochs", "1", "--alpha", "0.1")
    marker = json.loads((tmp_path / "run" / ".cact-run.json").read_text())
    assert marker["project"] == "cact" and marker["created"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".cact-run.json"]  # the marker, first


def test_a_foreign_out_folder_is_refused_and_left_untouched(pipeline, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')  # not a run config: no "pipeline" key
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit) as e:
        pipeline(out=mine)
    message = str(e.value)
    assert "--out" in message and str(mine) in message and "not created by CaCT" in message
    assert "choose a new or empty folder" in message
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "notes.txt"]
    assert (mine / "config.json").read_text() == '{"my": "settings"}'


def test_a_run_folder_of_an_older_version_is_recognised(pipeline, tmp_path):
    old = tmp_path / "old"
    (old / "train" / "ce").mkdir(parents=True)
    (old / "config.json").write_text(json.dumps({"pipeline": "digits", "args": {}}))
    with pytest.raises(_Started):  # accepted: the pipeline goes on to start Ray
        pipeline(out=old)
    assert json.loads((old / ".cact-run.json").read_text())["project"] == "cact"


def test_every_train_config_field_has_a_flag_with_its_documentation(pipeline, monkeypatch, capsys):
    """Each TrainConfig field (but method, epochs and seed, which the pipeline sets) is a flag of its own name,
    its help the field's comment and the preset's default; what is given reaches every method's TrainConfig."""
    import _common
    from cact_ops.training import TrainConfig

    seen = {}
    real = _common._configs

    def spy(*a, **k):
        split_cfg, loop, ev = real(*a, **k)
        seen["loop"] = loop
        return split_cfg, loop, ev

    monkeypatch.setattr(_common, "_configs", spy)
    with pytest.raises(_Started):
        pipeline("--rho-init", "10", "--quantile-operator", "kl", "--milestones", "3", "4", "--no-amp", "--eta", "0.7")
    loop = seen["loop"]
    assert (loop.rho_init, loop.quantile_operator, loop.milestones, loop.amp) == (10.0, "kl", (3, 4), False)
    assert (loop.eta, loop.eta_relative, loop.batch_size) == (0.7, None, 64)  # --eta: absolute; batch: the preset
    with pytest.raises(SystemExit):
        pipeline("--help")
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        assert _common.loop_flag(f.name).split(" ")[0] in text, f.name
    assert "--train-alpha TRAIN_ALPHA miscoverage level of the training-time threshold" in text
    assert "--batch-size BATCH_SIZE global mini-batch size (split across Ray Train workers) (default: 64)" in text
    assert "--data-root DATA_ROOT not needed: scikit-learn's bundled digits" in text
    assert "(default: None)" not in text and "--no-resume retrain every method even when" in text
