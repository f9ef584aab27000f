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
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def knob(
    default: Any,
    help: str,
    unit: str = "",
    breach: str = "",
    short: str | None = None,
    minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
    cli: bool = True,
    flag: bool = False,
) -> Any:
    meta = {
        "help": help,
        "unit": unit,
        "breach": breach,
        "short": short,
        "minimum": minimum,
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
    command: list[str] = knob([], "command run per worker; {port}, {index} and {host} are replaced", cli=False)
    upstreams: list[str] = knob(
        [],
        "HOST:PORT or HOST:LO-HI of workers corral does not start; probed and joined when they answer",
        cli=False,
    )
    env: dict[str, str] = knob({}, "extra environment for every worker", cli=False)
    workers: int | None = knob(None, "number of workers (default: one per CPU)", short="-w", minimum=1, breach="n/a")
    base_port: int | None = knob(
        None, "worker i listens on base_port + i (default: public port + 1)", minimum=1, breach="n/a"
    )
    worker_host: str = knob(
        "127.0.0.1",
        "address workers listen on (plumber's host; {host} and $CORRAL_WORKER_HOST for commands); "
        "0.0.0.0 lets other hosts reach them",
    )
    max_inflight: int = knob(
        1, "requests one worker may hold at once", minimum=1, breach="further requests wait in the queue"
    )
    max_queue: int = knob(
        1000, "requests allowed to wait at the proxy", minimum=0, breach="503 with Retry-After, at once"
    )
    queue_timeout: float = knob(30.0, "longest wait in the queue", unit="s", minimum=0, breach="503 with Retry-After")
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
        breach="worker killed and restarted with backoff",
    )
    request_timeout: float | None = knob(
        None,
        "longest time a worker may hold one request",
        unit="s",
        minimum=0.01,
        breach="client gets 504; the worker is killed and replaced",
    )
    health_interval: float = knob(5.0, "seconds between probes of an idle worker", unit="s", minimum=0.05, breach="n/a")
    health_timeout: float = knob(
        2.0, "probe answer deadline", unit="s", minimum=0.01, breach="counts as one failed probe"
    )
    health_fails: int = knob(
        3, "failed probes in a row that take an idle worker out", minimum=1, breach="worker replaced"
    )
    max_requests: int | None = knob(
        None, "recycle a worker after this many requests", minimum=1, breach="graceful replacement"
    )
    max_requests_jitter: int = knob(
        0, "random 0..N added to max_requests per worker, so workers do not recycle together", minimum=0
    )
    max_memory: float | None = knob(
        None,
        "resident memory of a worker's process tree",
        unit="MB",
        minimum=1,
        breach="graceful replacement",
    )
    graceful_timeout: float = knob(
        30.0,
        "drain deadline for in-flight requests on stop, reload and recycle",
        unit="s",
        minimum=0,
        breach="SIGTERM regardless",
    )
    kill_timeout: float = knob(5.0, "SIGTERM to SIGKILL grace", unit="s", minimum=0, breach="SIGKILL")
    docs: bool = knob(False, "serve plumber's API docs (off by default)", flag=True)
    dispatch: str = knob(
        "cost", "queue policy: cost (learn route costs, keep a reserve for short requests) or fifo",
        choices=("cost", "fifo"),
    )
    reserve: int | None = knob(
        None, "workers kept free for short requests (default: 1 when there are 2 or more workers)", minimum=0,
        breach="long requests wait in the queue",
    )
    long_threshold: float = knob(
        0.5, "a route whose learned service time reaches this is long", unit="s", minimum=0.001
    )
    long_bias: float = knob(
        5.0, "ageing: a queued long request is passed by short ones for at most this long", unit="s", minimum=0
    )
    long_routes: list[str] = knob([], "route patterns always long, e.g. 'POST /fit*' or '/model/*'", cli=False)
    short_routes: list[str] = knob([], "route patterns always short", cli=False)
    min_workers: int | None = knob(
        None, "autoscale: never fewer workers than this (setting min or max turns autoscaling on)", minimum=1
    )
    max_workers: int | None = knob(None, "autoscale: never more workers than this", minimum=1)
    scale_up_wait: float = knob(
        1.0,
        "autoscale: add workers when the oldest queued request has waited this long",
        unit="s",
        minimum=0.05,
        breach="one more worker (up to doubling), until max_workers",
    )
    idle_timeout: float = knob(
        60.0,
        "autoscale: workers unused for this long are drained and stopped",
        unit="s",
        minimum=0.5,
        breach="surplus workers drained, down to min_workers",
    )


