"""The architecture contract: corral's modules import only downwards (see [tool.importlinter] in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _lint_imports() -> str:
    beside = Path(sys.executable).parent / "lint-imports"  # the venv's console script
    found = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert found, "lint-imports is missing: it comes with the test extras (scripts/setup --test)"
    return found


def test_import_contracts_are_kept():
    # --no-cache: nothing written into the tree; cwd: lint-imports reads the contracts from pyproject.toml there
    r = subprocess.run([_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"lint-imports exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert "0 broken" in r.stdout
