"""The admin channel: status, metrics, dashboard, reload, scale and stop over a small HTTP server.

It listens on a unix socket by default (one per public port, in a 0700 directory of the user's),
or on `--admin HOST:PORT`; never on the public port. A TCP address other than loopback needs
`--admin-token`, and then every call carries `Authorization: Bearer TOKEN`; without a token, a TCP
channel answers only requests whose Host names it (net.host_names), which defeats DNS rebinding. It is not the hot
path: one asyncio Protocol per connection, httptools for parsing, answers built in memory.

    GET  /          the dashboard (one self-contained page that polls /status and /series)
    GET  /status    workers, queues and totals as JSON
    GET  /series    the last minutes of queue depth, request rate and latency quantiles, as JSON
    GET  /metrics   Prometheus text format
    POST /reload    rolling replacement of every worker (?app=NAME for one app)
    POST /scale     ?workers=N (&app=NAME when there are several apps)
    POST /stop      graceful stop, as SIGTERM
    GET  /logs      recent worker output and corral's own lines (?after=SEQ&n=N&worker=I|APP:I&app=NAME), as
                    JSON lines, oldest first, each with a sequence number (`corral logs -f` asks after the last)
    GET  /livez     200 while the event loop runs (probes.py; no token needed, no data)
    GET  /readyz    200 while every app has ready_min ready workers and corral is not stopping, else 503
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import socket
import stat
import time
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

import httptools
import psutil
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__, edge, logs
from ..datapath.worker import State
from ..net import (
    TOKEN_ENV,
    AddressError,
    bind_tcp,
    default_socket,
    host_names,
    host_refusal,
    is_loopback,
    parse_address,
)
from ..supervision.supervisor import tree_rss
from . import metrics, probes, snapshot

if TYPE_CHECKING:
    from ..config import Config
    from .snapshot import AppSnap, WorkerSnap

MAX_REQUEST = 64 * 1024  # an admin request is a line and a few headers
LOGS_PAGE = 10_000  # most log lines one GET /logs returns: an answer is built in memory (lines are <= 4 KiB)
IDLE_CLOSE = 60.0  # keep-alive connections (the dashboard polls) are closed after this long idle between requests
SERIES_POINTS = 300  # one a second: five minutes of history for the dashboard
QUANTILE_WINDOW = 10  # seconds of history behind each p50/p99 point
ROUTES: dict[str, str] = {
    "/": "GET",
    "/status": "GET",
    "/series": "GET",
    "/metrics": "GET",
    "/reload": "POST",
    "/scale": "POST",
    "/stop": "POST",
    "/logs": "GET",
    "/livez": "GET",
    "/readyz": "GET",
}


class AdminError(Exception):
    """The admin channel cannot be opened as asked; the message is one line for the operator."""


class Corral(snapshot.Fleet, Protocol):
    """What the admin channel uses of server.Corral (which sits above it and is not imported)."""

    cfg: Config
    started: float
    balance: bool
    draining: bool

    def stop(self) -> None: ...


# --- binding -------------------------------------------------------------------------------------
def _private_dir(path: str) -> None:
    """Create the socket directory 0700, and refuse one that someone else could have planted."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise AdminError(f"admin socket directory {path} is not a private directory of this user; remove it")


def _bind_unix(path: str) -> socket.socket:
    if len(path.encode()) > 100:
        raise AdminError(f"admin socket path {path} is too long for a unix socket; give a shorter --admin unix:PATH")
    if os.path.exists(path):
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # left behind by a corral that died
            else:
                raise AdminError(f"admin socket {path} is in use by another corral; give another with --admin")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise AdminError(f"admin socket {path} cannot be created ({exc.strerror or exc})") from None
    os.chmod(path, 0o600)
    return sock


def _bind_tcp(host: str, port: int) -> socket.socket:
    try:
        return bind_tcp(host, port)
    except OSError as exc:
        raise AdminError(
            f"admin address {host}:{port} is not available ({exc.strerror or exc}); choose another with --admin"
        ) from None


