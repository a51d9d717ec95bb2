"""Every Python example of the README runs as written (with small data: the paths and epochs substituted)."""
from __future__ import annotations

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(title: str) -> str:
    text = README.read_text()
    section = text[text.index(title):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_losses_in_your_own_loop_example_runs_and_moves_the_multipliers(capsys):
    import torch

    scope: dict = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: on a loaded machine more threads cost more than the work (~4x here)
    try:
        exec(compile(_block("### The losses in your own training loop"), "README.md", "exec"), scope)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "lambda:" in out and "SplitPredictor: coverage" in out and "ClasswisePredictor: coverage" in out
    dual, h, loss = scope["dual"], scope["h"], scope["loss"]
    assert loss.dim() == 0  # return_diagnostics=False: the scalar alone
    assert dual.steps == 10 and h.shape == (5,) and [r["epoch"] for r in dual.history] == list(range(10))
    assert bool((dual.lam > 1e-6).any())  # the size target binds somewhere: the multipliers move
    m = scope["m"]  # the class-wise predictor's metrics on the balanced test set (500 rows, 100 per class)
    assert 0.85 <= m["coverage"] <= 1.0 and m["class_coverage"].shape == (5,) and m["size"] >= 1.0


def test_the_frozen_features_example_runs(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes runs/ff relative to the working folder
    scope: dict = {}
    exec(compile(_block("### Frozen features: heads on a backbone you already have"), "README.md", "exec"), scope)
    import polars as pl

    summary = pl.read_parquet(tmp_path / "runs" / "ff" / "eval" / "summary.parquet")
    assert set(summary["method"]) == {"ce", "ce_finetune", "cact"}
    assert scope["feats"].payload["kind"] == "features"


def test_the_custom_pipeline_example_runs_from_any_working_folder(ray_cluster, tmp_path, monkeypatch):
    """Stages chained from Python with the user's own model ("module:Class", built by every Ray worker) and
    relative run folders, from a working folder that is not the checkout."""
    from tests.stages.test_ingest import write_mnist

    write_mnist(tmp_path / "mnist", n_train=(60,) * 10, n_test=(25,) * 10)
    code = _block("## Use the stages from Python")
    for old, new in (('"/data/mnist"', repr(str(tmp_path / "mnist"))), ("epochs=10", "epochs=2"),
                     ('"my_models:Wide"', '"tests.readme_models:Wide"')):
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)  # the example writes runs/my relative to the working folder
    exec(compile(code, "README.md", "exec"), {})
    import polars as pl

    summary = pl.read_parquet(tmp_path / "runs" / "my" / "eval" / "summary.parquet")
    assert set(summary["method"]) == {"ce", "conftr", "cact"} and summary["coverage_mean"].is_finite().all()
    saved = json.loads((tmp_path / "runs" / "my" / "train" / "cact" / "config.json").read_text())
    assert saved["model_family"] == "tests.readme_models:Wide" and saved["num_workers"] == 2


def test_the_plugin_example_is_the_plugin_the_pipeline_test_loads():
    """tests/toy_plugin.py, which the frozen-features pipeline test loads with --plugins, is the README's
    example verbatim: so the example is the one shown to reach the Ray workers and the summary."""
    plugin = (Path(__file__).parent / "toy_plugin.py").read_text().split('"""', 2)[2].lstrip("\n")
    assert _block("### Your own score, metric or method (plugins)") == plugin
