"""A pipeline refuses what it cannot run when it starts: every out-of-range flag and a foreign --out folder are
refused before Ray starts, before any split is built and before anything is written (no Ray needed here)."""
from __future__ import annotations

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
    (["--num-workers", "0"], "--num-workers", ">= 1"),
    (["--sweep", "-1"], "--sweep", ">= 0"),
    (["--seed", "-1"], "--seed", ">= 0"),
    (["--eta-relative", "0"], "--eta-relative", "> 0"),
    (["--lambda-max", "0"], "--lambda-max", "> 0"),
    (["--dual-every-steps", "-1"], "--dual-every-steps", ">= 0"),
    (["--image-size", "0"], "--image-size", ">= 1"),
    (["--model", "bogus"], "--model", "small_cnn"),
    (["--frozen-features", "--sweep", "2"], "--frozen-features with --sweep", "not supported"),
    (["--set", "bogus=1"], "--set bogus", "rho_init"),
    (["--set", "lr=0.1"], "--set lr", "--lr"),
    (["--set", "rho_init=abc"], "--set rho_init=abc", "float"),
    (["--set", "quantile_operator=bogus"], "quantile_operator", "sigmoid"),
]


@pytest.mark.parametrize("argv, flag, accepted", BAD_FLAGS, ids=[" ".join(a) for a, _, _ in BAD_FLAGS])
def test_a_bad_flag_is_refused_before_anything_starts(pipeline, tmp_path, argv, flag, accepted):
    with pytest.raises(SystemExit) as e:
        pipeline(*argv)
    message = str(e.value)
    assert flag in message and accepted in message, message
    assert not (tmp_path / "run").exists()  # nothing written: not even the run folder


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


def test_any_train_config_field_can_be_set(pipeline, monkeypatch):
    """--set FIELD=VALUE reaches the TrainConfig every method trains with (checked before Ray starts)."""
    import _common

    seen = {}
    real = _common._configs

    def spy(*a, **k):
        split_cfg, loop, ev = real(*a, **k)
        seen["loop"] = loop
        return split_cfg, loop, ev

    monkeypatch.setattr(_common, "_configs", spy)
    with pytest.raises(_Started):
        pipeline("--set", "rho_init=10", "quantile_operator=kl", "milestones=[3,4]")
    loop = seen["loop"]
    assert (loop.rho_init, loop.quantile_operator, loop.milestones) == (10.0, "kl", (3, 4))