@dataclass
class ServerConfig:
    """Process-wide settings: the public listener, the admin channel, edge limits, logs."""

    host: str = knob("127.0.0.1", "public listen address")
    port: int = knob(8000, "public listen port", short="-p", minimum=1)
    admin: str | None = knob(None, "admin channel: HOST:PORT or unix:/path (default: a unix socket per public port)")
    admin_token: str | None = knob(None, "bearer token every admin call must carry")
    max_header_bytes: int = knob(
        16384, "request line + headers", unit="bytes", minimum=256, breach="431 (request line alone: 414)"
    )
    max_headers: int = knob(100, "header fields per request", minimum=1, breach="431")
    max_body: int = knob(
        100 * 1024 * 1024, "request body", unit="bytes", minimum=0, breach="413 before the worker sees it"
    )
    header_timeout: float = knob(
        10.0, "time to receive a whole request head", unit="s", minimum=0.1, breach="408, close"
    )
    body_timeout: float = knob(
        30.0,
        "longest gap between request body bytes",
        unit="s",
        minimum=0.1,
        breach="408, close; the worker's request is aborted",
    )
    keepalive_timeout: float = knob(5.0, "idle client connection lifetime", unit="s", minimum=0.1, breach="close")
    max_connections: int = knob(10000, "open client connections", minimum=1, breach="new connections get 503 and close")
    trusted_proxies: str = knob(
        "", "CIDR,... whose X-Forwarded-*/Forwarded are kept and appended to", breach="headers replaced"
    )
    access_log: str | None = knob(None, "access log path, or - for stdout")
    log_format: str = knob("text", "access log format", choices=("text", "json"))
    log_dir: str | None = knob(None, "directory for one output file per worker")


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
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    problems: list[str] = []
    where = str(path)
    for key in data:
        if key not in ("server", "app"):
            problems.append(f"{where}: {key}: {_misplaced(key, None) or _unknown('section', key, ['server', 'app'])}")
    server = _build(ServerConfig, data.get("server", {}), f"{where}: server", problems)
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
        apps.append(_build(AppConfig, raw, f"{where}: app '{label}'", problems))
    cfg = Config(server=server, apps=apps, source=where)
    base = path.resolve().parent
    for app in cfg.apps:
        if app.plumber and not os.path.isabs(app.plumber):
            app.plumber = os.path.normpath(base / app.plumber)  # relative to the file, not to the cwd
        if app.route.startswith("/"):
            app.route = normalize_route(app.route)
    if problems and strict:
        raise ConfigError(problems)
    cfg.load_problems = problems
    return cfg


def _build(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
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
        return None
    if want is int and isinstance(value, bool):
        return f"must be an integer (got {value!r})"
    if not isinstance(value, want):
        return f"must be {_type_word(want)} (got {value!r})"
    if want is list and not all(isinstance(v, str) for v in value):
        return f"must be a list of strings (got {value!r})"
    if want is dict:
        for k, v in value.items():
            if not isinstance(v, str):
                return f"{k}: must be a string (got {v!r}); quote it: {k} = \"{v}\""
    return None


def _type_word(t: type) -> str:
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }.get(t, t.__name__)


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
    if cfg.server.host != "localhost" and not _is_ip(cfg.server.host):
        problems.append(f"{where}: server: host: must be an IP address such as 0.0.0.0 (got {cfg.server.host!r})")
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


