"""How one worker of an app is started: its argv, working directory and environment."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..config import SERVER_YML, AppConfig, envfile, resolve_plumber, resolve_shiny
from ..net import is_loopback


class LaunchError(Exception):
    pass


# "tcp" here makes `auto` mean tcp for every app, whatever the config: CI runs the suite once so, to test
# plumber on both transports (scripts/test). A config's or the command line's tcp/unix still wins.
AUTO_TRANSPORT_ENV = "CORRAL_AUTO_TRANSPORT"


def transport(app: AppConfig) -> str:
    """How corral reaches this app's workers: "tcp" or "unix". `auto` is unix for a plumber app whose workers
    listen on loopback: over a Unix socket httpuv costs the kernel less per request than loopback TCP, keep-alive
    has no delayed-ACK stall, and no other local process can reach a worker behind the edge (bench/RESULTS.md,
    issue 13), and for a command that takes {socket}. A worker_host other than loopback asks for workers
    others can reach, so it stays on tcp, as do Shiny (its WebSocket tunnel runs on tcp), plumber2 (api_run
    takes a host and a port) and commands that take {port}."""
    if app.worker_transport != "auto":
        return app.worker_transport
    if app.upstreams or app.shiny or os.environ.get(AUTO_TRANSPORT_ENV) == "tcp":
        return "tcp"
    if app.command:
        return "unix" if "{socket}" in " ".join(app.command) else "tcp"
    if not is_loopback(app.worker_host):
        return "tcp"
    try:
        return "unix" if r_engine(app) == "plumber" else "tcp"
    except LaunchError:  # reported when the worker starts
        return "tcp"


def r_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def plumber_argv(app: AppConfig) -> tuple[list[str], str]:
    """The plumber guides' runner, `plumb(APP)$run(port=...)`, with plumber attached and docs off."""
    target = resolve_plumber(app.plumber or "")
    if target is None:
        raise LaunchError(f"plumber: {app.plumber!r} is not a .R file or a directory with plumber.R/entrypoint.R")
    if r_engine(app) == "plumber2":
        return plumber2_argv(app, target)
    rscript = shutil.which("Rscript")
    if rscript is None:
        raise LaunchError("Rscript not found: install R (Debian: apt-get install r-base-core r-cran-plumber)")
    if target.is_dir():
        cwd, plumb = str(target), "plumb(dir = '.')"
    else:
        cwd, plumb = str(target.parent), f"plumb(file = {r_string(target.name)})"
    host = app.worker_host
    if transport(app) == "unix":
        return [rscript, "--no-save", "--no-restore", "-e", plumber_pipe_expr(plumb, app.docs)], cwd
    expr = (
        "suppressPackageStartupMessages(library(plumber)); "
        f"pr <- {plumb}; "
        f"pr$run(host = {r_string(host)}, port = as.integer(Sys.getenv('PORT')), "
        f"docs = {'TRUE' if app.docs else 'FALSE'}, quiet = TRUE)"
    )
    return [rscript, "--no-save", "--no-restore", "-e", expr], cwd


def plumber_pipe_expr(plumb: str, docs: bool) -> str:
    """plumber on the Unix socket $CORRAL_WORKER_SOCKET: what `pr$run()` does, with httpuv's
    startPipeServer in place of runServer (the router is an httpuv app: call, onHeaders, onWSOpen).
    run() also reads the plumber.maxRequestSize option and mounts the docs; both are done here the same
    way. Mask 077: the socket itself is 0600, inside corral's 0700 directory. service(0) is runServer's
    own serving loop."""
    mount = (
        "plumber:::mount_docs(pr, '127.0.0.1', 0L, plumber:::upgrade_docs_parameter(TRUE), NULL, quiet = TRUE); "
        if docs
        else ""
    )
    return (
        "suppressPackageStartupMessages(library(plumber)); "
        f"pr <- {plumb}; "
        "pr$.__enclos_env__$private$maxSize <- getOption('plumber.maxRequestSize', 0); "
        f"{mount}"
        "invisible(httpuv::startPipeServer(Sys.getenv('CORRAL_WORKER_SOCKET'), strtoi('077', 8L), pr)); "
        "httpuv::service(0)"
    )


# An R file that attaches or calls plumber2 is a plumber2 app; plumber and plumber2 annotations look alike.
_USES_PLUMBER2 = re.compile(r"\b(?:library|require|requireNamespace)\(\s*[\"']?plumber2\b|\bplumber2::")
_YML_ENGINE = re.compile(r"^engine:\s*[\"']?([^\"'#\s]+)", re.MULTILINE)


def r_engine(app: AppConfig) -> str:
    """How a `plumber` app runs: "plumber" or "plumber2". `engine` when set; else plumber2 for a
    _server.yml (or a directory with one) and for an R file that attaches plumber2, plumber otherwise."""
    if app.engine != "auto":
        return app.engine
    target = resolve_plumber(app.plumber or "")
    if target is None:
        return "plumber"
    yml = server_yml(target)
    if yml is not None:
        engine = yml_engine(yml)
        if engine == "plumber2":
            return "plumber2"
        if not target.is_dir() or not any((target / n).is_file() for n in ("plumber.R", "entrypoint.R")):
            raise LaunchError(
                f"plumber: {yml}: engine {engine or '(none)'!r}: corral runs _server.yml apps of engine plumber2"
            )
        return "plumber"  # a plumber.R beside another engine's _server.yml: the plumber app
    if target.is_file():
        try:
            text = target.read_text(errors="replace")
        except OSError:
            return "plumber"
        if _USES_PLUMBER2.search(text):
            return "plumber2"
    return "plumber"