# --- status -------------------------------------------------------------------------------------
class StatusBuilder:
    """Turns the live objects into the /status document. Keeps psutil handles for cpu_percent."""

    def __init__(self, corral: Corral, address: str) -> None:
        self.corral = corral
        self.address = address
        self._procs: dict[int, psutil.Process] = {}

    def _cpu(self, pid: int | None) -> float:
        if pid is None:
            return 0.0
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            return proc.cpu_percent(None)  # since the previous call; 0.0 the first time
        except psutil.Error:
            self._procs.pop(pid, None)
            return 0.0

    def build(self) -> dict[str, Any]:
        c = self.corral
        snap = snapshot.take(c, time.monotonic())
        apps = [self._app(app) for app in snap.apps]
        self._forget_gone({w.pid for a in snap.apps for w in a.workers})
        server = c.cfg.server
        return {
            "corral": {
                "version": __version__,
                "pid": os.getpid(),
                "uptime_s": round(time.time() - c.started, 1),
                "listen": f"http://{server.host}:{server.port}" if c.balance else None,
                "admin": self.address,
                "draining": c.draining,  # a stop has begun (/readyz answers 503)
            },
            "apps": apps,
            "totals": _totals(snap),
        }

    def _forget_gone(self, live: set[int | None]) -> None:
        for pid in [p for p in self._procs if p not in live]:
            del self._procs[pid]

    def _app(self, app: AppSnap) -> dict[str, Any]:
        q = app.queue
        return {
            "name": app.name,
            "route": app.route,
            "desired": app.desired,
            "ready": app.ready,
            "generation": app.generation,
            "reloading": app.reloading,
            "reload_note": app.reload_note,
            "supervised": app.supervised,
            "worker_ceiling": app.ceiling,  # most workers /scale accepts
            "autoscale": _autoscale_doc(app),
            "workers": [self._worker(w) for w in app.workers],
            "queue": {
                "depth": q.depth,
                "max": q.max,
                "rejected": q.rejected,
                "timed_out": q.timed_out,
                "refused_early": q.refused_early,  # admission control: predicted wait > queue_timeout
                "oldest_wait_s": round(q.oldest_wait, 3),
            },
            "served": app.served,
            "failed": app.failed,
            "refused": app.refused,
            "abandoned": app.abandoned,
            "cut": dict(app.cut),  # responses that did not reach the client whole, by why
            "retried": app.retried,
            "dispatch": app.dispatch,
            "long_inflight": q.long_inflight,
            "routes": list(app.routes),  # learned per-route cost and class, busiest first
            "restarts": dict(app.restarts),
            "restarts_total": app.restarts_total,
            "crash_loop": _crash_loop_doc(app),
            "sticky": app.sticky,
            "sessions": _sessions_doc(app),
        }

    def _worker(self, w: WorkerSnap) -> dict[str, Any]:
        return {
            "index": w.index,
            "pid": w.pid,
            "port": w.port,
            "socket": w.socket,  # worker_transport unix: where corral reaches it (port is 0 then)
            "state": w.display,
            "inflight": w.inflight,
            "max_inflight": w.max_inflight,
            "served": w.served,
            "failed": w.failed,
            "restarts": w.restarts,
            "rss_bytes": tree_rss(w.pid) if w.state is not State.STOPPED else 0,
            "cpu_percent": round(self._cpu(w.pid), 1),
            "uptime_s": round(w.age, 1),
            "generation": w.generation,
            "external": w.external,
            "note": w.note,
            "sessions": w.sessions,  # open WebSocket sessions; they never count in inflight
        }


def _crash_loop_doc(app: AppSnap) -> dict[str, Any] | None:
    c = app.crash_loop
    if c is None:
        return None
    return {
        "for_s": round(c.for_s, 1),
        "exits": c.exits,
        "limit": c.limit,
        "window_s": c.window,
        "worker": c.worker,
        "last_lines": list(c.last_lines),
    }


def _logs(params: dict[str, str]) -> tuple[int, bytes, str]:
    """GET /logs: the ring's entries after `after`, the newest `n` of them (default 100), one JSON per line."""
    try:
        after = int(params.get("after", "0"))
        n = int(params.get("n", "100"))
    except ValueError:
        return _json(400, {"error": "after and n must be integers"})
    n = min(max(n, 0), LOGS_PAGE)
    entries = logs.RING.read(after, n, params.get("worker") or None, params.get("app") or None)
    body = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries)
    return 200, body.encode(), "application/x-ndjson"


