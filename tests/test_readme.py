"""The README's "losses in your own training loop" example runs as written."""
from __future__ import annotations

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
