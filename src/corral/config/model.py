"""The one configuration model: CLI options, corral.toml keys and docs/configuration.md all come from here.

Each knob is a dataclass field whose metadata carries its help, unit and what happens on breach
(HAProxy's manual style). `corral run` options are generated from the fields, corral.toml keys have
the same names with underscores, and `python -m corral.config` prints the reference table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import math
import os
import re
import resource
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..net import PORT_MAX, is_ip, parse_address, reaches_loopback, valid_port

# Bounds shared by several knobs.
WORKERS_MAX = 4096  # workers per app: far beyond what one machine runs, small enough to plan ports and fds for
DAY = 86400
MONTH = 30 * DAY
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
FD_RESERVE = 64  # file descriptors kept back for everything corral opens now and then (files, DNS, admin clients)


def knob(
    default: Any,
    help: str,
    unit: str = "",
    breach: str = "",
    short: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    cli: bool = True,
    flag: bool = False,
) -> Any:
    """A knob's field. Numeric knobs carry both bounds: `check`, `run` and the reference table use them."""
    meta = {
        "help": help,
        "unit": unit,
        "breach": breach,
        "short": short,
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
        "cli": cli,
        "flag": flag,
    }
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class AppConfig:
    """Per-app settings: one [[app]] table, or the single app of `corral run`."""

    name: str = knob("app", "name used in logs, metrics and status", cli=False)
    route: str = knob("/", "path prefix this app serves; longest prefix wins, on segment boundaries", cli=False)
    strip_prefix: bool = knob(
        False, "remove the route prefix before forwarding (X-Forwarded-Prefix tells the worker)", cli=False
    )
    plumber: str | None = knob(None, "plumber API file or directory (plumber.R / entrypoint.R)", cli=False)
    shiny: str | None = knob(None, "Shiny app directory (app.R calling shinyApp(), or ui.R + server.R)", cli=False)
    command: list[str] = knob(
        [],
        "command run per worker; {port}, {index}, {host} and {socket} (worker_transport unix) are replaced",
        cli=False,
    )
    upstreams: list[str] = knob(
        [],
        "HOST:PORT or HOST:LO-HI of workers corral does not start; probed and joined when they answer",
        cli=False,
    )
    env: dict[str, str] = knob({}, "extra environment for every worker", cli=False)
    env_file: str | None = knob(
        None,
        "dotenv file (NAME=value lines) whose variables every worker gets, read at each worker start; "
        "`env` wins over it. Relative paths: to corral.toml, or on the command line to where corral runs",
        breach="a bad line is a config error naming the file and line",
    )
    workers: int | None = knob(
        None, "number of workers (default: one per CPU)", short="-w", minimum=1, maximum=WORKERS_MAX, breach="n/a"
    )
    base_port: int | None = knob(
        None,
        "worker i listens on base_port + i (default: public port + 1); replacements during a reload or recycle "
        "start on the ports just above the range, so as many ports above it must exist",
        minimum=1,
        maximum=PORT_MAX,
        breach="n/a",
    )
    worker_host: str = knob(
        "127.0.0.1",
        "address workers listen on (plumber's host; {host} and $CORRAL_WORKER_HOST for commands); "
        "0.0.0.0 lets other hosts reach them",
    )
    worker_transport: str = knob(
        "auto",
        "how corral reaches the workers it starts: tcp (a port each, from base_port) or unix (a Unix socket each, "
        "in a private 0700 directory of corral's: no other local user can reach a worker behind the edge). "
        "unix runs plumber with httpuv's startPipeServer; a command gets the path as {socket} and "
        "$CORRAL_WORKER_SOCKET (uvicorn --uds {socket}, gunicorn -b unix:{socket}). auto: unix for a plumber "
        "app on a loopback worker_host and for a command that takes {socket}; tcp for the rest (Shiny, plumber2, "
        "commands with {port}, --supervise-only)",
        choices=("auto", "tcp", "unix"),
        breach="n/a",
    )
    worker_scheduling: str = knob(
        "batch",
        "Linux scheduling policy of the workers corral starts. batch (SCHED_BATCH, same nice level): a worker "
        "woken by its next request waits for its turn instead of preempting corral mid-dispatch, so corral "
        "hands every free worker its request sooner (+19 % throughput with 2 plumber workers on 2 CPUs, "
        "bench/RESULTS.md; ~0.7 ms more at p99 under light load). normal: the system's default (SCHED_OTHER), "
        "for workers that must preempt other processes on the host",
        choices=("batch", "normal"),
        breach="n/a",
    )
    max_inflight: int = knob(
        1, "requests one worker may hold at once", minimum=1, maximum=1024, breach="further requests wait in the queue"
    )
    max_sessions: int = knob(
        20,
        "WebSocket sessions one worker may hold at once (Posit Connect's max connections per process); "
        "a session does not hold the worker's request slot",
        minimum=1,
        maximum=100000,
        breach="a new session waits in the queue (503 + Retry-After at the queue's limits)",
    )
    sticky: str = knob(
        "auto",
        "send a client back to the same worker: cookie (corral sets an opaque cookie naming the worker), "
        "ip (hash of the client address), none; auto is cookie for Shiny apps, none otherwise",
        choices=("auto", "none", "cookie", "ip"),
        breach="a sticky request waits for its own worker; if that worker is gone it goes to another",
    )
    ws_idle_timeout: float = knob(
        3600.0,
        "a WebSocket tunnel with no bytes either way for this long is closed",
        unit="s",
        minimum=1,
        maximum=30 * 86400,
        breach="both sides closed",
    )
    max_queue: int = knob(
        1000,
        "requests allowed to wait at the proxy",
        minimum=0,
        maximum=1_000_000,
        breach="503 with Retry-After, at once",
    )
    queue_timeout: float = knob(
        30.0, "longest wait in the queue", unit="s", minimum=0, maximum=DAY, breach="503 with Retry-After"
    )
    health_path: str | None = knob(
        None,
        "readiness and health probe path; without it any HTTP answer on / counts",
        breach="worker not ready / taken out after health_fails",
    )
    startup_timeout: float = knob(
        60.0,
        "time a new worker has to answer its readiness probe",
        unit="s",
        minimum=0.1,
        maximum=DAY,
        breach="worker killed and restarted with backoff",
    )
    request_timeout: float = knob(
        300.0,
        "longest time a worker may hold one request. 300 s by default: the longest an R handler is expected to "
        "legitimately run, and the bound on how long a frozen (SIGSTOPped, swapped-out) worker can hold a "
        "request; raise it for longer jobs",
        unit="s",
        minimum=0.01,
        maximum=MONTH,
        breach="client gets 504; the worker is killed and replaced (a frozen worker holds a request no longer)",
    )
    response_buffer: int = knob(
        4 * MiB,
        "response bytes held in memory per request, so the worker is freed before a slow client has read them "
        "(nginx proxy_buffering)",
        unit="bytes",
        minimum=0,
        maximum=GiB,
        breach="further bytes go to a temporary file",
    )
    response_buffer_file: int = knob(
        GiB,
        "response bytes spilled to a temporary file per request beyond response_buffer",
        unit="bytes",
        minimum=0,
        maximum=64 * GiB,
        breach="the worker is read only as fast as the client reads (back-pressure)",
    )
    request_buffering: bool = knob(
        True,
        "read a request's whole body before the request goes to a worker (nginx proxy_request_buffering), so a "
        "slow uploader never holds one: the body is held in memory up to request_buffer, then in a temporary "
        "file up to max_body. --no-request-buffering streams bodies as they arrive, for an app that reads an "
        "upload while it comes in; a streamed request cannot be sent again (see upstream_keepalive_timeout)",
        flag=True,
    )
    request_buffer: int = knob(
        64 * KiB,
        "request body bytes held in memory per request while it is buffered",
        unit="bytes",
        minimum=0,
        maximum=GiB,
        breach="the rest of the body goes to a temporary file (up to max_body)",
    )
    upstream_keepalive_timeout: float = knob(
        1.0,
        "an idle kept-alive connection to a worker is closed after this long: shorter than the idle timeouts of "
        "common servers (gunicorn 2 s, uvicorn and Node 5 s), so corral, not the worker, closes it first. Should "
        "a worker close one anyway just as a request goes out on it (no byte of answer, the worker alive), the "
        "request is sent once more on a fresh connection to the same worker and not held against it",
        unit="s",
        minimum=0.01,
        maximum=DAY,
        breach="connection closed; the next request opens a new one",
    )
    health_interval: float = knob(
        5.0,
        "every worker is probed once per interval, busy ones too (never while it holds a request)",
        unit="s",
        minimum=0.05,
        maximum=DAY,
        breach="a busy worker whose probe is due takes no new request until it frees; then the probe goes first",
    )
    health_timeout: float = knob(
        2.0, "probe answer deadline", unit="s", minimum=0.01, maximum=DAY, breach="counts as one failed probe"
    )
    health_fails: int = knob(
        3, "failed probes in a row that take a worker out", minimum=1, maximum=1000, breach="worker replaced"
    )
    max_requests: int | None = knob(
        None,
        "recycle a worker after this many requests",
        minimum=1,
        maximum=10**12,
        breach="graceful replacement",
    )
    max_requests_jitter: int = knob(
        0,
        "random 0..N added to max_requests per worker, so workers do not recycle together",
        minimum=0,
        maximum=10**12,
    )
    max_memory: float | None = knob(
        None,
        "resident memory of a worker's process tree",
        unit="MB",
        minimum=1,
        maximum=16 * 1024 * 1024,
        breach="graceful replacement",
    )
    graceful_timeout: float = knob(
        30.0,
        "drain deadline for in-flight requests on stop, reload and recycle",
        unit="s",
        minimum=0,
        maximum=MONTH,
        breach="SIGTERM regardless",
    )
    kill_timeout: float = knob(5.0, "SIGTERM to SIGKILL grace", unit="s", minimum=0, maximum=DAY, breach="SIGKILL")
    crash_limit: str = knob(
        "5/60",
        "K/T: workers exiting K times within T seconds mark the app crash-looping (status, metrics, logs, "
        "dashboard, with the last lines a worker printed); K from 1 to 10000, T from 1 s to 1 d",
        breach="the app is shown crash-looping until T seconds pass without an exit; restarts go on with backoff",
    )
    docs: bool = knob(False, "serve plumber's API docs (off by default)", flag=True)
    engine: str = knob(
        "auto",
        "how a plumber app is run: plumber (plumb(APP)$run), plumber2 (plumber2::api(APP) |> api_run()); auto "
        "is plumber2 for a directory with _server.yml or an R file that attaches plumber2, else plumber",
        choices=("auto", "plumber", "plumber2"),
    )
    watch: bool = knob(
        False,
        "development: a rolling reload when the app's files change (R sources, _server.yml, .Renviron, "
        "env_file; for a command, the files under the directory corral runs in)",
        flag=True,
        breach="a change whose workers fail to start is not rolled out; the old workers keep serving",
    )
    watch_paths: list[str] = knob(
        [], "files or directories --watch watches instead of the default; any file under them counts", cli=False
    )
    dispatch: str = knob(
        "cost",
        "queue policy: cost (learn route costs, keep a reserve for short requests) or fifo",
        choices=("cost", "fifo"),
    )
    reserve: int | None = knob(
        None,
        "workers kept free for short requests (default: 1 when there are 2 or more workers)",
        minimum=0,
        maximum=WORKERS_MAX,
        breach="long requests wait in the queue",
    )
    long_threshold: float = knob(
        0.5, "a route whose learned service time reaches this is long", unit="s", minimum=0.001, maximum=DAY
    )
    long_bias: float = knob(
        5.0,
        "ageing: a queued long request is passed by short ones for at most this long",
        unit="s",
        minimum=0,
        maximum=DAY,
    )
    long_routes: list[str] = knob([], "route patterns always long, e.g. 'POST /fit*' or '/model/*'", cli=False)
    short_routes: list[str] = knob([], "route patterns always short", cli=False)
    min_workers: int | None = knob(
        None,
        "autoscale: never fewer workers than this (setting min or max turns autoscaling on)",
        minimum=1,
        maximum=WORKERS_MAX,
    )
    max_workers: int | None = knob(
        None,
        "autoscale: never more workers than this; also the ceiling for `corral scale`; default ceiling: "
        "max(4 x CPUs, 16), bounded by the fd limit",
        minimum=1,
        maximum=WORKERS_MAX,
        breach="scale requests above it are refused",
    )
    scale_up_wait: float = knob(
        1.0,
        "autoscale: add workers when the oldest queued request has waited this long",
        unit="s",
        minimum=0.05,
        maximum=DAY,
        breach="one more worker (up to doubling), until max_workers",
    )
    idle_timeout: float = knob(
        60.0,
        "autoscale: workers unused for this long are drained and stopped",
        unit="s",
        minimum=0.5,
        maximum=MONTH,
        breach="surplus workers drained, down to min_workers",
    )