def _autoscale_doc(app: AppSnap) -> dict[str, Any] | None:
    a = app.autoscale
    if a is None:
        return None
    return {
        "min_workers": a.min_workers,
        "max_workers": a.max_workers,
        "scale_up_wait": a.scale_up_wait,
        "idle_timeout": a.idle_timeout,
        "last_reason": a.last_reason,
    }


def _totals(snap: snapshot.Snapshot) -> dict[str, int]:
    apps = snap.apps
    workers = [w for a in apps for w in a.workers]
    return {
        "workers": len(workers),
        "ready": sum(1 for w in workers if w.display in ("ready", "busy")),
        "busy": sum(1 for w in workers if w.display == "busy"),
        "inflight": sum(w.inflight for w in workers),
        "served": sum(a.served for a in apps),
        "failed": sum(a.failed for a in apps),
        "refused": sum(a.refused for a in apps),
        "abandoned": sum(a.abandoned for a in apps),
        "cut": sum(sum(a.cut.values()) for a in apps),
        "restarts": sum(a.restarts_total for a in apps),
        "queued": sum(a.queue.depth for a in apps),
        "rejected": sum(a.queue.rejected for a in apps),
        "timed_out": sum(a.queue.timed_out for a in apps),
        "sessions": sum(a.sessions for a in apps),
    }


def _sessions_doc(app: AppSnap) -> dict[str, int]:
    """WebSocket sessions: open now, the per-worker limit, ever opened, refused with 503."""
    return {
        "open": app.sessions,
        "max_per_worker": app.max_sessions,
        "opened": app.sessions_opened,
        "rejected": app.sessions_rejected,
    }


# --- history for the dashboard ------------------------------------------------------------------
def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile of a non-cumulative bucket histogram (metrics.BUCKETS), linearly interpolated."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    lower = 0.0
    for bound, n in zip(metrics.BUCKETS, counts, strict=False):
        if n and seen + n >= rank:
            return lower + (bound - lower) * (rank - seen) / n
        seen += n
        lower = bound
    return metrics.BUCKETS[-1]  # in the +Inf bucket: the largest finite bound is all we know


class Series:
    """One sample a second per app: enough to draw the last minutes without a time-series store."""

    def __init__(self, corral: Corral, stats: dict[str, metrics.PoolStats]) -> None:
        self.corral = corral
        self.stats = stats
        self.samples: dict[str, deque[tuple[Any, ...]]] = {}

    def sample(self) -> None:
        now = time.time()  # the charts' x axis is wall time; the snapshot runs on the scheduler's clock
        for app in snapshot.take(self.corral, time.monotonic(), routes=0).apps:
            st = self.stats[app.name]
            row = (
                now,
                app.queue.depth,
                app.busy,
                app.ready,
                st.total,
                list(st.queue_wait.counts),
                list(st.service.counts),
            )
            self.samples.setdefault(app.name, deque(maxlen=SERIES_POINTS)).append(row)

    def document(self) -> dict[str, Any]:
        apps = {}
        for name, rows in self.samples.items():
            pts = list(rows)
            out: dict[str, list[Any]] = {
                k: []
                for k in ("t", "depth", "busy", "ready", "rate", "wait_p50", "wait_p99", "service_p50", "service_p99")
            }
            for i, (t, depth, busy, ready, total, wait, svc) in enumerate(pts):
                prev = pts[i - 1] if i else None
                back = pts[max(0, i - QUANTILE_WINDOW)]
                out["t"].append(round(t, 3))
                out["depth"].append(depth)
                out["busy"].append(busy)
                out["ready"].append(ready)
                out["rate"].append(round((total - prev[4]) / max(1e-3, t - prev[0]), 2) if prev else 0)
                dw = [a - b for a, b in zip(wait, back[5], strict=True)]
                ds = [a - b for a, b in zip(svc, back[6], strict=True)]
                for key, counts, q in (
                    ("wait_p50", dw, 0.5),
                    ("wait_p99", dw, 0.99),
                    ("service_p50", ds, 0.5),
                    ("service_p99", ds, 0.99),
                ):
                    v = quantile(counts, q)
                    out[key].append(None if v is None else round(v, 6))
            apps[name] = out
        return {"interval_s": 1, "quantile_window_s": QUANTILE_WINDOW, "apps": apps}


