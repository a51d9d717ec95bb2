"""benchmarks/results/TABLES.md is what benchmarks/results/tables.py makes of the committed measurements.

The tables are regenerated into a temporary path from benchmarks/results/measured/ (no Ray, no data outside the
repo) and compared with the committed file byte for byte: a change to the measurements or to the script that
is not followed by ``python benchmarks/results/tables.py`` fails here.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# A machine-specific location: an absolute path under a home, /tmp, /work, /Users, /root, /scratch, /mnt or /srv,
# a home folder (~/), or the project's own shared data folder.
MACHINE_PATH = re.compile(r"(?<![\w.])(?:~/|/(?:home|tmp|work|Users|root|scratch|mnt|srv)/)|shared/data")


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("results_tables", RESULTS / "tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_committed_tables_are_regenerated_from_measured(tables, tmp_path):
    out = tables.write(tmp_path / "TABLES.md")
    committed = (RESULTS / "TABLES.md").read_bytes()
    assert out.read_bytes() == committed, (
        "benchmarks/results/TABLES.md is stale: run `python benchmarks/results/tables.py` and commit the result")
    assert list(tmp_path.iterdir()) == [out], "the atomic write left a temporary file behind"


def test_tables_have_no_machine_specific_paths(tables):
    text = (RESULTS / "TABLES.md").read_text(encoding="utf-8")
    assert not MACHINE_PATH.search(text), MACHINE_PATH.search(text).group(0)
    assert tables.portable("x.py --data-root /a/b/mnist --out /c/d/run-s0 ok") == "x.py --data-root DATA/mnist --out RUNS/run-s0 ok"


def test_results_scripts_have_no_machine_specific_paths():
    for script in sorted(RESULTS.glob("*.py")):
        text = script.read_text(encoding="utf-8")
        for pattern in (MACHINE_PATH, re.compile(r"\.venv")):
            hit = pattern.search(text)
            assert hit is None, f"{script.name}: machine-specific path {hit.group(0)!r}; take it from a flag or $ENV"
