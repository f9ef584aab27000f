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

from .logs import AccessLog
from .supervisor import tree_rss
from .worker import State

if TYPE_CHECKING:
    from .pool import Pool
    from .proxy import Exchange
    from .server import Corral

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
    """Reads pools, workers and supervisors of one running corral at scrape time."""

    def __init__(self, corral: Corral, stats: dict[str, PoolStats]) -> None:
        self.corral = corral
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        c = self.corral
        requests = CounterMetricFamily(
            "corral_requests", "Requests answered, by status class (2xx..5xx)", labels=["app", "code"]
        )
        waits = HistogramMetricFamily(
            "corral_queue_wait_seconds", "Time from arrival to a worker taking the request", labels=["app"]
        )
        service = HistogramMetricFamily(
            "corral_upstream_service_seconds", "Time a worker held the request (dispatch to last byte)", labels=["app"]
        )
        depth = GaugeMetricFamily("corral_queue_depth", "Requests waiting in the central queue", labels=["app"])
        qmax = GaugeMetricFamily("corral_queue_max", "Queue capacity (max_queue)", labels=["app"])
        oldest = GaugeMetricFamily(
            "corral_queue_oldest_wait_seconds", "How long the oldest queued request has waited", labels=["app"]
        )
        inflight = GaugeMetricFamily("corral_inflight", "Requests held by workers right now", labels=["app"])
        workers = GaugeMetricFamily(
            "corral_workers", "Workers by state (busy = ready and holding)", labels=["app", "state"]
        )
        desired = GaugeMetricFamily("corral_workers_desired", "Workers the supervisor aims for", labels=["app"])
        restarts = CounterMetricFamily(
            "corral_worker_restarts", "Unplanned worker restarts, by reason", labels=["app", "reason"]
        )
        rejected = CounterMetricFamily(
            "corral_rejected", "Requests refused at once with 503 because the queue was full", labels=["app"]
        )
        refused = CounterMetricFamily(
            "corral_refused_early",
            "Requests refused at once with 503 because their predicted wait exceeded queue_timeout",
            labels=["app"],
        )
        timed_out = CounterMetricFamily(
            "corral_queue_timeouts", "Requests answered 503 after waiting queue_timeout", labels=["app"]
        )
        failed = CounterMetricFamily(
            "corral_upstream_failures", "Requests a worker failed (502/504: crash, reset, timeout)", labels=["app"]
        )
        retried = CounterMetricFamily(
            "corral_retries", "Requests moved to another worker because theirs refused the connection", labels=["app"]
        )
        route_p = GaugeMetricFamily(
            "corral_route_service_seconds",
            "Learned service time per route (recent p50/p99) and its class, for cost-aware dispatch",
            labels=["app", "route", "class", "quantile"],
        )
        route_n = CounterMetricFamily("corral_route_requests", "Requests seen per route", labels=["app", "route"])
        rss = GaugeMetricFamily(
            "corral_worker_rss_bytes", "Resident memory of a worker's process tree", labels=["app", "index"]
        )
        now = time.monotonic()
        for pool in c.pools:
            app = pool.name
            st = self.stats.get(app) or PoolStats()
            for i, n in enumerate(st.by_class[1:], start=1):
                requests.add_metric([app, CLASSES[i - 1]], n)
            waits.add_metric([app], st.queue_wait.cumulative(), st.queue_wait.sum)
            service.add_metric([app], st.service.cumulative(), st.service.sum)
            sched = pool.scheduler
            depth.add_metric([app], sched.depth)
            qmax.add_metric([app], sched.max_queue)
            oldest.add_metric([app], sched.oldest_wait(now))
            inflight.add_metric([app], len(pool.inflight))
            counts = dict.fromkeys(STATES, 0)
            for w in pool.workers:
                counts[w.display_state()] = counts.get(w.display_state(), 0) + 1
                if w.pid is not None and w.state is not State.STOPPED:
                    rss.add_metric([app, str(w.index)], tree_rss(w.pid))
            for state, n in counts.items():
                workers.add_metric([app, state], n)
            sup = c.supervisors.get(app)
            desired.add_metric([app], sup.desired if sup else len(pool.workers))
            for reason, n in (sup.restarts if sup else {}).items():
                restarts.add_metric([app, reason], n)
            rejected.add_metric([app], sched.rejected)
            timed_out.add_metric([app], sched.timed_out)
            refused.add_metric([app], sched.refused_early)
            failed.add_metric([app], pool.failed)
            retried.add_metric([app], pool.retried)
            for row in pool.costs.table()[:ROUTES_EXPORTED]:
                key, cls = str(row["route"]), str(row["class"])
                route_p.add_metric([app, key, cls, "0.5"], float(row["p50_s"]))  # type: ignore[arg-type]
                route_p.add_metric([app, key, cls, "0.99"], float(row["p99_s"]))  # type: ignore[arg-type]
                route_n.add_metric([app, key], float(row["count"]))  # type: ignore[arg-type]
        up = GaugeMetricFamily("corral_start_time_seconds", "Unix time corral started")
        up.add_metric([], c.started)
        yield from (requests, waits, service, depth, qmax, oldest, inflight, workers, desired, restarts)
        yield from (rejected, refused, timed_out, failed, retried, route_p, route_n, rss, up)


def registry_for(corral: Corral, stats: dict[str, PoolStats]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CorralCollector(corral, stats))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