@dataclass
class ServerConfig:
    """Process-wide settings: the public listener, the admin channel, edge limits, logs."""

    host: str = knob("127.0.0.1", "public listen address")
    port: int = knob(8000, "public listen port", short="-p", minimum=1, maximum=PORT_MAX)
    admin: str | None = knob(None, "admin channel: HOST:PORT or unix:/path (default: a unix socket per public port)")
    admin_token: str | None = knob(None, "bearer token every admin call must carry")
    admin_hosts: list[str] = knob(
        [],
        "extra Host names a token-less TCP admin channel answers to (besides its address, localhost, 127.0.0.1)",
        breach="421 Misdirected Request; nothing else happens (DNS-rebinding defence)",
        cli=False,
    )
    admin_max_connections: int = knob(
        16,
        "open admin connections (dashboards, corral's commands, scrapes); each owes a whole request within "
        "header_timeout of its accept, or of its request's first byte when kept alive",
        minimum=1,
        maximum=256,
        breach="a further connection gets 503 and is closed at once, unread; a late request gets 408, close",
    )
    health_listen: str | None = knob(
        None,
        "HOST:PORT of a health listener for outer balancers and Kubernetes probes: GET /livez and GET /readyz "
        "only, no token, no data (off by default; the admin channel has both endpoints too)",
    )
    ready_min: int = knob(
        1,
        "workers that must be ready, in every app, for /readyz to answer 200",
        minimum=0,
        maximum=WORKERS_MAX,
        breach="/readyz answers 503, so outer balancers stop sending",
    )
    shutdown_delay: float = knob(
        0.0,
        "on SIGTERM or stop, /readyz turns 503 at once and the public port keeps serving this long before the "
        "drain begins: time for outer balancers and Kubernetes endpoints to stop sending (a few seconds there)",
        unit="s",
        minimum=0,
        maximum=3600,
        breach="then the graceful drain: no new connections, in-flight requests finish within graceful_timeout",
    )
    max_header_bytes: int = knob(
        16384,
        "request line + headers",
        unit="bytes",
        minimum=256,
        maximum=MiB,
        breach="431 (request line alone: 414)",
    )
    max_headers: int = knob(100, "header fields per request", minimum=1, maximum=10000, breach="431")
    max_body: int = knob(
        100 * MiB,
        "request body",
        unit="bytes",
        minimum=0,
        maximum=64 * GiB,
        breach="413 before the worker sees it",
    )
    header_timeout: float = knob(
        10.0, "time to receive a whole request head", unit="s", minimum=0.1, maximum=DAY, breach="408, close"
    )
    body_timeout: float = knob(
        30.0,
        "longest gap between request body bytes",
        unit="s",
        minimum=0.1,
        maximum=DAY,
        breach="408, close; the worker's request is aborted",
    )
    send_timeout: float = knob(
        60.0,
        "longest a client may go without reading any of its response",
        unit="s",
        minimum=1,
        maximum=DAY,
        breach="connection closed; the exchange is counted as cut",
    )
    keepalive_timeout: float = knob(
        5.0, "idle client connection lifetime", unit="s", minimum=0.1, maximum=DAY, breach="close"
    )
    max_connections: int | None = knob(
        None,
        "open client connections (default: auto, sized from the open-file limit: about half of it, since each "
        "client connection can need an upstream connection too)",
        minimum=1,
        maximum=1 << 24,
        breach="new connections get 503 and close",
    )
    trusted_proxies: str = knob(
        "",
        "CIDR,... whose X-Forwarded-*/Forwarded are kept and appended to, and whose W3C traceparent is continued",
        breach="headers replaced; a new trace is started",
    )
    trace_sample: float = knob(
        1.0,
        "share of the traces corral starts that carry the W3C sampled flag, so the app's (parent-based) "
        "OpenTelemetry sampler records them; 1 keeps what the app would do with no corral in front",
        minimum=0,
        maximum=1,
        breach="n/a",
    )
    access_log: str | None = knob(None, "access log path, or - for stdout")
    log_format: str = knob("text", "access log format", choices=("text", "json"))
    log_dir: str | None = knob(None, "directory for one output file per worker")
    log_buffer: int = knob(
        2000,
        "lines of worker output and corral's own events kept in memory for `corral logs` (0: none)",
        unit="lines",
        minimum=0,
        maximum=1_000_000,
        breach="the oldest lines are dropped",
    )


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    apps: list[AppConfig] = field(default_factory=list)
    source: str = "command line"
    load_problems: list[str] = field(default_factory=list)  # from load_toml(strict=False); validate reports them


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- reflection helpers ------------------------------------------------------------------------
def fields_of(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.metadata]


