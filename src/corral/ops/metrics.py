"""Prometheus metrics, read from the live objects at scrape time.

The data path only bumps plain ints and fixed bucket arrays (`PoolStats.observe`, called once per
finished exchange through `pool.on_observe`); prometheus-client objects exist only while a scrape
runs (`CorralCollector.collect`), so a request never pays for a metrics library call.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ..datapath.worker import State
from ..logs import AccessLog
from ..supervision.processes import tree_rss
from ..supervision.supervisor import IDLE

if TYPE_CHECKING:
    from ..datapath.exchange import Exchange
    from ..datapath.pool import Pool

# Upper bounds in seconds, shared by queue wait and service time: fine enough below 10 ms for a
# fast plumber handler, long enough for the slow ones a queue exists for.
BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
STATES = ("starting", "ready", "busy", "draining", "unhealthy", "stopping", "stopped")
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

ROUTES_EXPORTED = 50  # label cardinality bound: the busiest routes only


class Histogram:
    """A fixed-bucket histogram as plain numbers: counts[i] is non-cumulative, the last is +Inf."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class PoolStats:
    """Per-app counters fed by the exchange observer. Plain ints: this runs once per request."""

    __slots__ = ("by_class", "queue_wait", "service")

    def __init__(self) -> None:
        self.by_class = [0] * 6  # index = status // 100 (0 = no status: the client left first)
        self.queue_wait = Histogram()
        self.service = Histogram()

    def observe(self, ex: Exchange) -> None:
        self.by_class[min(ex.status // 100, 5)] += 1
        if ex.dispatched_at:  # it reached a worker; requests answered 503 from the queue did not
            self.queue_wait.observe(ex.dispatched_at - ex.created)
            self.service.observe(time.monotonic() - ex.dispatched_at)

    @property
    def total(self) -> int:
        return sum(self.by_class)


class Observers(list):  # type: ignore[type-arg]
    """Several `pool.on_observe` callbacks (metrics, access log) behind the one hook."""

    def __call__(self, ex: Exchange) -> None:
        for fn in self:
            fn(ex)


def attach(pool: Pool, stats: PoolStats) -> None:
    """Put `stats.observe` first on the pool's observer hook, keeping an access log already there."""
    prev: Callable[[Exchange], None] = pool.on_observe
    keep = isinstance(prev, (Observers, AccessLog))
    pool.on_observe = Observers([stats.observe, prev] if keep else [stats.observe])


class CorralCollector(Collector):
    """Renders, at scrape time, a fresh snapshot of a running corral and the request counters.

    `read` returns a snapshot.Snapshot (routes.py passes `snapshot.take` bound to its corral). It is passed
    in, not imported: metrics and snapshot are independent siblings in pyproject's import layers, so
    the apps are read by attribute (`Any` below)."""

    def __init__(self, read: Callable[[], Any], started: float, stats: dict[str, PoolStats]) -> None:
        self.read = read
        self.started = started
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        fams = _families()
        for app in self.read().apps:
            _add_traffic(fams, app, self.stats.get(app.name) or PoolStats())
            _add_fleet(fams, app)
            _add_routes(fams, app)
            _add_clients(fams, app)
            _add_zero(fams, app)
            _add_quarantine(fams, app)
        up = GaugeMetricFamily("corral_start_time_seconds", "Unix time corral started")
        up.add_metric([], self.started)
        yield from fams.values()
        yield up


def _families() -> dict[str, Any]:
    """Every per-app family, in exposition order, keyed by the name the helpers fill."""
    counter, gauge = CounterMetricFamily, GaugeMetricFamily
    specs: list[tuple[type, str, str, list[str]]] = [
        (counter, "corral_requests", "Requests answered, by status class (2xx..5xx)", ["code"]),
        (HistogramMetricFamily, "corral_queue_wait_seconds", "Time from arrival to a worker taking the request", []),
        (
            HistogramMetricFamily,
            "corral_upstream_service_seconds",
            "Time a worker held the request (dispatch to last byte)",
            [],
        ),
        (gauge, "corral_queue_depth", "Requests waiting in the central queue", []),
        (gauge, "corral_queue_max", "Queue capacity (max_queue)", []),
        (gauge, "corral_queue_oldest_wait_seconds", "How long the oldest queued request has waited", []),
        (gauge, "corral_inflight", "Requests held by workers right now", []),
        (gauge, "corral_workers", "Workers by state (busy = ready and holding)", ["state"]),
        (gauge, "corral_workers_desired", "Workers the supervisor aims for", []),
        (counter, "corral_worker_restarts", "Worker restarts, by reason (failures; recycling by count)", ["reason"]),
        (counter, "corral_rejected", "Requests refused at once with 503 because the queue was full", []),
        (
            counter,
            "corral_refused_early",
            "Requests refused at once with 503 because their predicted wait exceeded queue_timeout",
            [],
        ),
        (counter, "corral_queue_timeouts", "Requests answered 503 after waiting queue_timeout", []),
        (counter, "corral_upstream_failures", "Requests a worker failed (502/504: crash, reset, timeout)", []),
        (
            counter,
            "corral_exchanges",
            "Requests ended, by outcome: served (the client took the whole response), failed (by the worker), "
            "refused (corral answered: edge 4xx, queue 503 or 429), abandoned (the client left first); one access-log "
            "line each",
            ["outcome"],
        ),
        (
            counter,
            "corral_responses_cut",
            "Responses whose head went out but whose body did not reach the client whole, by why",
            ["reason"],
        ),
        (counter, "corral_retries", "Requests moved to another worker because theirs refused the connection", []),
        (
            counter,
            "corral_redispatched",
            "Requests sent once more, to another worker, because theirs was killed from outside (SIGKILL or SIGTERM "
            "corral did not send) before any response byte reached the client",
            [],
        ),
        (
            gauge,
            "corral_quarantined",
            "Requests (method, path, hash of query and body) quarantined now, by route: they made two workers exit "
            "and are answered 502 without reaching a worker until the quarantine lifts",
            ["route"],
        ),
        (counter, "corral_quarantine_refused", "Requests answered 502 at once because they were quarantined", []),
        (
            gauge,
            "corral_route_service_seconds",
            "Learned service time per route (recent p50/p99) and its class, for cost-aware dispatch",
            ["route", "class", "quantile"],
        ),
        (counter, "corral_route_requests", "Requests seen per route", ["route"]),
        (gauge, "corral_worker_rss_bytes", "Resident memory of a worker's process tree", ["index"]),
        (gauge, "corral_crash_looping", "1 while the app's workers exit crash_limit times within its window", []),
        (gauge, "corral_sessions", "WebSocket sessions open now (they do not count in corral_inflight)", []),
        (counter, "corral_sessions_opened", "WebSocket sessions opened (tunnels after a worker's 101)", []),
        (counter, "corral_sessions_rejected", "New WebSocket sessions answered 503 at the queue's limits", []),
        (
            counter,
            "corral_client_rejected",
            "Requests refused at once with 429 because their client had max_queue_per_client waiting",
            [],
        ),
        (gauge, "corral_clients_waiting", "Clients (fair_key) with requests waiting in the queue", []),
        (
            gauge,
            "corral_client_share",
            "The heaviest clients' share of the worker time of the last one to two minutes (fair queueing; "
            "client: truncated address or value and a hash, never a whole address)",
            ["client"],
        ),
        (gauge, "corral_client_queued", "Requests the heaviest clients have waiting", ["client"]),
        (gauge, "corral_scaled_to_zero", "1 while the app is idle, scaled to zero: no worker runs (min_workers 0)", []),
        (counter, "corral_cold_starts", "Starts from zero that ended with a worker ready", []),
        (counter, "corral_cold_start_failures", "Attempts of starts from zero that failed", []),
        (gauge, "corral_cold_start_last_seconds", "How long the last start from zero took, to a worker ready", []),
        (
            counter,
            "corral_cold_start_refused",
            "Requests answered 503 + Retry-After because a start from zero had failed",
            [],
        ),
    ]
    return {name: kind(name, doc, labels=["app", *labels]) for kind, name, doc, labels in specs}


def _add_traffic(fams: dict[str, Any], app: Any, st: PoolStats) -> None:
    name = app.name
    for i, n in enumerate(st.by_class[1:], start=1):
        fams["corral_requests"].add_metric([name, CLASSES[i - 1]], n)
    fams["corral_queue_wait_seconds"].add_metric([name], st.queue_wait.cumulative(), st.queue_wait.sum)
    fams["corral_upstream_service_seconds"].add_metric([name], st.service.cumulative(), st.service.sum)
    q = app.queue
    for family, value in (
        ("corral_queue_depth", q.depth),
        ("corral_queue_max", q.max),
        ("corral_queue_oldest_wait_seconds", q.oldest_wait),
        ("corral_inflight", app.inflight),
        ("corral_rejected", q.rejected),
        ("corral_refused_early", q.refused_early),
        ("corral_queue_timeouts", q.timed_out),
        ("corral_upstream_failures", app.failed),
        ("corral_retries", app.retried),
        ("corral_sessions", app.sessions),
        ("corral_sessions_opened", app.sessions_opened),
        ("corral_sessions_rejected", app.sessions_rejected),
    ):
        fams[family].add_metric([name], value)
    for outcome, n in (("served", app.served), ("failed", app.failed), ("refused", app.refused),
                       ("abandoned", app.abandoned)):  # fmt: skip
        fams["corral_exchanges"].add_metric([name, outcome], n)
    for reason, n in app.cut.items():
        fams["corral_responses_cut"].add_metric([name, reason], n)


def _add_fleet(fams: dict[str, Any], app: Any) -> None:
    name = app.name
    for state, n in (dict.fromkeys(STATES, 0) | app.states()).items():
        fams["corral_workers"].add_metric([name, state], n)
    fams["corral_workers_desired"].add_metric([name], app.desired)
    if app.supervised:
        fams["corral_crash_looping"].add_metric([name], 1 if getattr(app, "crash_loop", None) else 0)
    for reason, n in app.restarts.items():
        fams["corral_worker_restarts"].add_metric([name, reason], n)
    for w in app.workers:
        if w.pid is not None and w.state is not State.STOPPED:
            fams["corral_worker_rss_bytes"].add_metric([name, str(w.index)], tree_rss(w.pid))


def _add_routes(fams: dict[str, Any], app: Any) -> None:
    for row in app.routes:
        key, cls = str(row["route"]), str(row["class"])
        fams["corral_route_service_seconds"].add_metric([app.name, key, cls, "0.5"], float(row["p50_s"]))
        fams["corral_route_service_seconds"].add_metric([app.name, key, cls, "0.99"], float(row["p99_s"]))
        fams["corral_route_requests"].add_metric([app.name, key], float(row["count"]))


def _add_clients(fams: dict[str, Any], app: Any) -> None:
    fair = app.fair
    if fair is None:
        return
    fams["corral_client_rejected"].add_metric([app.name], fair.rejected)
    fams["corral_clients_waiting"].add_metric([app.name], fair.waiting_clients)
    for c in fair.clients:
        fams["corral_client_share"].add_metric([app.name, c.key], c.share)
        fams["corral_client_queued"].add_metric([app.name, c.key], c.queued)


def _add_zero(fams: dict[str, Any], app: Any) -> None:
    zero = getattr(app, "zero", None)
    if zero is None:  # not an app that scales to zero
        return
    name = app.name
    fams["corral_scaled_to_zero"].add_metric([name], 1 if zero.state == IDLE else 0)
    fams["corral_cold_starts"].add_metric([name], zero.cold_starts)
    fams["corral_cold_start_failures"].add_metric([name], zero.failures)
    fams["corral_cold_start_refused"].add_metric([name], zero.refused)
    if zero.last_cold_start is not None:
        fams["corral_cold_start_last_seconds"].add_metric([name], zero.last_cold_start)


def _add_quarantine(fams: dict[str, Any], app: Any) -> None:
    fams["corral_redispatched"].add_metric([app.name], app.redispatched)
    q = app.quarantine
    if q is None:
        return
    fams["corral_quarantine_refused"].add_metric([app.name], q.refused)
    by_route: dict[str, int] = {}
    for e in q.entries:
        by_route[e.route] = by_route.get(e.route, 0) + 1
    for route, n in by_route.items():
        fams["corral_quarantined"].add_metric([app.name, route], n)


def registry_for(read: Callable[[], Any], started: float, stats: dict[str, PoolStats]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CorralCollector(read, started, stats))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
