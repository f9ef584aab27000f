"""Validation: every problem a configuration has, at once, each naming the key and the fix.

`corral check` and `corral run` print the whole list, so a user fixes a file in one pass instead of
one error per attempt. Each knob is checked on its own (bounds, choices, forms), then what the values
say together: names and routes unique, one source per app, ports that do not collide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import math
import re
from pathlib import Path
from typing import Any

from ..net import PORT_MAX, is_ip, parse_address, reaches_loopback
from ..tls import TLSError, server_context
from .derived import (
    autoscaled,
    effective_workers,
    first_port,
    normalize_route,
    parse_crash_limit,
    parse_health,
    parse_upstream,
    port_span,
)
from .model import WORKERS_MAX, AppConfig, Config, ServerConfig, fields_of, plain_number
from .sources import near_file, resolve_plumber, resolve_shiny

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ROUTE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/-]*")

# Knobs about starting workers: set on an app of upstreams (workers corral does not start), they are a mistake.
_NOT_FOR_UPSTREAMS = (
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
)


def validate(cfg: Config) -> list[str]:
    """Every problem at once: what loading found (a key it could not use keeps its default), then
    what the values say together."""
    problems = list(cfg.load_problems)
    _check_server(cfg, problems)
    _check_health(cfg, problems)
    _check_tls(cfg, problems)
    _check_apps(cfg, problems)
    _check_ports(cfg, problems)
    return problems


# --- each knob on its own ------------------------------------------------------------------------------
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
    """Whether these knobs are within bounds: checks that build on a value skip one already reported."""
    fs = {f.name: f for f in fields_of(type(obj))}
    return all(range_problem(fs[n], getattr(obj, n)) is None for n in names)


def _check_ranges(obj: Any, label: str, problems: list[str]) -> None:
    """Bounds and choices of every knob of a section, then the forms of its knobs written as strings."""
    for f in fields_of(type(obj)):
        why = range_problem(f, getattr(obj, f.name))
        if why:
            problems.append(f"{label}: {f.name}: {why}")
        value = getattr(obj, f.name)
        choices = f.metadata["choices"]
        if choices and value not in choices:
            problems.append(f"{label}: {f.name}: must be one of {', '.join(choices)} (got {value!r})")
    if isinstance(obj, ServerConfig):
        _check_proxies(obj, label, problems)
    if isinstance(obj, AppConfig):
        _check_app_forms(obj, label, problems)


def _check_proxies(server: ServerConfig, label: str, problems: list[str]) -> None:
    for cidr in filter(None, (c.strip() for c in server.trusted_proxies.split(","))):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            problems.append(f"{label}: trusted_proxies: {cidr!r} is not an address or CIDR")


def _check_app_forms(app: AppConfig, label: str, problems: list[str]) -> None:
    try:
        parse_crash_limit(app.crash_limit)
    except ValueError as exc:
        problems.append(f"{label}: crash_limit: {exc}")
    if app.health_path is not None and not app.health_path.startswith("/"):
        problems.append(f"{label}: health_path: must start with / (got {app.health_path!r})")
    if app.min_workers and app.max_workers and app.min_workers > app.max_workers:
        problems.append(f"{label}: min_workers: must be <= max_workers ({app.min_workers} > {app.max_workers})")
    _check_fairness(app, label, problems)


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP field name (RFC 9110 5.1)


def _check_fairness(app: AppConfig, label: str, problems: list[str]) -> None:
    mode, sep, name = app.fair_key.partition(":")
    if mode not in ("ip", "none", "header") or (mode == "header") != bool(sep) or (sep and not _TOKEN.fullmatch(name)):
        problems.append(f"{label}: fair_key: must be ip, none or header:NAME (got {app.fair_key!r})")
    cap = app.max_queue_per_client
    if cap is None or not _in_range(app, "max_queue_per_client", "max_queue"):
        return
    if mode == "none":
        problems.append(f"{label}: max_queue_per_client: needs fair_key ip or header:NAME (fair_key is none)")
    elif cap > app.max_queue:
        problems.append(f"{label}: max_queue_per_client: must be <= max_queue ({cap} > {app.max_queue})")


# --- the server ----------------------------------------------------------------------------------------
def _check_server(cfg: Config, problems: list[str]) -> None:
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


def supervise_only_problems(cfg: Config) -> list[str]:
    """What --supervise-only (nginx or HAProxy in front, no balancer) cannot run: an app that scales to zero,
    since no request would reach corral to start its worker again."""
    return [
        f"--supervise-only: app '{app.name}' has min_workers 0, but with nginx or HAProxy in front no request "
        "reaches corral to start a worker again: use min_workers 1 or more"
        for app in cfg.apps
        if app.min_workers == 0 and not app.upstreams
    ]


def _check_tls(cfg: Config, problems: list[str]) -> None:
    """tls_cert and tls_key go together and must load as a pair now, not at the first handshake; http_redirect
    needs TLS to redirect to, and a port of its own."""
    server = cfg.server
    label = f"{cfg.source}: server"
    cert, key = server.tls_cert, server.tls_key
    if (cert is None) != (key is None):
        have, missing = ("tls_cert", "tls_key") if key is None else ("tls_key", "tls_cert")
        problems.append(f"{label}: {missing}: needed with {have} (give both: the certificate chain and its key)")
    elif cert is not None and key is not None:
        try:
            server_context(cert, key)
        except TLSError as exc:
            problems.append(f"{label}: {exc.key}: {exc}")
    if server.http_redirect is not None:
        if cert is None:
            problems.append(f"{label}: http_redirect: redirects to https, so it needs tls_cert and tls_key")
        if server.http_redirect == server.port:
            problems.append(f"{label}: http_redirect: port {server.port} is the public port: choose another (80)")


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
        # min_workers 0 counts as 1: an app scaled to zero (or starting from zero) counts as ready for /readyz.
        return min(app.min_workers or 1, app.max_workers or WORKERS_MAX), "autoscaling's min_workers"
    return effective_workers(app), "workers"


# --- the apps ------------------------------------------------------------------------------------------
def _check_apps(cfg: Config, problems: list[str]) -> None:
    if not cfg.apps:
        problems.append(f"{cfg.source}: no app: give a plumber file, a command after --, --upstream, or [[app]]")
    seen_names: set[str] = set()
    seen_routes: dict[str, str] = {}
    for app in cfg.apps:
        label = f"{cfg.source}: app '{app.name}'"
        _check_ranges(app, label, problems)
        _check_name(app, label, seen_names, problems)
        _check_route(app, label, seen_routes, problems)
        _check_source(app, label, problems)


def _check_name(app: AppConfig, label: str, seen: set[str], problems: list[str]) -> None:
    if not _NAME.fullmatch(app.name):
        problems.append(f"{label}: name: use letters, digits, '-', '_' or '.' (got {app.name!r})")
    elif app.name in seen:
        problems.append(f"{label}: name: used by another app; names must be unique")
    seen.add(app.name)


def _check_route(app: AppConfig, label: str, seen: dict[str, str], problems: list[str]) -> None:
    """A plain path prefix, claimed by one app only (`seen`: route -> app)."""
    route = normalize_route(app.route)
    if not app.route.startswith("/"):
        problems.append(f"{label}: route: must start with / (got {app.route!r})")
    elif not _ROUTE.fullmatch(app.route):
        problems.append(f"{label}: route: must be a plain path prefix such as /api (got {app.route!r})")
    elif app.strip_prefix and route == "/":
        problems.append(f"{label}: strip_prefix: route '/' has no prefix to strip")
    elif route in seen:
        problems.append(f"{label}: route: {route!r} is already claimed by app '{seen[route]}'")
    else:
        seen[route] = app.name


def _check_source(app: AppConfig, label: str, problems: list[str]) -> None:
    """Exactly one of plumber, shiny, command, upstreams, and the knobs that go with the one given."""
    sources = [s for s in ("plumber", "shiny", "command", "upstreams") if getattr(app, s)]
    if len(sources) != 1:
        problems.append(
            f"{label}: give exactly one of plumber, shiny, command, upstreams (got {', '.join(sources) or 'none'})"
        )
        return
    _check_source_files(app, label, problems)
    if not is_ip(app.worker_host):
        problems.append(f"{label}: worker_host: must be an IP address such as 0.0.0.0 (got {app.worker_host!r})")
    if app.engine != "auto" and (app.shiny or app.command):
        problems.append(f"{label}: engine: applies to plumber apps only (this one is a {sources[0]})")
    _check_transport(app, label, problems)
    _check_upstreams(app, label, problems)


def _check_source_files(app: AppConfig, label: str, problems: list[str]) -> None:
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


def _check_upstreams(app: AppConfig, label: str, problems: list[str]) -> None:
    """No knob about starting workers, and every address well formed and listed once."""
    if app.upstreams:
        defaults = AppConfig()
        for key in _NOT_FOR_UPSTREAMS:
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


# --- ports ---------------------------------------------------------------------------------------------
def _check_ports(cfg: Config, problems: list[str]) -> None:
    """Worker ranges: within 1..65535 with room above for replacements, and clear of each other, the
    public port, the admin port and the health listener's port. An app whose port or worker count is
    itself out of range is skipped (already reported; a range of 10**20 workers is not walked), and so
    are default ranges after it."""
    public_ok = _in_range(cfg.server, "port")
    owner = _server_ports(cfg, public_ok)
    defaults_ok = public_ok  # a default base_port follows the public port and every earlier app's range
    for app in cfg.apps:
        if app.upstreams or app.worker_transport == "unix":  # unix workers take no port
            continue
        if not _in_range(app, "base_port") or port_span(app) > WORKERS_MAX:
            defaults_ok = False
            continue
        if app.base_port is None and not defaults_ok:
            continue
        _claim_ports(cfg, app, owner, problems)
    _check_upstream_loops(cfg, owner, problems)


def _server_ports(cfg: Config, public_ok: bool) -> dict[int, str]:
    """The ports corral's own listeners take -> what takes them (a malformed address is reported elsewhere)."""
    owner: dict[int, str] = {cfg.server.port: "the public listener"} if public_ok else {}
    with contextlib.suppress(ValueError):
        if cfg.server.admin is not None:
            kind, _, admin_port = parse_address(cfg.server.admin)
            if kind == "tcp":
                owner.setdefault(admin_port, "the admin channel")
    with contextlib.suppress(ValueError):
        if cfg.server.health_listen is not None:
            owner.setdefault(parse_health(cfg.server.health_listen)[1], "the health listener")
    if cfg.server.http_redirect is not None and _in_range(cfg.server, "http_redirect"):
        owner.setdefault(cfg.server.http_redirect, "the http_redirect listener")
    return owner