def server_yml(target: Path) -> Path | None:
    """The _server.yml a plumber target is or holds, if any."""
    if target.is_file():
        return target if target.name in SERVER_YML else None
    return next((target / n for n in SERVER_YML if (target / n).is_file()), None)


def yml_engine(path: Path) -> str | None:
    """The `engine:` of a _server.yml (its first key by the standard); no YAML parser needed for one line."""
    try:
        m = _YML_ENGINE.search(path.read_text(errors="replace"))
    except OSError:
        return None
    return m.group(1) if m else None


def plumber2_argv(app: AppConfig, target: Path) -> tuple[list[str], str]:
    """`plumber2::api(APP) |> plumber2::api_run(host, port = PORT)` in the app's directory: APP is the
    _server.yml when there is one, else the file (or the directory, whose R files plumber2 reads).
    corral's docs default (off) becomes doc_type = NULL; the host and port always come from corral,
    over any in _server.yml."""
    rscript = shutil.which("Rscript")
    if rscript is None:
        raise LaunchError("Rscript not found: install R, then plumber2 from CRAN: install.packages('plumber2')")
    if app.worker_transport == "unix":
        raise LaunchError("worker_transport unix: plumber2 apps run on tcp (api_run takes a host and a port)")
    if target.is_dir():
        yml = server_yml(target)
        cwd, what = str(target), yml.name if yml is not None else "."
    else:
        cwd, what = str(target.parent), target.name
    docs = "" if app.docs else ", doc_type = NULL"
    expr = (
        "suppressPackageStartupMessages(library(plumber2)); "
        f"plumber2::api({r_string(what)}{docs}) |> "
        f'plumber2::api_run(host = {r_string(app.worker_host)}, port = as.integer(Sys.getenv("PORT")))'
    )
    return [rscript, "--no-save", "--no-restore", "-e", expr], cwd


def shiny_argv(app: AppConfig) -> tuple[list[str], str]:
    """`shiny::runApp(DIR, host, port = PORT, launch.browser = FALSE)`, run in the app's directory as
    RStudio and Shiny Server do, so its relative paths (data files, www/) resolve the same way."""
    target = resolve_shiny(app.shiny or "")
    if target is None:
        raise LaunchError(f"shiny: {app.shiny!r} is not a directory with app.R calling shinyApp(), or ui.R + server.R")
    rscript = shutil.which("Rscript")
    if rscript is None:
        raise LaunchError("Rscript not found: install R (Debian: apt-get install r-base-core r-cran-shiny)")
    expr = (
        f"shiny::runApp({r_string(str(target))}, host = {r_string(app.worker_host)}, "
        "port = as.integer(Sys.getenv('PORT')), launch.browser = FALSE)"
    )
    return [rscript, "--no-save", "--no-restore", "-e", expr], str(target)


def worker_argv(app: AppConfig, port: int, index: int, socket: str | None = None) -> tuple[list[str], str | None]:
    """argv and working directory. `socket`: the worker's Unix socket (worker_transport unix), for {socket}."""
    if app.plumber:
        return plumber_argv(app)
    if app.shiny:
        return shiny_argv(app)
    if not app.command:
        raise LaunchError("no command to run")
    subst = {"{port}": str(port), "{index}": str(index), "{host}": app.worker_host, "{socket}": socket or ""}
    argv = []
    for arg in app.command:
        for key, value in subst.items():
            arg = arg.replace(key, value)
        argv.append(arg)
    return argv, None


def preflight(app: AppConfig) -> str | None:
    """What would stop every worker of this app from starting (no R, no such command), or None."""
    if not (app.plumber or app.shiny or app.command):
        return None
    if app.env_file:
        try:
            envfile.load(app.env_file)
        except envfile.EnvFileError as exc:
            return f"env_file: {exc}"
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


def worker_env(app: AppConfig, port: int, index: int, socket: str | None = None) -> dict[str, str]:
    """corral's environment, then env_file (read now: a reload picks up its edits), then `env`, then
    corral's own variables. R then reads the .Renviron of its working directory over all of these."""
    env = dict(os.environ)
    if app.env_file:
        try:
            env.update(envfile.load(app.env_file))
        except envfile.EnvFileError as exc:
            raise LaunchError(f"env_file: {exc}") from None
    env.update(app.env)
    env["PORT"] = env["PLUMBER_PORT"] = env["PLUMBER2_PORT"] = str(port)  # plumber2 reads PLUMBER2_* options
    env["PLUMBER2_HOST"] = app.worker_host
    env["CORRAL_WORKER_INDEX"] = str(index)
    env["NODE_APP_INSTANCE"] = str(index)  # what pm2 -i N users' scripts already read
    env["CORRAL_APP"] = app.name
    env["CORRAL_WORKER_HOST"] = app.worker_host  # the address to bind, for commands that read it
    if socket is not None:
        env["CORRAL_WORKER_SOCKET"] = socket  # plumber's startPipeServer reads it; commands may too
        for name in ("PORT", "PLUMBER_PORT", "PLUMBER2_PORT"):
            env.pop(name)  # no port: a worker that binds $PORT would be listening where corral never connects
    return env
