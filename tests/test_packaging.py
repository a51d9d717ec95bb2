"""The library installs and imports like a library: ``cact_ops`` needs only torch, torchsort and numpy (the core
dependencies); Ray, Polars, PyArrow and the rest come with the ``[ray]`` extra and are never imported by it."""
from __future__ import annotations

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


def test_every_cact_ops_module_imports_and_passes_its_doctests_with_ray_and_the_data_stack_unimportable():
    blocked = ("ray", "polars", "pyarrow", "pandas", "matplotlib", "sklearn", "torchvision", "tqdm", "mlflow",
               "stages", "pipelines")
    code = textwrap.dedent(f"""
        import doctest, importlib, importlib.abc, pkgutil, sys
        BLOCKED = {blocked!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not a core dependency)")
        sys.meta_path.insert(0, Block())
        import cact_ops
        names = [m.name for m in pkgutil.walk_packages(cact_ops.__path__, "cact_ops.")]
        failed = 0
        for name in names:  # every module imports, and its doctests pass, without the [ray] extra
            failed += doctest.testmod(importlib.import_module(name)).failed
        assert failed == 0, failed
        import torch
        from cact_ops.predictors import SplitPredictor
        logits, labels = torch.randn(200, 4), torch.randint(0, 4, (200,))
        print(len(names), SplitPredictor("lac", alpha=0.1).calibrate(logits, labels).predict(logits).shape)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    n, shape = out.stdout.split(maxsplit=1)
    assert int(n) >= 10 and shape.strip() == "torch.Size([200, 4])"
