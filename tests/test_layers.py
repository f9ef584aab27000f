"""The architecture contract: corral's modules import only downwards (see [tool.importlinter] in pyproject.toml),
and the README's Design table names every module of the tree."""

from __future__ import annotations

import re
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


def _design_table() -> list[str]:
    """The module column of the README's Design table: `path` cells, relative to src/corral/."""
    readme = (ROOT / "README.md").read_text()
    design = readme.split("\n## Design\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in design.splitlines() if line.startswith("| `")]
    return [name for row in rows for name in re.findall(r"`([a-z_/]+\.(?:py|html))`", row.split("|")[1])]


def test_the_readme_design_table_matches_the_tree():
    """Every module of src/corral/ is in the README's Design table once, and the table names no other."""
    package = ROOT / "src" / "corral"
    tree = sorted(
        str(p.relative_to(package))
        for p in [*package.rglob("*.py"), *package.rglob("*.html")]
        if p.name not in ("__init__.py", "__main__.py")
    )
    listed = _design_table()
    assert len(listed) == len(set(listed)), f"listed twice: {sorted({n for n in listed if listed.count(n) > 1})}"
    assert sorted(listed) == tree, (
        f"missing: {sorted(set(tree) - set(listed))}; gone: {sorted(set(listed) - set(tree))}"
    )
