"""Values computed from a configuration: how many workers an app runs, on which ports and host corral
reaches them, how sticky it is, and what the knobs written as strings (crash_limit, upstreams,
health_listen) mean. The supervisor, the balancer and the exports ask here rather than each working
it out again.
"""

from __future__ import annotations

import os

from ..net import PORT_MAX, is_ip, valid_port
from .model import DAY, AppConfig, Config


# --- an app's route, workers, ports and host -------------------------------------------------------
def normalize_route(route: str) -> str:
    """'/api/' -> '/api', '' -> '/': one spelling per route, so two apps cannot claim the same one."""
    return "/" + route.strip("/") if route.strip("/") else "/"


def effective_workers(app: AppConfig) -> int:
    """Workers started: `workers` (default one per CPU) kept within min_workers..max_workers. An app that
    scales to zero (min_workers 0) starts with one all the same: corral learns at once whether it can start
    (an app that cannot stops corral, as any), and it goes to zero after idle_timeout without a request."""
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
    """Setting either bound turns autoscaling on (there is no separate switch)."""
    return app.min_workers is not None or app.max_workers is not None


def scales_to_zero(app: AppConfig) -> bool:
    """min_workers 0: the app's last worker stops when idle, and the next request starts one."""
    return app.min_workers == 0


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
    """The ports of the workers started now (port_span also counts those autoscaling may add)."""
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


# --- knobs written as strings ---------------------------------------------------------------------
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