def _check_ranges(obj: Any, label: str, problems: list[str]) -> None:
    for f in fields_of(type(obj)):
        value = getattr(obj, f.name)
        lo = f.metadata["minimum"]
        if lo is not None and value is not None and value < lo:
            problems.append(f"{label}: {f.name}: must be >= {lo:g} (got {value!r})")
        choices = f.metadata["choices"]
        if choices and value not in choices:
            problems.append(f"{label}: {f.name}: must be one of {', '.join(choices)} (got {value!r})")
    if isinstance(obj, ServerConfig):
        for cidr in filter(None, (c.strip() for c in obj.trusted_proxies.split(","))):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                problems.append(f"{label}: trusted_proxies: {cidr!r} is not an address or CIDR")
    if isinstance(obj, AppConfig) and obj.health_path is not None and not obj.health_path.startswith("/"):
        problems.append(f"{label}: health_path: must start with / (got {obj.health_path!r})")
    if isinstance(obj, AppConfig) and obj.min_workers and obj.max_workers and obj.min_workers > obj.max_workers:
        problems.append(f"{label}: min_workers: must be <= max_workers ({obj.min_workers} > {obj.max_workers})")


def _check_source(app: AppConfig, label: str, problems: list[str]) -> None:
    sources = [s for s in ("plumber", "command", "upstreams") if getattr(app, s)]
    if len(sources) != 1:
        problems.append(
            f"{label}: give exactly one of plumber, command, upstreams (got {', '.join(sources) or 'none'})"
        )
        return
    if app.plumber and not Path(app.plumber).exists():
        problems.append(f"{label}: plumber: {app.plumber!r} does not exist")
    elif app.plumber and resolve_plumber(app.plumber) is None:
        problems.append(f"{label}: plumber: {app.plumber!r} is not a .R file or a directory with plumber.R")
    if not _is_ip(app.worker_host):
        problems.append(f"{label}: worker_host: must be an IP address such as 0.0.0.0 (got {app.worker_host!r})")
    if app.upstreams:
        defaults = AppConfig()
        for key in ("workers", "base_port", "worker_host", "env", "max_requests", "max_memory", "docs"):
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


def _check_ports(cfg: Config, problems: list[str]) -> None:
    owner: dict[int, str] = {cfg.server.port: "the public listener"}
    for app in cfg.apps:
        if app.upstreams:
            continue
        base = worker_ports(cfg, app)[0]
        for port in range(base, base + port_span(app)):
            if port > 65535:
                problems.append(f"{cfg.source}: app '{app.name}': base_port: port {port} is above 65535")
                break
            if port in owner:
                problems.append(f"{cfg.source}: app '{app.name}': base_port: port {port} is also used by {owner[port]}")
                break
            owner[port] = f"app '{app.name}'"
    # An upstream on this host must not be corral itself (a loop) or a worker corral starts.
    for app in cfg.apps:
        for spec in app.upstreams:
            with contextlib.suppress(ValueError):
                for host, port in parse_upstream(spec):
                    if _is_local(host) and port in owner:
                        problems.append(
                            f"{cfg.source}: app '{app.name}': upstreams: {host}:{port} is {owner[port]} of this corral"
                        )
                        break


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ROUTE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/-]*")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_loopback or addr.is_unspecified


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
    base = app.base_port if app.base_port is not None else default_base_port(cfg, app)
    return [base + i for i in range(effective_workers(app))]


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
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".r":
        return p.resolve()
    if p.is_dir() and ((p / "plumber.R").is_file() or (p / "entrypoint.R").is_file()):
        return p.resolve()
    return None


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


def reference_markdown() -> str:
    """The configuration reference table for docs/configuration.md."""
    out = []
    for title, cls in (("Server (`[server]`)", ServerConfig), ("Per app (`[[app]]`)", AppConfig)):
        out += [
            f"### {title}",
            "",
            "| key | CLI | default | unit | meaning | on breach |",
            "|---|---|---|---|---|---|",
        ]
        for f in fields_of(cls):
            m = f.metadata
            cli = option_name(f.name) if m["cli"] else "(toml only)"
            if m["short"]:
                cli = f"{m['short']}, {cli}"
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            choices = f" ({' / '.join(m['choices'])})" if m["choices"] else ""
            out.append(f"| `{f.name}` | `{cli}` | `{default!r}` | {m['unit']} | {m['help']}{choices} | {m['breach']} |")
        out.append("")
    return "\n".join(out)


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