def base_type(cls: type, name: str) -> type:
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint)
    return origin if origin is not None else hint


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


# --- corral.toml ---------------------------------------------------------------------------------
def load_toml(path: str | Path, strict: bool = True) -> Config:
    """Read corral.toml. Unreadable files always raise; other problems raise when strict, else they
    wait in cfg.load_problems so that validate() can list them together with its own."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a corral.toml"]) from None
    except (tomllib.TOMLDecodeError, ValueError) as exc:  # ValueError: an integer of more than 4300 digits
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    problems: list[str] = []
    where = str(path)
    for key in data:
        if key not in ("server", "app"):
            problems.append(f"{where}: {key}: {_misplaced(key, None) or _unknown('section', key, ['server', 'app'])}")
    server = build_section(ServerConfig, data.get("server", {}), f"{where}: server", problems)
    apps_raw = data.get("app", [])
    if isinstance(apps_raw, dict):
        apps_raw = [apps_raw]  # a lone [app] table: read it as the one [[app]]
    if not isinstance(apps_raw, list):
        problems.append(f"{where}: app: must be [[app]] tables (got {apps_raw!r})")
        apps_raw = []
    apps = []
    for i, raw in enumerate(apps_raw):
        name = raw.get("name") if isinstance(raw, dict) else None
        label = name if isinstance(name, str) else f"#{i + 1}"
        apps.append(build_section(AppConfig, raw, f"{where}: app '{label}'", problems))
    cfg = Config(server=server, apps=apps, source=where)
    base = path.resolve().parent
    for app in cfg.apps:
        if app.plumber and not os.path.isabs(app.plumber):
            app.plumber = os.path.normpath(base / app.plumber)  # relative to the file, not to the cwd
        if app.shiny and not os.path.isabs(app.shiny):
            app.shiny = os.path.normpath(base / app.shiny)
        if app.env_file and not os.path.isabs(app.env_file):
            app.env_file = os.path.normpath(base / app.env_file)
        app.watch_paths = [p if os.path.isabs(p) else os.path.normpath(base / p) for p in app.watch_paths]
        if app.route.startswith("/"):
            app.route = normalize_route(app.route)
    if problems and strict:
        raise ConfigError(problems)
    cfg.load_problems = problems
    return cfg


def build_section(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    obj = cls()
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a table")
        return obj
    names = [f.name for f in fields_of(cls)]
    for key, value in raw.items():
        if key not in names:
            problems.append(f"{where}: {key}: {_misplaced(key, cls) or _unknown('key', key, names)}")
            continue
        err = _coerce_check(cls, key, value)
        if err:
            problems.append(f"{where}: {key}: {err}")
        else:
            setattr(obj, key, float(value) if base_type(cls, key) is float else value)
    return obj


def _unknown(what: str, key: str, names: list[str]) -> str:
    if key.replace("-", "_") in names:
        return f"unknown {what} (keys use underscores: '{key.replace('-', '_')}')"
    return f"unknown {what}{_did_you_mean(key, names)}"


def _misplaced(key: str, cls: type | None) -> str | None:
    """A real key in the wrong table is the commonest slip: say where it goes."""
    if cls is not ServerConfig and key in {f.name for f in fields_of(ServerConfig)}:
        return "belongs in [server]"
    if cls is not AppConfig and key in {f.name for f in fields_of(AppConfig)}:
        return "belongs in an [[app]] table"
    return None


def _coerce_check(cls: type, key: str, value: Any) -> str | None:
    want = base_type(cls, key)
    if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:
            return f"must be a finite number (got an integer of {len(str(value))} digits)"
        return None
    if want is int and isinstance(value, bool):
        return f"must be an integer (got {value!r})"
    if not isinstance(value, want):
        return f"must be {type_word(want)} (got {value!r})"
    if want is list and not all(isinstance(v, str) for v in value):
        return f"must be a list of strings (got {value!r})"
    if want is dict:
        for k, v in value.items():
            if not isinstance(v, str):
                return f'{k}: must be a string (got {v!r}); quote it: {k} = "{v}"'
    return None


def type_word(t: type) -> str:
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }.get(t, t.__name__)


def near_file(path: str) -> str:
    """' (did you mean 'plumber.R'?)' when a file or directory next to a missing `path` is a near miss."""
    p = Path(path)
    parent = p.parent
    try:
        names = [e.name for e in parent.iterdir()] if parent.is_dir() else []
    except OSError:
        return ""
    close = difflib.get_close_matches(p.name, names, n=1, cutoff=0.7)
    if not close:
        return ""
    shown = close[0] if str(parent) in (".", "") else str(parent / close[0])
    return f" (did you mean '{shown}'?)"


def _did_you_mean(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --- validation: every problem at once, each naming the key and the fix ------------------------
def validate(cfg: Config) -> list[str]:
    """Every problem at once: what loading found (a key it could not use keeps its default), then
    what the values say together."""
    problems = list(cfg.load_problems)
    _validate(cfg, problems)
    return problems


def _validate(cfg: Config, problems: list[str]) -> None:
    where = cfg.source
    _check_ranges(cfg.server, f"{where}: server", problems)
    if cfg.server.host != "localhost" and not is_ip(cfg.server.host):
        problems.append(f"{where}: server: host: must be an IP address such as 0.0.0.0 (got {cfg.server.host!r})")
    if cfg.server.admin is not None:
        try:
            kind, _, admin_port = parse_address(cfg.server.admin)
        except ValueError as exc:
            problems.append(f"{where}: server: admin: {exc}")
        else:
            if kind == "tcp" and admin_port == cfg.server.port:
                problems.append(
                    f"{where}: server: admin: port {admin_port} is the public port; the admin channel is never "
                    "served there: choose another port or unix:/path"
                )
    _check_health(cfg, problems)
    if not cfg.apps:
        problems.append(f"{where}: no app: give a plumber file, a command after --, --upstream, or [[app]]")
    seen_names: dict[str, int] = {}
    seen_routes: dict[str, str] = {}
    for app in cfg.apps:
        label = f"{where}: app '{app.name}'"
        _check_ranges(app, label, problems)
        if not _NAME.fullmatch(app.name):
            problems.append(f"{label}: name: use letters, digits, '-', '_' or '.' (got {app.name!r})")
        elif app.name in seen_names:
            problems.append(f"{label}: name: used by another app; names must be unique")
        seen_names[app.name] = 1
        route = normalize_route(app.route)
        if not app.route.startswith("/"):
            problems.append(f"{label}: route: must start with / (got {app.route!r})")
        elif not _ROUTE.fullmatch(app.route):
            problems.append(f"{label}: route: must be a plain path prefix such as /api (got {app.route!r})")
        elif app.strip_prefix and route == "/":
            problems.append(f"{label}: strip_prefix: route '/' has no prefix to strip")
        elif route in seen_routes:
            problems.append(f"{label}: route: {route!r} is already claimed by app '{seen_routes[route]}'")
        else:
            seen_routes[route] = app.name
        _check_source(app, label, problems)
    _check_ports(cfg, problems)


def _check_health(cfg: Config, problems: list[str]) -> None:
    """health_listen: a HOST:PORT of its own (never the public or admin port); ready_min: reachable by
    every app, else /readyz would never answer 200 (or, autoscaled, would stop the traffic that scales up)."""
    server = cfg.server
    label = f"{cfg.source}: server"
    if server.health_listen is not None:
        try:
            _, port = parse_health(server.health_listen)
        except ValueError as exc:
            problems.append(f"{label}: health_listen: {exc}")
        else:
            if port == server.port:
                problems.append(
                    f"{label}: health_listen: port {port} is the public port; the health listener needs its own port"
                )
            with contextlib.suppress(ValueError):
                if server.admin is not None and parse_address(server.admin)[::2] == ("tcp", port):
                    problems.append(f"{label}: health_listen: port {port} is also the admin channel's")
    if not _in_range(server, "ready_min"):
        return
    for app in cfg.apps:
        least, why = least_workers(app)
        if least is not None and server.ready_min > least:
            problems.append(
                f"{label}: ready_min: app '{app.name}' may run only {least} worker{'s' * (least != 1)} ({why}): "
                f"/readyz would answer 503 then; lower ready_min to {least} or run more workers"
            )


def least_workers(app: AppConfig) -> tuple[int | None, str]:
    """The fewest workers an app may have in rotation by design, and what sets it (None: not known)."""
    if app.upstreams:
        try:
            return sum(len(parse_upstream(s)) for s in app.upstreams), "upstream addresses"
        except ValueError:
            return None, ""
    if not _in_range(app, "workers", "min_workers", "max_workers"):
        return None, ""
    if autoscaled(app):
        return min(app.min_workers or 1, app.max_workers or WORKERS_MAX), "autoscaling's min_workers"
    return effective_workers(app), "workers"


def _check_ranges(obj: Any, label: str, problems: list[str]) -> None:
    for f in fields_of(type(obj)):
        why = range_problem(f, getattr(obj, f.name))
        if why:
            problems.append(f"{label}: {f.name}: {why}")
        value = getattr(obj, f.name)
        choices = f.metadata["choices"]
        if choices and value not in choices:
            problems.append(f"{label}: {f.name}: must be one of {', '.join(choices)} (got {value!r})")
    if isinstance(obj, ServerConfig):
        for cidr in filter(None, (c.strip() for c in obj.trusted_proxies.split(","))):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                problems.append(f"{label}: trusted_proxies: {cidr!r} is not an address or CIDR")
    if isinstance(obj, AppConfig):
        try:
            parse_crash_limit(obj.crash_limit)
        except ValueError as exc:
            problems.append(f"{label}: crash_limit: {exc}")
    if isinstance(obj, AppConfig) and obj.health_path is not None and not obj.health_path.startswith("/"):
        problems.append(f"{label}: health_path: must start with / (got {obj.health_path!r})")
    if isinstance(obj, AppConfig) and obj.min_workers and obj.max_workers and obj.min_workers > obj.max_workers:
        problems.append(f"{label}: min_workers: must be <= max_workers ({obj.min_workers} > {obj.max_workers})")


def range_problem(f: dataclasses.Field[Any], value: Any) -> str | None:
    """Why a numeric knob's value is out of bounds (non-finite, below its minimum, above its maximum), or None."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number (got {value!r})"
    lo, hi = f.metadata["minimum"], f.metadata["maximum"]
    if lo is not None and value < lo:
        return f"must be >= {plain_number(lo)} (got {value!r})"
    if hi is not None and value > hi:
        return f"must be <= {plain_number(hi)} (got {value!r})"
    return None


