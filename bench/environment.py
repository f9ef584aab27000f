"""Install what the bench needs (only when missing) and describe the machine."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
APT_PACKAGES = ["nginx", "haproxy", "wrk", "r-base-core", "r-cran-plumber"]
TOOLS = ["nginx", "haproxy", "wrk", "Rscript"]
PLUMBER_CHECK = 'quit(status = if (requireNamespace("plumber", quietly = TRUE)) 0 else 1)'


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _plumber_installed() -> bool:
    return shutil.which("Rscript") is not None and _run(["Rscript", "-e", PLUMBER_CHECK]).returncode == 0


def ensure_tools(log: Callable[[str], None]) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not missing and _plumber_installed():
        return
    log(f"installing from Debian (missing: {missing or ['plumber']}) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES],
        check=True, env=env, timeout=1800,
    )  # fmt: skip


def corral_importable() -> bool:
    return _run([sys.executable, "-c", "import corral.cli.main"]).returncode == 0


def ensure_corral(log: Callable[[str], None]) -> str | None:
    """pip-install the repo if corral is not importable; returns an error message or None."""
    if corral_importable():
        return None
    log(f"installing corral: pip install -e {REPO} ...")
    out = _run([sys.executable, "-m", "pip", "install", "-q", "-e", str(REPO)], timeout=600)
    if out.returncode != 0 or not corral_importable():
        return f"corral not importable after pip install -e: {(out.stderr or out.stdout).strip()[-500:]}"
    return None


def corral_command() -> list[str] | None:
    """How to launch corral: the console script next to this interpreter, else via python."""
    if not corral_importable():
        return None
    script = Path(sys.executable).parent / "corral"
    if script.exists():
        return [str(script)]
    found = shutil.which("corral")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from corral.cli.main import main; sys.argv[0] = 'corral'; main()"]


def _first_line(argv: list[str]) -> str:
    try:
        out = _run(argv, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "n/a"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _nproc() -> str:
    return _first_line(["nproc"]) if shutil.which("nproc") else str(os.cpu_count())


def _corral_version() -> str:
    try:
        return importlib.metadata.version("corral")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _word(text: str, i: int) -> str:
    words = text.split()
    return words[i] if len(words) > i else text


def machine() -> dict[str, str]:
    return {"nproc": _nproc(), "cpu": _cpu_model(), "kernel": platform.release()}


def versions() -> dict[str, str]:
    return {
        "R": _first_line(["Rscript", "-e", 'cat(R.version$major, R.version$minor, sep = ".")']),
        "plumber": _first_line(["Rscript", "-e", 'cat(as.character(packageVersion("plumber")))']),
        "httpuv": _first_line(["Rscript", "-e", 'cat(as.character(packageVersion("httpuv")))']),
        "nginx": _first_line(["nginx", "-v"]).removeprefix("nginx version: nginx/"),
        "haproxy": _word(_first_line(["haproxy", "-v"]), 2),
        "wrk": _word(_first_line(["wrk", "-v"]), 1),
        "python": platform.python_version(),
        "corral": _corral_version(),
    }
