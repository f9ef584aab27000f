"""corral: a supervised fleet of single-threaded web API workers behind one port."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

__version__ = "0.1.0"

# The subpackages setup.py compiles with Cython under CORRAL_COMPILE=1, every module but __init__ (the same
# .py source either way): what py-spy shows on every proxied request (bench/RESULTS.md, issue 13).
COMPILED_PACKAGES = ("edge", "datapath")
_HERE = Path(__file__).parent


def compiled_modules() -> list[str]:
    """The modules the compiled build compiles, as 'package.module' names under corral."""
    return [f"{pkg}.{path.stem}" for pkg in COMPILED_PACKAGES for path in sorted((_HERE / pkg).glob("[!_]*.py"))]


COMPILED = tuple(compiled_modules())
_SLACK_S = 2.0  # a wheel stores times to 2 s; an installed .py may look that much newer than its module


def _compiled_file(name: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _HERE / f"{name.replace('.', '/')}{suffix}"
        if path.exists():
            return path
    return None


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Imports a data-path module from its .py file when asked to (CORRAL_PURE_PYTHON=1 for all of them, or a
    comma list such as `pool,scheduler`, so that tests and benchmarks can run the pure-Python build of an
    installed compiled one, or measure one module at a time: `datapath.pool` or `pool`), and when its compiled
    module is older than the source: an edited checkout never runs stale compiled code."""

    def __init__(self, pure: str) -> None:
        names = {n.strip() for n in pure.split(",")}
        short = {m.rpartition(".")[2]: m for m in COMPILED}
        self.pure = set(COMPILED) if pure.strip() in ("1", "all") else {short.get(n, n) for n in names} & set(COMPILED)

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in COMPILED:
            return None
        source, compiled = _HERE / f"{name.replace('.', '/')}.py", _compiled_file(name)
        if compiled is None or not source.exists():
            return None
        if name not in self.pure:
            if source.stat().st_mtime <= compiled.stat().st_mtime + _SLACK_S:
                return None
            print(f"corral: {source} changed after it was compiled; running it as pure Python "
                  "(rebuild: CORRAL_COMPILE=1 scripts/setup)", file=sys.stderr)  # fmt: skip
        return importlib.util.spec_from_file_location(fullname, source)


def build() -> str:
    """Which build of the data path is running: 'compiled (Cython)', 'pure Python', or the compiled few."""
    loaded = [sys.modules.get(f"{__name__}.{name}") for name in COMPILED]
    native = [m for m in loaded if m is not None and not str(getattr(m, "__file__", "")).endswith(".py")]
    if len(native) == len(COMPILED):
        return "compiled (Cython)"
    if not native:
        return "pure Python"
    return "compiled: " + ", ".join(sorted(m.__name__.partition(".")[2] for m in native))


sys.meta_path.insert(0, _SourceFinder(os.environ.get("CORRAL_PURE_PYTHON", "")))
