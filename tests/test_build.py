"""The optional compiled data path and the pure-Python default (setup.py, corral/__init__.py).

CI runs the whole suite twice (scripts/test): once on the compiled build that `CORRAL_COMPILE=1
scripts/setup` makes, once with CORRAL_PURE_PYTHON=1. These tests check that each pass really runs the
build it claims to, and that a checkout edited after its build never runs stale compiled code.
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import get, stub_args

import corral as package

PACKAGE = Path(package.__file__).parent
PURE = bool(os.environ.get("CORRAL_PURE_PYTHON"))
COMPILED_BUILD = os.environ.get("CORRAL_COMPILE") == "1"  # scripts/test sets it for both passes


def _compiled(name: str) -> Path | None:
    stem = PACKAGE / name.replace(".", "/")
    return next((p for s in importlib.machinery.EXTENSION_SUFFIXES if (p := Path(f"{stem}{s}")).exists()), None)


def _where(pythonpath: Path | None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Import the data path in a fresh interpreter; print each module's file and corral.build()."""
    code = (
        "import importlib, corral\n"
        "for n in corral.COMPILED: print(importlib.import_module('corral.' + n).__file__)\n"
        "print(corral.build())\n"
    )
    full = dict(os.environ, **(env or {}))
    if pythonpath is not None:
        full["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=60)


def test_the_suite_runs_the_build_it_claims(corral):
    """CORRAL_COMPILE=1 scripts/setup compiles every data-path module; corral says at start which build
    serves."""
    missing = [n for n in package.COMPILED if _compiled(n) is None]
    if COMPILED_BUILD:
        assert not missing, f"CORRAL_COMPILE=1 scripts/setup left these uncompiled: {missing}"
    c = corral(stub_args(), workers=1)
    assert get(c.port, "/x").status == 200
    want = "compiled (Cython)" if not missing and not PURE else "pure Python"
    assert f"data path {want}" in c.log()


def test_pure_python_switch_imports_every_module_from_source():
    out = _where(None, {"CORRAL_PURE_PYTHON": "1"})
    assert out.returncode == 0, out.stderr
    *files, build = out.stdout.split("\n")[:-1]
    assert all(f.endswith(".py") for f in files), files
    assert build == "pure Python"


@pytest.mark.skipif(PURE or not COMPILED_BUILD, reason="needs the compiled build (CI's first pass)")
def test_a_source_edited_after_its_build_runs_as_pure_python(tmp_path):
    """Editing edge/request.py in a checkout must take effect at once, not wait for a rebuild."""
    copy = tmp_path / "corral"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.c"), copy_function=shutil.copy2)
    edited = copy / "edge" / "request.py"
    later = _compiled("edge.request").stat().st_mtime + 60  # type: ignore[union-attr]
    os.utime(edited, (later, later))
    out = _where(tmp_path)
    assert out.returncode == 0, out.stderr
    files = out.stdout.split("\n")[: len(package.COMPILED)]
    assert files[package.COMPILED.index("edge.request")] == str(edited)
    assert all(not f.endswith(".py") for f in files if f != str(edited)), files
    assert "request.py changed after it was compiled; running it as pure Python" in out.stderr
    assert out.stdout.split("\n")[-2].startswith("compiled: ")  # the rest stays compiled


def test_without_compiled_modules_corral_is_complete_pure_python(tmp_path):
    """What a machine without a C compiler installs: the .py files alone serve."""
    shutil.copytree(PACKAGE, tmp_path / "corral", ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.so"))
    out = _where(tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "pure Python"
    assert "changed after" not in out.stderr
