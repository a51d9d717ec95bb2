"""The library installs and imports like a library: ``cact_ops`` needs only torch, torchsort and numpy (the core
dependencies); Ray, Polars, PyArrow and the rest come with the ``[ray]`` extra and are never imported by it: a
second venv holding only the core runs every cact_ops module and its doctests."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = {"torch", "torchsort", "numpy"}


def _names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}


def test_core_dependencies_are_the_library_s_and_ray_is_an_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _names(project["dependencies"]) == CORE
    assert not any("==" in r for r in project["dependencies"])  # ranges: a library must not pin its users' torch
    extras = project["optional-dependencies"]
    assert {"ray", "polars", "pyarrow", "matplotlib"} <= _names(extras["ray"])
    assert "pytest" in _names(extras["dev"]) and {"ray", "dev", "bench"} <= set(extras)


def _closure(names: set[str]) -> list:
    """The installed distributions ``names`` need (their requirements, recursively, markers evaluated)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    seen, dists, todo = set(), [], list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        dist = md.distribution(name)
        dists.append(dist)
        for text in dist.requires or []:
            req = Requirement(text)
            if not req.marker or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return dists


def test_cact_ops_in_a_second_venv_with_only_the_core_installed(tmp_path):
    """A fresh venv whose site holds only the core dependencies and what they need (linked from this venv,
    nothing downloaded): every cact_ops module imports, its doctests pass, and Ray is simply not there."""
    site = tmp_path / "core-site"
    site.mkdir()
    for dist in _closure(CORE):
        root = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if (root / top).exists() and not (site / top).exists():
                (site / top).symlink_to(root / top)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "core.pth").write_text(f"{site}\n{ROOT}\n")  # the core, and the checkout's cact_ops
    code = textwrap.dedent("""
        import doctest, importlib, importlib.util, pkgutil
        absent = [m for m in ("ray", "polars", "pyarrow", "pandas", "matplotlib", "sklearn", "torchvision", "mlflow")
                  if importlib.util.find_spec(m) is not None]
        assert not absent, f"not a core-only environment: {absent}"
        import cact_ops
        names = [m.name for m in pkgutil.walk_packages(cact_ops.__path__, "cact_ops.")]
        failed = attempted = 0
        for name in names:
            result = doctest.testmod(importlib.import_module(name))
            failed, attempted = failed + result.failed, attempted + result.attempted
        assert failed == 0, failed
        import torch
        from cact_ops.predictors import SplitPredictor
        logits, labels = torch.randn(200, 4), torch.randint(0, 4, (200,))
        print(len(names), attempted, SplitPredictor("lac", alpha=0.1).calibrate(logits, labels).predict(logits).shape)
    """)
    out = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    n, attempted, shape = out.stdout.split(maxsplit=2)
    assert int(n) >= 10 and int(attempted) >= 50 and shape.strip() == "torch.Size([200, 4])"
