"""Compiles corral's data path with Cython when it can.

The modules below are plain Python, compiled as they are (no .pyx, no C written by hand). Without Cython or a
C compiler, or with CORRAL_NO_EXTENSIONS=1, corral installs as pure Python and runs the same source; at run
time CORRAL_PURE_PYTHON=1 makes an installed compiled build import the .py files instead (tests, benchmarks).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The list lives beside the import hook that honours it (corral/__init__.py imports only the standard library).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
from corral import COMPILED


class OptionalBuildExt(build_ext):
    """A failed compile leaves that module in pure Python instead of failing the install."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no Python headers: the pure-Python build is complete
            print(f"corral: not compiling the data path ({exc}); installing pure Python", file=sys.stderr)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"corral: {ext.name} stays pure Python ({exc})", file=sys.stderr)


def extensions() -> list:
    if os.environ.get("CORRAL_NO_EXTENSIONS"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("corral: Cython is not installed; installing pure Python", file=sys.stderr)
        return []
    # annotation_typing off: annotations stay documentation, so compiled and pure Python behave the same
    directives = {"language_level": "3", "annotation_typing": False}
    return cythonize([f"src/corral/{m}.py" for m in COMPILED], compiler_directives=directives, quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