def _in_range(obj: Any, *names: str) -> bool:
    fs = {f.name: f for f in fields_of(type(obj))}
    return all(range_problem(fs[n], getattr(obj, n)) is None for n in names)


def plain_number(x: float) -> str:
    """A number as written in a message, a flag or a generated file: 65535, 0.05, 2592000 (never 2.592e+06)."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _check_source(app: AppConfig, label: str, problems: list[str]) -> None:
    sources = [s for s in ("plumber", "shiny", "command", "upstreams") if getattr(app, s)]
    if len(sources) != 1:
        problems.append(
            f"{label}: give exactly one of plumber, shiny, command, upstreams (got {', '.join(sources) or 'none'})"
        )
        return
    if app.plumber and not Path(app.plumber).exists():
        problems.append(f"{label}: plumber: {app.plumber!r} does not exist{near_file(app.plumber)}")
    elif app.plumber and resolve_plumber(app.plumber) is None:
        problems.append(
            f"{label}: plumber: {app.plumber!r} is not a .R file, a _server.yml or a directory with plumber.R "
            "(or a Shiny app directory: app.R calling shinyApp(), or ui.R + server.R)"
        )
    if app.shiny and not Path(app.shiny).exists():
        problems.append(f"{label}: shiny: {app.shiny!r} does not exist")
    elif app.shiny and resolve_shiny(app.shiny) is None:
        problems.append(
            f"{label}: shiny: {app.shiny!r} is not a directory with app.R calling shinyApp(), or ui.R + server.R"
        )
    if not is_ip(app.worker_host):
        problems.append(f"{label}: worker_host: must be an IP address such as 0.0.0.0 (got {app.worker_host!r})")
    if app.engine != "auto" and (app.shiny or app.command):
        problems.append(f"{label}: engine: applies to plumber apps only (this one is a {sources[0]})")
    _check_transport(app, label, problems)
    if app.upstreams:
        defaults = AppConfig()
        for key in (
            "workers",
            "base_port",
            "worker_host",
            "env",
            "max_requests",
            "max_memory",
            "docs",
            "env_file",
            "watch",
            "watch_paths",
            "engine",
            "worker_transport",
            "worker_scheduling",
        ):
            if getattr(app, key) != getattr(defaults, key):
                problems.append(f"{label}: {key}: has no effect with upstreams (workers corral does not start)")
    seen: set[tuple[str, int]] = set()
    for spec in app.upstreams:
        try:
            addresses = parse_upstream(spec)
        except ValueError as exc:
            problems.append(f"{label}: upstreams: {exc}")
            continue
        dup = next((a for a in addresses if a in seen), None)
        if dup is not None:
            problems.append(f"{label}: upstreams: {dup[0]}:{dup[1]} is listed twice")
        seen.update(addresses)


def _check_transport(app: AppConfig, label: str, problems: list[str]) -> None:
    """{socket} and worker_transport go together: a unix worker must be told its socket (a command that
    binds {port} instead would never be reached), and {socket} means nothing on tcp."""
    args = " ".join(app.command)
    if app.worker_transport == "unix":
        if app.shiny:
            problems.append(f"{label}: worker_transport: unix is for plumber apps and commands; Shiny apps run on tcp")
        elif app.command and "{port}" in args and "{socket}" not in args:
            problems.append(
                f"{label}: worker_transport: unix, but the command passes {{port}}, so the worker would listen on "
                "TCP where corral never connects: pass {socket} instead (uvicorn --uds {socket}, gunicorn -b "
                "unix:{socket}) or have it read $CORRAL_WORKER_SOCKET"
            )
    elif app.worker_transport == "tcp" and "{socket}" in args:
        problems.append(f"{label}: command: {{socket}} is replaced only with worker_transport unix (or auto)")


def _check_ports(cfg: Config, problems: list[str]) -> None:
    """Worker ranges: within 1..65535 with room above for replacements, and clear of each other, the
    public port, the admin port and the health listener's port. An app whose port or worker count is
    itself out of range is skipped (already reported; a range of 10**20 workers is not walked), and so
    are default ranges after it."""
    public_ok = _in_range(cfg.server, "port")
    owner: dict[int, str] = {cfg.server.port: "the public listener"} if public_ok else {}
    with contextlib.suppress(ValueError):
        if cfg.server.admin is not None:
            kind, _, admin_port = parse_address(cfg.server.admin)
            if kind == "tcp":
                owner.setdefault(admin_port, "the admin channel")
    with contextlib.suppress(ValueError):
        if cfg.server.health_listen is not None:
            owner.setdefault(parse_health(cfg.server.health_listen)[1], "the health listener")
    defaults_ok = public_ok  # a default base_port follows the public port and every earlier app's range
    for app in cfg.apps:
        if app.upstreams or app.worker_transport == "unix":  # unix workers take no port
            continue
        if not _in_range(app, "base_port") or port_span(app) > WORKERS_MAX:
            defaults_ok = False
            continue
        if app.base_port is None and not defaults_ok:
            continue
        base = first_port(cfg, app)
        span = port_span(app)
        last = base + span - 1
        if last + span > PORT_MAX:
            # A reload or recycle starts each replacement on a fresh port above the range before the old
            # worker stops: up to `span` of them at once.
            fix = f"set base_port to {PORT_MAX - 2 * span + 1} or lower, or run fewer workers"  # span <= 4096
            if app.base_port is None:
                fix += " (base_port defaults to the public port + 1, after earlier apps' ranges)"
            if last > PORT_MAX:
                what = f"workers need ports {base}-{last}, past {PORT_MAX}"
            else:
                what = (
                    f"no room for replacements: a rolling reload starts them on the {span} ports just above "
                    f"the range ({last + 1}-{last + span}), past {PORT_MAX}"
                )
            problems.append(f"{cfg.source}: app '{app.name}': base_port: {what}: {fix}")
            continue
        for port in range(base, last + 1):
            if port in owner:
                problems.append(f"{cfg.source}: app '{app.name}': base_port: port {port} is also used by {owner[port]}")
                break
            owner[port] = f"app '{app.name}'"
    # An upstream on this host must not be corral itself (a loop) or a worker corral starts.
    for app in cfg.apps:
        for spec in app.upstreams:
            with contextlib.suppress(ValueError):
                for host, port in parse_upstream(spec):
                    if reaches_loopback(host) and port in owner:
                        problems.append(
                            f"{cfg.source}: app '{app.name}': upstreams: {host}:{port} is {owner[port]} of this corral"
                        )
                        break


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ROUTE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/-]*")


# --- derived values ---------------------------------------------------------------------------
def normalize_route(route: str) -> str:
    return "/" + route.strip("/") if route.strip("/") else "/"


def effective_workers(app: AppConfig) -> int:
    if autoscaled(app) and not app.workers:
        return app.min_workers or 1  # autoscaled without --workers: start small, grow on demand
    n = app.workers or os.cpu_count() or 1
    if app.max_workers is not None:
        n = min(n, app.max_workers)
    return max(n, app.min_workers or 1)


def sticky_mode(app: AppConfig) -> str:
    """The stickiness in force: `auto` is cookie for a Shiny app (its sessions live in one process)."""
    if app.sticky == "auto":
        return "cookie" if app.shiny else "none"
    return app.sticky


def autoscaled(app: AppConfig) -> bool:
    return app.min_workers is not None or app.max_workers is not None


def port_span(app: AppConfig) -> int:
    """Ports reserved for an app: its workers, or as many as autoscaling may start."""
    return max(effective_workers(app), getattr(app, "max_workers", None) or 0)


def connect_host(app: AppConfig) -> str:
    """Where corral (probes, the balancer, exports) reaches workers bound to worker_host."""
    if app.worker_host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if app.worker_host == "::":
        return "::1"
    return app.worker_host


def worker_ports(cfg: Config, app: AppConfig) -> list[int]:
    base = first_port(cfg, app)
    return [base + i for i in range(effective_workers(app))]


def first_port(cfg: Config, app: AppConfig) -> int:
    """Worker 0's port: base_port, or the default after the public port and earlier apps."""
    return app.base_port if app.base_port is not None else default_base_port(cfg, app)


