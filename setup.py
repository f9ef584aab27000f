"""corral's optional compiled data path: CORRAL_COMPILE=1 at install time compiles it with Cython.

The modules of corral's edge/ and datapath/ (corral.COMPILED) are plain Python, compiled as they are (no .pyx,
no C written by hand). By default corral installs as pure Python: on CPython 3.11 that is the faster build
for plumber workers, while the compiled one serves ~15 % more requests when the proxy itself is the
bottleneck (bench/RESULTS.md, issue 13). Without Cython or a C compiler the compiled build falls back to
pure Python, module by module.
At run time CORRAL_PURE_PYTHON=1 makes a compiled install import the .py files instead (tests, benchmarks).
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
    if os.environ.get("CORRAL_COMPILE") != "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("corral: Cython is not installed; installing pure Python", file=sys.stderr)
        return []
    # annotation_typing off: annotations stay documentation, so compiled and pure Python behave the same.
    # binding off: methods become C methods (cheaper to bind and call) instead of introspectable cyfunctions.
    directives = {"language_level": "3", "annotation_typing": False, "binding": False}
    sources = [f"src/corral/{m.replace('.', '/')}.py" for m in COMPILED]
    return cythonize(sources, compiler_directives=directives, quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