def _claim_ports(cfg: Config, app: AppConfig, owner: dict[int, str], problems: list[str]) -> None:
    """Enter an app's worker range in `owner`, reporting the first port already taken or a range past 65535."""
    base = first_port(cfg, app)
    span = port_span(app)
    last = base + span - 1
    if last + span > PORT_MAX:
        problems.append(f"{cfg.source}: app '{app.name}': base_port: {_past_port_max(app, base, span)}")
        return
    for port in range(base, last + 1):
        if port in owner:
            problems.append(f"{cfg.source}: app '{app.name}': base_port: port {port} is also used by {owner[port]}")
            break
        owner[port] = f"app '{app.name}'"


def _past_port_max(app: AppConfig, base: int, span: int) -> str:
    """What is wrong with a range starting at `base` that, with its replacements, runs past 65535, and the fix.
    A reload or recycle starts each replacement on a fresh port above the range before the old worker
    stops: up to `span` of them at once."""
    last = base + span - 1
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
    return f"{what}: {fix}"


def _check_upstream_loops(cfg: Config, owner: dict[int, str], problems: list[str]) -> None:
    """An upstream on this host must not be corral itself (a loop) or a worker corral starts."""
    for app in cfg.apps:
        for spec in app.upstreams:
            with contextlib.suppress(ValueError):
                for host, port in parse_upstream(spec):
                    if reaches_loopback(host) and port in owner:
                        problems.append(
                            f"{cfg.source}: app '{app.name}': upstreams: {host}:{port} is {owner[port]} of this corral"
                        )
                        break