def default_base_port(cfg: Config, app: AppConfig) -> int:
    """P+1 for the first app; each later app starts after the previous app's range."""
    port = cfg.server.port + 1
    for other in cfg.apps:
        if other is app:
            return port
        if other.upstreams:
            continue
        start = other.base_port if other.base_port is not None else port
        port = start + port_span(other)
    return port


def resolve_plumber(path: str) -> Path | None:
    """A .R file, a plumber2 `_server.yml`, or a directory with plumber.R, entrypoint.R or _server.yml."""
    p = Path(path)
    if p.is_file() and (p.suffix.lower() == ".r" or p.name in SERVER_YML):
        return p.resolve()
    if p.is_dir() and any((p / name).is_file() for name in ("plumber.R", "entrypoint.R", *SERVER_YML)):
        return p.resolve()
    return None


SERVER_YML = ("_server.yml", "_server.yaml")  # the R server description plumber2 reads (its `engine:` names it)


def resolve_shiny(path: str) -> Path | None:
    """A Shiny app directory, as shiny::runApp reads one: app.R that builds a shinyApp(...) (its last
    value), or the older ui.R + server.R pair. None for anything else, plumber directories included."""
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / "ui.R").is_file() and (p / "server.R").is_file():
        return p.resolve()
    app = p / "app.R"
    if app.is_file():
        try:
            text = app.read_text(errors="replace")
        except OSError:
            return None
        if _SHINY_CALL.search(text):
            return p.resolve()
    return None


