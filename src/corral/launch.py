"""How one worker of an app is started: its argv, working directory and environment."""

from __future__ import annotations

import os
import shutil

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
    host = app.worker_host
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
    subst = {"{port}": str(port), "{index}": str(index), "{host}": app.worker_host}
    argv = []
    for arg in app.command:
        for key, value in subst.items():
            arg = arg.replace(key, value)
        argv.append(arg)
    return argv, None


def preflight(app: AppConfig) -> str | None:
    """What would stop every worker of this app from starting (no R, no such command), or None."""
    if not (app.plumber or app.command):
        return None
    try:
        argv, _ = worker_argv(app, 0, 0)
    except LaunchError as exc:
        return str(exc)
    exe = argv[0]
    if os.path.isabs(exe):
        if not os.access(exe, os.X_OK):
            return f"command: {exe!r} is not an executable file"
    elif os.sep not in exe and shutil.which(exe) is None:
        return f"command: {exe!r} not found on PATH"
    return None  # a relative path depends on the directory corral runs in: found out at start


def worker_env(app: AppConfig, port: int, index: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(app.env)
    env["PORT"] = str(port)
    env["CORRAL_WORKER_INDEX"] = str(index)
    env["NODE_APP_INSTANCE"] = str(index)  # what pm2 -i N users' scripts already read
    env["CORRAL_APP"] = app.name
    env["CORRAL_WORKER_HOST"] = app.worker_host  # the address to bind, for commands that read it
    return env