# --- the server ----------------------------------------------------------------------------------
class AdminServer:
    """Bound in preflight (so a bad or busy address fails before any worker starts), served in run()."""

    def __init__(
        self,
        cfg: Config,
        sock: socket.socket,
        address: str,
        path: str | None,
        token: str | None,
        hosts: frozenset[str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.sock = sock
        self.address = address
        self.path = path
        self.token = token
        self.hosts = hosts  # Host values accepted; None: no Host rule (unix socket, or the token guards)
        self.tcp = path is None
        self.corral: Corral | None = None
        self.server: asyncio.AbstractServer | None = None
        self.stats: dict[str, metrics.PoolStats] = {}
        self.registry: Any = None
        self.status: StatusBuilder | None = None
        self.series: Series | None = None
        self.connections: set[AdminConnection] = set()
        # Each connection is a descriptor the public port may need: at most this many, and each owes its
        # request within header_timeout (bytes do not extend it), so trickling clients cannot hold them.
        self.max_connections = cfg.server.admin_max_connections
        self.request_timeout = cfg.server.header_timeout
        self.busy = response(
            503,
            _json(503, {"error": f"too many admin connections (admin_max_connections {self.max_connections})"})[1],
            "application/json",
            keep_alive=False,
        )
        self._sampler: asyncio.Task[None] | None = None
        self._page: bytes | None = None

    @classmethod
    def prepare(cls, cfg: Config) -> AdminServer:
        server = cfg.server
        token = server.admin_token or os.environ.get(TOKEN_ENV) or None
        spec = server.admin or f"unix:{default_socket(server.port)}"
        try:
            kind, host, port = parse_address(spec)
        except AddressError as exc:
            raise AdminError(f"admin: {exc}") from None
        if kind == "unix":
            if server.admin is None:
                _private_dir(os.path.dirname(host))
            sock = _bind_unix(host)
            return cls(cfg, sock, f"unix:{host}", host, token)
        if port == server.port:
            raise AdminError(f"admin address {spec}: the admin channel is never served on the public port {port}")
        if not is_loopback(host) and not token:
            raise AdminError(
                f"admin address {spec} is reachable from other machines: set --admin-token TOKEN "
                f"(or ${TOKEN_ENV}) or bind it to 127.0.0.1 or unix:/path"
            )
        sock = _bind_tcp(host, port)
        # A browser cannot attach the token, so with one a rebound page gets nowhere whatever its Host;
        # without one (loopback only) the Host header is what tells a rebound page from the operator's.
        hosts = None if token else host_names(host, port, server.admin_hosts)
        return cls(cfg, sock, f"{host}:{port}" if ":" not in host else f"[{host}]:{port}", None, token, hosts)

    def unlink_socket(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def start(self, corral: Corral) -> None:
        loop = asyncio.get_running_loop()
        self.corral = corral
        for pool in corral.pools:
            self.stats[pool.name] = metrics.PoolStats()
            metrics.attach(pool, self.stats[pool.name])
        self.registry = metrics.registry_for(self._metrics_snapshot, corral.started, self.stats)
        self.status = StatusBuilder(corral, self.address)
        self.series = Series(corral, self.stats)
        self.sock.listen(64)
        self.sock.setblocking(False)
        if self.tcp:
            self.server = await loop.create_server(lambda: AdminConnection(self), sock=self.sock)
        else:
            self.server = await loop.create_unix_server(lambda: AdminConnection(self), sock=self.sock)
        self._sampler = loop.create_task(self._sample())

    def _metrics_snapshot(self) -> snapshot.Snapshot:
        assert self.corral is not None
        return snapshot.take(self.corral, time.monotonic(), routes=metrics.ROUTES_EXPORTED)

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close()
        self.unlink_socket()

    async def _sample(self) -> None:
        assert self.series is not None
        while True:
            self.series.sample()
            await asyncio.sleep(1.0)

    # --- requests ---------------------------------------------------------------------------
    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self.token is None:
            return True
        given = headers.get(b"authorization", b"")
        return hmac.compare_digest(given, b"Bearer " + self.token.encode())

    def handle(self, method: str, path: str, query: str, headers: dict[bytes, bytes]) -> tuple[int, bytes, str]:
        """(status, body, content type) for one request."""
        misdirected = self._misdirected(headers.get(b"host"))
        if misdirected:
            return misdirected
        want = ROUTES.get(path)
        if want is None:
            return _json(404, {"error": f"no such admin endpoint: {path}", "endpoints": sorted(ROUTES)})
        if method != want:
            return _json(405, {"error": f"{path} takes {want}, not {method}"})
        if path == "/" and method == "GET":
            return 200, self.page(), "text/html; charset=utf-8"  # static shell: it sends the token itself
        if path in probes.PATHS:  # a status code and a fixed word: no token, as on --health-listen
            assert self.corral is not None
            status, body = probes.answer(path, self.corral)
            return status, body, "text/plain; charset=utf-8"
        if not self.authorized(headers):
            return _json(401, {"error": "admin token required: Authorization: Bearer TOKEN"})
        if self.tcp and method == "POST" and _cross_site(headers):
            return _json(403, {"error": "cross-site request refused"})
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        if path == "/status":
            assert self.status is not None
            return _json(200, self.status.build())
        if path == "/series":
            assert self.series is not None
            return _json(200, self.series.document())
        if path == "/metrics":
            return 200, metrics.render(self.registry), CONTENT_TYPE_LATEST
        if path == "/logs":
            return _logs(params)
        if path == "/reload":
            return self._reload(params.get("app"))
        if path == "/scale":
            return self._scale(params.get("workers"), params.get("app"))
        return self._stop()

    def _misdirected(self, host: bytes | None) -> tuple[int, bytes, str] | None:
        """The Host rule: refused before anything else, so a rebound page learns and changes nothing."""
        if self.hosts is None:
            return None
        refused = host_refusal(None if host is None else host.decode("latin-1"), self.hosts)
        if refused is None:
            return None
        return _json(400 if host is None else 421, {"error": refused})  # RFC 9112: no Host at all is a 400

    def page(self) -> bytes:
        if self._page is None:
            self._page = resources.files("corral.ops").joinpath("dashboard.html").read_bytes()
        return self._page

    def _pick(self, app: str | None) -> tuple[list[str], tuple[int, bytes, str] | None]:
        assert self.corral is not None
        sups = self.corral.supervisors
        if app is not None:
            if app in sups:
                return [app], None
            known = [p.name for p in self.corral.pools]
            if app in known:
                return [], _json(400, {"error": f"app {app!r} balances external upstreams; corral does not run them"})
            return [], _json(404, {"error": f"no app named {app!r}", "apps": known})
        if not sups:
            return [], _json(400, {"error": "no app whose workers corral runs"})
        return list(sups), None

    def _reload(self, app: str | None) -> tuple[int, bytes, str]:
        names, err = self._pick(app)
        if err:
            return err
        assert self.corral is not None
        return _json(202, {"ok": True, "messages": [self.corral.supervisors[n].reload() for n in names]})

    def _scale(self, workers: str | None, app: str | None) -> tuple[int, bytes, str]:
        if workers is None or not workers.isascii() or not workers.isdigit() or int(workers) < 1:
            return _json(400, {"error": "give workers=N with N >= 1"})
        names, err = self._pick(app)
        if err:
            return err
        if len(names) > 1:
            return _json(400, {"error": "several apps: give app=NAME", "apps": names})
        assert self.corral is not None
        name, n = names[0], int(workers)
        scaler = self.corral.autoscalers.get(name)
        if scaler is not None:  # its policy's bounds already lie within the ceiling
            return self._scale_to(name, scaler.policy.clamp(n), n)
        sup = self.corral.supervisors[name]
        top = snapshot.ceiling(sup.app)
        if n > top:  # each worker is a process and file descriptors: /scale?workers=100000 must not fork them
            return _json(400, {"error": _range_error(top), "ceiling": top})
        return self._scale_to(name, n, n)

    def _scale_to(self, name: str, n: int, asked: int) -> tuple[int, bytes, str]:
        assert self.corral is not None
        messages = [self.corral.supervisors[name].scale(n)]
        scaler = self.corral.autoscalers.get(name)
        if n != asked and scaler is not None:
            messages.append(f"autoscaled app: kept within {scaler.policy.min_workers}..{scaler.policy.max_workers}")
        return _json(202, {"ok": True, "workers": n, "messages": messages})

    def _stop(self) -> tuple[int, bytes, str]:
        assert self.corral is not None
        self.corral.draining = True  # /readyz turns 503 now, as on SIGTERM (a preStop hook relies on it)
        asyncio.get_running_loop().call_later(0.05, self.corral.stop)  # after this answer is written
        return _json(202, {"ok": True, "messages": ["stopping: finishing in-flight requests"]})


def _range_error(top: int) -> str:
    why = "worker ceiling: max_workers, else 4 x CPUs and at least 16, within the open-file limit"
    return f"workers must be between 1 and {top} ({why})"


def _json(status: int, doc: Any) -> tuple[int, bytes, str]:
    return status, json.dumps(doc, indent=None, separators=(",", ":")).encode(), "application/json"


def _cross_site(headers: dict[bytes, bytes]) -> bool:
    """A browser POST from another site carries its Origin: such a page must not reload or stop us."""
    origin = headers.get(b"origin")
    if origin is None:
        return False  # not a browser (corral's CLI, curl)
    host = headers.get(b"host", b"")
    return origin.split(b"://", 1)[-1] != host


SECURITY_HEADERS = (
    b"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
    b"Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    b"connect-src 'self'; img-src data:\r\n"
)


def response(status: int, body: bytes, ctype: str, keep_alive: bool, extra: bytes = b"") -> bytes:
    connection = b"keep-alive" if keep_alive else b"close"
    return edge.answer(status, body, ctype.encode(), connection, SECURITY_HEADERS + extra)


class AdminConnection(asyncio.Protocol):
    """One admin client. Requests are answered in order as each completes (answers are immediate).

    A connection beyond admin_max_connections gets a short 503 and is closed at once, unread. A request
    must arrive whole within header_timeout of the connection's accept (or, kept alive, of its own first
    byte): further bytes do not extend that deadline. Between requests a connection may idle IDLE_CLOSE.
    """

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.size = 0
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._awaiting = False  # a request is due: its deadline runs

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.server.connections) >= self.server.max_connections:
            self.close(self.server.busy)  # over the cap: its descriptor goes back now, nothing is read
            return
        self.server.connections.add(self)
        self._expect_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()

    def _set_timer(self, delay: float, then: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, then)

    def _expect_request(self) -> None:
        """Start the request deadline, once per request: bytes never re-arm it."""
        if not self._awaiting:
            self._awaiting = True
            self._set_timer(self.server.request_timeout, self._too_slow)

    def _between_requests(self) -> None:
        self._awaiting = False
        self._set_timer(IDLE_CLOSE, self.close)

    def _too_slow(self) -> None:
        self._send_error(408, f"no whole request within header_timeout ({self.server.request_timeout:g}s)")

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.size += len(data)
        if self.size > MAX_REQUEST:
            self._send_error(431, "request too large")
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # on_message_complete has refused it already (one request, one answer); nothing more is read
            if not self.closed:
                self._send_error(400, "upgrade not supported")
        except httptools.HttpParserError as exc:
            if not self.closed:
                self._send_error(400, f"malformed request: {exc}")

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self._expect_request()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_message_complete(self) -> None:
        if self.closed:
            return
        if self.parser.should_upgrade():  # refused before anything is done: one request, one answer
            self._send_error(400, "upgrade not supported")
            return
        self.size = 0
        self._between_requests()
        method = self.parser.get_method().decode("latin-1")
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self._send_error(400, "malformed URL")
            return
        path = (url.path or b"/").decode("latin-1")
        query = (url.query or b"").decode("latin-1")
        status, body, ctype = self.server.handle(method, path, query, self.headers)
        keep = self.parser.should_keep_alive()
        extra = b""
        if status == 401:
            extra = b'WWW-Authenticate: Bearer realm="corral"\r\n'
        elif status == 405:
            extra = f"Allow: {ROUTES[path]}\r\n".encode()
        self._write(response(status, body, ctype, keep, extra))
        if not keep:
            self.close()

    def _send_error(self, status: int, message: str) -> None:
        _, body, ctype = _json(status, {"error": message})
        self._write(response(status, body, ctype, keep_alive=False))
        self.close()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self, last: bytes = b"") -> None:
        if last:
            self._write(last)
        self.closed = True
        if self.transport is not None:
            self.transport.close()