_SHINY_CALL = re.compile(r"\bshinyApp\s*\(")  # also shiny::shinyApp(


def parse_crash_limit(spec: str) -> tuple[int, float]:
    """'5/60' -> (5, 60.0): K worker exits within T seconds. Raises ValueError naming the form."""
    k_s, sep, t_s = str(spec).partition("/")
    try:
        k, t = int(k_s), float(t_s)
    except ValueError:
        k, t = 0, 0.0
    if not sep or not 1 <= k <= 10000 or not 1 <= t <= DAY:
        raise ValueError(f"must be K/T: K exits (1..10000) within T seconds (1..{DAY}), e.g. 5/60 (got {spec!r})")
    return k, t


def parse_upstream(spec: str) -> list[tuple[str, int]]:
    """'127.0.0.1:7000-7003' -> four addresses. Raises ValueError naming what is wrong."""
    host, sep, ports = spec.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{spec!r} must be HOST:PORT or HOST:LO-HI")
    lo_s, _, hi_s = ports.partition("-")
    try:
        lo = int(lo_s)
        hi = int(hi_s) if hi_s else lo
    except ValueError:
        raise ValueError(f"{spec!r}: port must be a number or LO-HI") from None
    if not (0 < lo <= hi <= 65535) or hi - lo > 1024:
        raise ValueError(f"{spec!r}: port range must be within 1-65535, low <= high, at most 1025 ports")
    return [(host.strip("[]"), p) for p in range(lo, hi + 1)]


