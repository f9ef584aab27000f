"""How one worker of an app is started: its argv, working directory and environment."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .config import AppConfig, resolve_plumber


class LaunchError(Exception):
    pass


def r_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def plumber_argv(app: AppConfig) -> tuple[list[str], str]:
    """The plumber guides' runner, `plumb(APP)$run(port=...)`, with plumber attached and docs off."""
    target = resolve_plumber(app.plumber or "")
    if target is None:
        raise LaunchError(f"plumber: {app.plumber!r} is not a .R file or a directory with plumber.R/entrypoint.R")
    rscript = shutil.which("Rscript")
    if rscript is None:
        raise LaunchError("Rscript not found: install R (Debian: apt-get install r-base-core r-cran-plumber)")
    if target.is_dir():
        cwd, plumb = str(target), "plumb(dir = '.')"
    else:
        cwd, plumb = str(target.parent), f"plumb(file = {r_string(target.name)})"
    host = os.environ.get("CORRAL_WORKER_HOST", "127.0.0.1")
    expr = (
        "suppressPackageStartupMessages(library(plumber)); "
        f"pr <- {plumb}; "
        f"pr$run(host = {r_string(host)}, port = as.integer(Sys.getenv('PORT')), "
        f"docs = {'TRUE' if app.docs else 'FALSE'}, quiet = TRUE)"
    )
    return [rscript, "--no-save", "--no-restore", "-e", expr], cwd


def worker_argv(app: AppConfig, port: int, index: int) -> tuple[list[str], str | None]:
    if app.plumber:
        return plumber_argv(app)
    if not app.command:
        raise LaunchError("no command to run")
    argv = [a.replace("{port}", str(port)).replace("{index}", str(index)) for a in app.command]
    return argv, None


def worker_env(app: AppConfig, port: int, index: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(app.env)
    env["PORT"] = str(port)
    env["CORRAL_WORKER_INDEX"] = str(index)
    env["NODE_APP_INSTANCE"] = str(index)  # what pm2 -i N users' scripts already read
    env["CORRAL_APP"] = app.name
    return env


def app_label(app: AppConfig) -> str:
    if app.plumber:
        return Path(app.plumber).name
    return " ".join(app.command)
