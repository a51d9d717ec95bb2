"""What the project writes into, and what it reuses: run folders are claimed (marked) before anything is written
and a foreign folder is refused; a finished training run is reused only when its outputs load. No Ray here."""
from __future__ import annotations

import json
import re
import warnings

import polars as pl
import pytest
import torch

from cact_ops.models import build_model
from cact_ops.training import TrainConfig
from stages import _io, train, train_run

# ----------------------------------------------------------------------------------------------------------
# claim_run_folder


def test_a_new_or_empty_folder_is_created_and_marked_first(tmp_path):
    new = _io.claim_run_folder(tmp_path / "a" / "run")
    assert [p.name for p in new.iterdir()] == [_io.RUN_MARKER]
    marker = json.loads((new / _io.RUN_MARKER).read_text())
    assert marker["project"] == "cact" and marker["created"] and marker["adopted_existing_run"] is False
    (tmp_path / "empty").mkdir()
    assert _io.is_run_folder(_io.claim_run_folder(tmp_path / "empty"))


def test_a_marked_folder_is_reused_as_it_is(tmp_path):
    run = _io.claim_run_folder(tmp_path / "run")
    (run / "train").mkdir()
    (run / "notes.txt").write_text("x")
    before = (run / _io.RUN_MARKER).read_text()
    assert _io.claim_run_folder(run) == run
    assert (run / _io.RUN_MARKER).read_text() == before and (run / "notes.txt").read_text() == "x"


def test_a_foreign_folder_is_refused_and_untouched(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    (home / "config.json").write_text(json.dumps({"editor": "vim"}))  # a config.json, but not a run's
    (home / "splits").mkdir()
    with pytest.raises(FileExistsError, match=r"home is not empty and was not created by CaCT.*\.cact-run\.json.*"
                                              r"choose a new or empty folder"):
        _io.claim_run_folder(home)
    assert sorted(p.name for p in home.iterdir()) == ["config.json", "splits", "thesis.tex"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        _io.claim_run_folder(tmp_path / "file")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / _io.RUN_MARKER).write_text("{not json")
    with pytest.raises(FileExistsError, match="not a readable CaCT run marker"):
        _io.claim_run_folder(bad)


@pytest.mark.parametrize("sub", ["train", "splits"])
def test_a_run_folder_of_an_older_version_is_recognised_and_marked(tmp_path, sub):
    old = tmp_path / "old"
    (old / sub).mkdir(parents=True)
    (old / "config.json").write_text(json.dumps({"pipeline": "digits", "args": {"epochs": 3}}))
    assert _io.claim_run_folder(old) == old
    assert json.loads((old / _io.RUN_MARKER).read_text())["adopted_existing_run"] is True
    assert json.loads((old / "config.json").read_text())["pipeline"] == "digits"  # untouched


# ----------------------------------------------------------------------------------------------------------
# Verify before reuse: stages.train_run.reusable / _result_from_disk


def _finished(tmp_path, method="ce") -> train.TrainStageConfig:
    """A finished run's outputs, written by the stage's own writer (no training needed)."""
    config = train.TrainStageConfig(out=str(tmp_path / "run"), loop=TrainConfig(method=method, epochs=1))
    spec = {"family": "linear", "num_classes": 3, "kwargs": {"in_features": 4}}
    state = {"model": build_model("linear", 3, in_features=4).state_dict(), "epoch": 1,
             "history": [{"epoch": 0, "class": k, "lambda": 0.0} for k in range(3)],
             "metrics": [{"epoch": 0, "val_accuracy": 0.5}], "dual": None}
    train_run.write_outputs(config, spec, state, 1.0)
    return config


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "model.pt": _truncate,
    "metrics.parquet": _truncate,
    "history.parquet": lambda p: p.write_bytes(b""),
    "config.json": lambda p: p.write_text('{"loop": '),
}


@pytest.mark.parametrize("name", DAMAGES)
def test_a_damaged_output_is_not_reused_but_trained_again(tmp_path, name):
    config = _finished(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train_run.reusable(config) and config.run_name is None  # intact: reused, silently
    DAMAGES[name](config.method_dir / name)
    with pytest.warns(UserWarning, match=rf"{re.escape(str(config.method_dir / name))} is damaged.*training ce again"):
        assert not train_run.reusable(config)
    # its own Ray Train run: the new training starts afresh, not from the old run's last checkpoint
    assert config.run_name.startswith("ce-repair-")
    again = train.TrainStageConfig(out=config.out, loop=config.loop)
    with pytest.warns(UserWarning):
        train_run.reusable(again)
    assert again.run_name == config.run_name  # stable while the files stay as they are: a rerun resumes it


def test_a_missing_config_json_means_unfinished_and_is_trained_again(tmp_path):
    config = _finished(tmp_path)
    (config.method_dir / "config.json").unlink()
    with pytest.warns(UserWarning, match=r"config.json is damaged \(missing"):
        assert not train_run.reusable(config)


def test_a_crash_while_writing_outputs_leaves_an_unfinished_run_not_new_files_under_the_old_config(
        tmp_path, monkeypatch):
    config = _finished(tmp_path)
    (config.method_dir / "dual.json").write_text('{"history": [], "config": {}}')  # as a CaCT run would leave
    redo = train.TrainStageConfig(out=config.out, loop=config.loop, overwrite=True)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(train._io, "write_parquet", crash)  # model.pt is written, then the write dies
    spec = {"family": "linear", "num_classes": 3, "kwargs": {"in_features": 4}}
    state = {"model": build_model("linear", 3, in_features=4).state_dict(), "epoch": 1, "history": [],
             "metrics": [], "dual": None}
    with pytest.raises(OSError, match="disk full"):
        train_run.write_outputs(redo, spec, state, 1.0)
    monkeypatch.undo()
    assert not (config.method_dir / "config.json").exists()  # no commit marker: the new model.pt is not reused
    with pytest.warns(UserWarning, match=r"config.json is damaged \(missing"):
        assert not train_run.reusable(train.TrainStageConfig(out=config.out, loop=config.loop))
    train_run.write_outputs(redo, spec, {**state, "metrics": [{"epoch": 0}], "history": [{"epoch": 0}]}, 1.0)
    assert train_run.reusable(train.TrainStageConfig(out=config.out, loop=config.loop))
    assert not (config.method_dir / "dual.json").exists()  # a CE-type run keeps no earlier multipliers


def test_another_config_is_still_refused_and_overwrite_still_retrains(tmp_path):
    config = _finished(tmp_path)
    other = train.TrainStageConfig(out=config.out, loop=TrainConfig(method="ce", epochs=2))
    with pytest.raises(ValueError, match=r"another config; pass overwrite=True \(a pipeline's --no-resume\)"):
        train_run.reusable(other)
    assert not train_run.reusable(train.TrainStageConfig(out=config.out, loop=config.loop, overwrite=True))


def test_a_result_read_from_damaged_outputs_names_the_file(tmp_path):
    config = _finished(tmp_path)
    assert train_run.result_from_disk(config).final_metrics["val_accuracy"] == 0.5
    _truncate(config.method_dir / "metrics.parquet")
    with pytest.raises(RuntimeError, match=rf"{re.escape(str(config.method_dir / 'metrics.parquet'))} does not load"):
        train_run.result_from_disk(config, reused=True)
    pl.DataFrame({"epoch": [0]}).write_parquet(config.method_dir / "metrics.parquet")
    torch.save({"not": "a model"}, config.method_dir / "model.pt")
    with pytest.raises(RuntimeError, match="model.pt does not load.*not a model file"):
        train_run.result_from_disk(config)