def parse_health(spec: str) -> tuple[str, int]:
    """`HOST:PORT` / `[v6]:PORT` of the health listener -> (host, port). Raises ValueError naming the form."""
    host, sep, port_s = spec.rpartition(":")
    host = host.strip("[]")
    if not (sep and (host == "localhost" or is_ip(host)) and valid_port(port_s)):
        raise ValueError(
            f"must be HOST:PORT with an IP address and a port in 1..{PORT_MAX}, e.g. 0.0.0.0:9000 (got {spec!r})"
        )
    return host, int(port_s)


# --- file descriptors: how many connections and workers a machine can hold ---------------------------
def _nofile(nofile: int | None) -> int:
    """The open-file limit to plan with: the hard limit when not given; 'unlimited' as 2**20."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if nofile < 0 or nofile == resource.RLIM_INFINITY:
        return 1 << 20
    return nofile


def reserved_fds(cfg: Config) -> int:
    """File descriptors corral needs besides client connections and their upstream connections:
    per worker it may run (twice its range: a rolling reload runs a replacement beside each worker)
    three pipes and a probe, plus an output file with log_dir; a probe per upstream address; the
    public and admin listeners; the access log; and FD_RESERVE for everything else."""
    n = FD_RESERVE + 2 + (1 if cfg.server.access_log else 0)
    for app in cfg.apps:
        if app.upstreams:
            for spec in app.upstreams:
                with contextlib.suppress(ValueError):
                    n += len(parse_upstream(spec))
            continue
        workers = 2 * min(port_span(app), WORKERS_MAX)
        n += workers * (3 + 1 + (1 if cfg.server.log_dir else 0))
    return n


def connection_budget(nofile: int, cfg: Config) -> int:
    """How many client connections corral can hold with `nofile` open files: each client connection
    can need one upstream connection too, after reserved_fds(cfg). At least 1. This is what
    max_connections means when left out (the caller raises RLIMIT_NOFILE to its hard limit first);
    a max_connections set above it is not a config error, since limits differ per machine."""
    return max(1, (_nofile(nofile) - reserved_fds(cfg)) // 2)


def worker_ceiling(app: AppConfig, nofile: int | None = None) -> int:
    """The most workers `corral scale` or autoscaling may ever ask for: max_workers when set, else
    max(4 x CPUs, 16) bounded by the fd limit (8 per worker, after FD_RESERVE: pipes, probe, pooled
    connections, a replacement's share), and never below the configured workers. At least 1."""
    if app.max_workers is not None:
        return app.max_workers
    cpus = os.cpu_count() or 1
    by_fds = (_nofile(nofile) - FD_RESERVE) // 8
    ceiling = min(max(4 * cpus, 16), by_fds, WORKERS_MAX)
    return max(1, ceiling, min(app.workers or 0, WORKERS_MAX))


def reference_markdown() -> str:
    """The configuration reference table for docs/configuration.md."""
    out = []
    for title, cls in (("Server (`[server]`)", ServerConfig), ("Per app (`[[app]]`)", AppConfig)):
        out += [
            f"### {title}",
            "",
            "| key | CLI | default | unit | range | meaning | on breach |",
            "|---|---|---|---|---|---|---|",
        ]
        for f in fields_of(cls):
            m = f.metadata
            cli = option_name(f.name) if m["cli"] else "(toml only)"
            if m["short"]:
                cli = f"{m['short']}, {cli}"
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            choices = f" ({' / '.join(m['choices'])})" if m["choices"] else ""
            out.append(
                f"| `{f.name}` | `{cli}` | `{default!r}` | {m['unit']} | {range_text(f)} | {m['help']}{choices} "
                f"| {m['breach']} |"
            )
        out.append("")
    return "\n".join(out)


def range_text(f: dataclasses.Field[Any]) -> str:
    """'1 .. 65535', '0.01 s .. 30 d', '0 .. 1 GiB': a knob's bounds for people."""
    lo, hi = f.metadata["minimum"], f.metadata["maximum"]
    if lo is None and hi is None:
        return ""
    return f"{unit_text(lo, f.metadata['unit'])} .. {unit_text(hi, f.metadata['unit'])}"


def unit_text(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "s":
        for size, name in ((DAY, "d"), (3600, "h")):
            if x >= size and x % size == 0:
                return f"{plain_number(x / size)} {name}"
        return f"{plain_number(x)} s"
    if unit == "bytes":
        for size, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
            if x >= size and x % size == 0:
                return f"{plain_number(x / size)} {name}"
        return plain_number(x)
    return plain_number(x)


REFERENCE_BEGIN = "<!-- reference: generated by `python -m corral.config --update docs/configuration.md` -->"
REFERENCE_END = "<!-- end of reference -->"


def update_reference(doc: str) -> str:
    """doc with the text between the reference markers replaced by reference_markdown()."""
    head, sep, rest = doc.partition(REFERENCE_BEGIN)
    _, sep2, tail = rest.partition(REFERENCE_END)
    if not sep or not sep2:
        raise ValueError(f"markers not found: {REFERENCE_BEGIN} ... {REFERENCE_END}")
    return f"{head}{REFERENCE_BEGIN}\n\n{reference_markdown()}\n{REFERENCE_END}{tail}"


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--update"] and len(sys.argv) == 3:
        target = Path(sys.argv[2])
        target.write_text(update_reference(target.read_text()))
    else:
        print(reference_markdown())
