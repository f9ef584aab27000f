"""corral built from a git revision, measured side by side with the current tree.

`bench/compare --baseline REV` extracts REV's tree with `git archive` into the run's temp dir (read-only
git: nothing is checked out, stashed or committed) and runs it with the same Python, `-m corral`, with
PYTHONPATH pointing at the extracted `src/`. Every scenario then measures it as an extra proxy named
`corral@<short sha>`, right next to the current tree's corral, over the same worker processes.

`--corral-rev REV` does the same for the `corral` column itself, for when the working tree is not what
should be measured (e.g. someone is editing src/ while the bench runs: each corral start re-imports it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREFIX = "corral@"


class BaselineError(RuntimeError):
    """The revision cannot be resolved, extracted or imported."""


@dataclass(frozen=True)
class CorralBuild:
    """How to launch one corral: argv up to `run`, and PYTHONPATH when it runs from an extracted tree."""

    argv: tuple[str, ...]
    pythonpath: str | None = None

    def env(self) -> dict[str, str] | None:
        """The child's environment, or None to inherit ours unchanged."""
        if self.pythonpath is None:
            return None
        return {**os.environ, "PYTHONPATH": self.pythonpath}


@dataclass(frozen=True)
class Revision:
    """One extracted git revision of corral and how to launch it."""

    rev: str  # as given on the command line
    commit: str  # full sha
    short: str
    build: CorralBuild

    @property
    def name(self) -> str:
        """Its column when it runs as the baseline."""
        return f"{PREFIX}{self.short}"

    def describe(self) -> str:
        return f"git revision {self.commit} (extracted)"


def is_baseline(target: str) -> bool:
    return target.startswith(PREFIX)


def _git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        raise BaselineError(f"git {' '.join(args)}: {(out.stderr or out.stdout).strip()}")
    return out.stdout.strip()


def resolve(rev: str) -> tuple[str, str]:
    """(full sha, short sha) of a commit."""
    try:
        commit = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except BaselineError:
        raise BaselineError(f"{rev!r} is not a commit of {REPO}") from None
    return commit, _git("rev-parse", "--short", commit)


def extract(commit: str, dest: Path) -> Path:
    """`git archive COMMIT | tar -x -C dest`; returns dest/src."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", commit], stdout=subprocess.PIPE)
    assert archive.stdout is not None
    tar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, capture_output=True, check=False)
    archive.stdout.close()
    if archive.wait(60) != 0 or tar.returncode != 0:
        raise BaselineError(f"git archive {commit} | tar -x failed: {tar.stderr.decode(errors='replace').strip()}")
    src = dest / "src"
    if not (src / "corral" / "__main__.py").exists():
        raise BaselineError(f"{commit} has no src/corral/__main__.py (needed for `python -m corral`)")
    return src


def check_imports_from(build: CorralBuild, src: Path) -> None:
    """The extracted tree, not the editable install of the current one, must be what `-m corral` runs."""
    probe = [sys.executable, "-c", "import corral.cli.main, corral; print(corral.__file__)"]
    out = subprocess.run(probe, capture_output=True, text=True, env=build.env(), timeout=60, check=False)
    where = Path(out.stdout.strip()).resolve() if out.returncode == 0 else None
    if where is None or not where.is_relative_to(src.resolve()):
        raise BaselineError(f"baseline corral does not import from {src}: {(out.stderr or out.stdout).strip()}")


def prepare(rev: str, tmp: Path) -> Revision:
    commit, short = resolve(rev)
    src = extract(commit, tmp / f"rev-{short}")
    build = CorralBuild((sys.executable, "-m", "corral"), str(src))
    check_imports_from(build, src)
    return Revision(rev, commit, short, build)


def current_tree() -> str:
    """HEAD's short sha, flagged when src/ has uncommitted changes (they are part of what runs)."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", "src")
    except BaselineError:
        return "unknown"
    return f"the working tree at {head}" + (", with uncommitted changes in src/" if dirty else "")
