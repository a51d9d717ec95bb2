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
    scope: dict = {}
    exec(compile(_block("### The losses in your own training loop"), "README.md", "exec"), scope)
    assert "lambda:" in capsys.readouterr().out
    dual, h = scope["dual"], scope["h"]
    assert dual.steps == 10 and h.shape == (5,)
    assert bool((dual.lam > 1e-6).any())  # the size target binds somewhere: the multipliers move
