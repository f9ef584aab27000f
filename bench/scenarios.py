"""The T1-T8 scenarios.

Each scenario starts its own backend once, then for every run measures each
proxy in turn over those same backend processes.  The proxy order rotates from
run to run so that no proxy always goes first (or last) on a noisy machine.
With a baseline (`--baseline REV`), corral built from REV runs right next to the
current tree's corral, the two swapping places from run to run.  With
`--corral-rev REV`, the `corral` column itself runs REV instead of the working tree.
A proxy that fails (typically corral while it is being written) is recorded as
an error for that scenario and skipped; the other proxies still get measured.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import fairload
import ggc
import loadgen
import psutil
from baseline import CorralBuild, Revision
from procs import HOST, Usage, http_get
from proxies import (
    BACKEND_PORT_BASE,
    CORRAL,
    HAPROXY,
    HAPROXY_KA,
    NGINX,
    NGINX_KA,
    NGINX_RR,
    ProxySpec,
    RunningProxy,
    running_backend_nginx,
    running_proxy,
)
from report import Goal, Metric, Results
from stats import percentile
from workers import APP as WORKER_APP
from workers import WorkerPool
from wrk import BackgroundWrk, WrkResult, run_wrk

WORKER_PORT_BASE = 19100
SEED = 20240617
T5_WORKERS = (1, 2, 4, 8)
T5_SLEEP_S = 0.05


@dataclass
class Context:
    runs: int
    quick: bool
    tmp: Path
    results: Results
    log: Callable[[str], None]
    corral_cmd: list[str] | None
    corral_error: str | None = None
    corral_args: list[str] = field(default_factory=list)
    baseline: Revision | None = None
    corral_build: CorralBuild | None = None  # None: the working tree's corral (corral_cmd)
    asyncio_twin: bool = False  # also corral@asyncio: the same corral on asyncio's own loop (issue 24)

    def dur(self, full: float, quick: float) -> float:
        return quick if self.quick else full

    @property
    def warm_s(self) -> float:
        return self.dur(2.0, 1.0)


ASYNCIO_TWIN = "corral@asyncio"  # a corral@ name: the report sets it beside corral, with its ratio


def url(port: int, path: str) -> str:
    return f"http://{HOST}:{port}{path}"


def worker_ports(n: int) -> list[int]:
    return list(range(WORKER_PORT_BASE, WORKER_PORT_BASE + n))


def each_proxy(
    ctx: Context,
    scenario: str,
    specs: Sequence[ProxySpec],
    upstream_ports: Sequence[int],
    ready_path: str,
    measure: Callable[[RunningProxy, int], None],
    per_run: Callable[[int], None] | None = None,
) -> None:
    """For each run, for each proxy (rotated): start it, `measure(proxy, run)`, stop it."""
    broken: set[str] = set()
    if ctx.corral_cmd is None and ctx.corral_build is None and any(s.kind == "corral" for s in specs):
        ctx.results.error(scenario, CORRAL.name, ctx.corral_error or "corral not available")
        broken.add(CORRAL.name)
    units = rotation_units(ctx.corral_build, ctx.baseline, specs, ctx.asyncio_twin)
    for run in range(ctx.runs):
        if per_run is not None:
            per_run(run)
        for spec in run_order(units, run):
            if spec.name in broken:
                continue
            ctx.log(f"{scenario} run {run + 1}/{ctx.runs}: {spec.name}")
            workdir = ctx.tmp / scenario / f"{spec.name}-run{run}"
            try:
                with running_proxy(spec, upstream_ports, workdir, ready_path, ctx.corral_cmd, ctx.corral_args) as proxy:
                    measure(proxy, run)
            except Exception as exc:  # one proxy failing must not sink the whole comparison
                ctx.log(f"{scenario} {spec.name} FAILED: {exc}")
                ctx.results.error(scenario, spec.name, f"run {run}: {exc}")
                broken.add(spec.name)


def rotation_units(
    current: CorralBuild | None, baseline: Revision | None, specs: Sequence[ProxySpec], asyncio_twin: bool = False
) -> list[list[ProxySpec]]:
    """What rotates: one proxy, or the current corral together with its baseline twin (same corral args) and
    its asyncio twin (`--asyncio-twin`: the same corral with `--loop asyncio`)."""
    units: list[list[ProxySpec]] = []
    for spec in specs:
        if spec.kind == "corral" and spec.build is None and current is not None:
            spec = replace(spec, build=current)
        unit = [spec]
        if baseline is not None and spec.kind == "corral" and spec.name == CORRAL.name:
            unit.append(replace(spec, name=baseline.name, build=baseline.build))
        if asyncio_twin and spec.kind == "corral" and spec.name == CORRAL.name:
            unit.append(replace(spec, name=ASYNCIO_TWIN, corral_args=(*spec.corral_args, "--loop", "asyncio")))
        units.append(unit)
    return units


def run_order(units: Sequence[Sequence[ProxySpec]], run: int) -> list[ProxySpec]:
    """Rotate the units from run to run; inside a unit, who goes first alternates (odd runs reversed)."""
    k = run % len(units)
    order: list[ProxySpec] = []
    for unit in [*units[k:], *units[:k]]:
        order.extend(unit if run % 2 == 0 else reversed(unit))
    return order


def warm(ctx: Context, port: int, path: str, connections: int) -> None:
    run_wrk(url(port, path), connections, ctx.warm_s)


def cpu_us_per_request(before: Usage, after: Usage, requests: int) -> float:
    return (after.cpu_s - before.cpu_s) / max(requests, 1) * 1e6


def record_wrk(ctx: Context, scenario: str, target: str, run: int, r: WrkResult, **extra: float) -> None:
    ctx.results.record(scenario, target, run, {**r.as_dict(), **extra})


# --- T1: throughput on /fast ------------------------------------------------------------------


def t1(ctx: Context) -> None:
    res = ctx.results
    rps = res.metric("T1", "req/s (2 workers, /fast, c=32)", "higher", [Goal("best", ">=", 1.0)])
    p50 = res.metric("T1", "p50 ms", "lower")
    p99 = res.metric("T1", "p99 ms", "lower")
    failed = res.metric("T1", "failed requests", "lower", [Goal("abs", "<=", 0)])
    cpu = res.metric("T1", "proxy CPU µs/req (T7)", "lower", [Goal("nginx", "<=", 1.0)])
    duration = ctx.dur(10, 5)

    def measure(proxy: RunningProxy, run: int) -> None:
        warm(ctx, proxy.port, "/fast", 32)
        before = proxy.usage()
        r = run_wrk(url(proxy.port, "/fast"), 32, duration)
        after = proxy.usage()
        name = proxy.spec.name
        rps.add(name, r.rps)
        p50.add(name, r.p50_ms)
        p99.add(name, r.p99_ms)
        failed.add(name, r.failed)
        cpu_us = cpu_us_per_request(before, after, r.requests)
        cpu.add(name, cpu_us)
        record_wrk(ctx, "T1", name, run, r, cpu_us_per_req=cpu_us)

    with WorkerPool(worker_ports(2), ctx.tmp / "T1") as pool:
        each_proxy(ctx, "T1", [CORRAL, NGINX, HAPROXY], pool.ports, "/fast", measure)


# --- T2: single-connection latency --------------------------------------------------------------


def t2(ctx: Context) -> None:
    res = ctx.results
    p50 = res.metric("T2", "p50 ms (c=1, /fast)", "lower")
    p99 = res.metric("T2", "p99 ms (c=1)", "lower")
    added = res.metric("T2", "p50 minus direct p50, ms", "lower", [Goal("abs", "<=", 0.25)])
    duration = ctx.dur(10, 5)
    direct_p50: dict[int, float] = {}

    def direct(run: int) -> None:
        # `direct` opens a connection per request, exactly like a non-keep-alive proxy does
        # towards the worker; `direct-ka` reuses one, which hits httpuv's ~40 ms
        # Nagle/delayed-ACK stall and is shown only as a warning sign.
        port = WORKER_PORT_BASE
        for name, headers in (("direct", ["Connection: close"]), ("direct-ka", [])):
            ctx.log(f"T2 run {run + 1}/{ctx.runs}: {name}")
            run_wrk(url(port, "/fast"), 1, ctx.warm_s, headers=headers)
            r = run_wrk(url(port, "/fast"), 1, duration, headers=headers)
            p50.add(name, r.p50_ms)
            p99.add(name, r.p99_ms)
            record_wrk(ctx, "T2", name, run, r)
            if name == "direct":
                direct_p50[run] = r.p50_ms

    def measure(proxy: RunningProxy, run: int) -> None:
        warm(ctx, proxy.port, "/fast", 1)
        r = run_wrk(url(proxy.port, "/fast"), 1, duration)
        name = proxy.spec.name
        p50.add(name, r.p50_ms)
        p99.add(name, r.p99_ms)
        added.add(name, r.p50_ms - direct_p50[run])
        record_wrk(ctx, "T2", name, run, r)

    with WorkerPool(worker_ports(2), ctx.tmp / "T2") as pool:
        each_proxy(ctx, "T2", [CORRAL, NGINX, HAPROXY], pool.ports, "/fast", measure, per_run=direct)


# --- T3: proxy ceiling against an nginx backend -------------------------------------------------


def t3(ctx: Context) -> None:
    res = ctx.results
    rps = res.metric("T3", "req/s (nginx backend, c=32)", "higher", [Goal("nginx-ka", ">=", 0.7)])
    p99 = res.metric("T3", "p99 ms", "lower")
    cpu = res.metric("T3", "proxy CPU µs/req", "lower")
    duration = ctx.dur(10, 5)
    ports = list(range(BACKEND_PORT_BASE, BACKEND_PORT_BASE + 4))
    corral = replace(CORRAL, corral_args=("--max-inflight", "64"))

    def direct(run: int) -> None:
        ctx.log(f"T3 run {run + 1}/{ctx.runs}: direct")
        warm(ctx, ports[0], "/", 32)
        r = run_wrk(url(ports[0], "/"), 32, duration)
        rps.add("direct", r.rps)
        p99.add("direct", r.p99_ms)
        record_wrk(ctx, "T3", "direct", run, r)

    def measure(proxy: RunningProxy, run: int) -> None:
        warm(ctx, proxy.port, "/", 32)
        before = proxy.usage()
        r = run_wrk(url(proxy.port, "/"), 32, duration)
        after = proxy.usage()
        name = proxy.spec.name
        rps.add(name, r.rps)
        p99.add(name, r.p99_ms)
        cpu_us = cpu_us_per_request(before, after, r.requests)
        cpu.add(name, cpu_us)
        record_wrk(ctx, "T3", name, run, r, cpu_us_per_req=cpu_us)

    with running_backend_nginx(ports, ctx.tmp / "T3" / "backend"):
        each_proxy(ctx, "T3", [corral, NGINX_KA, NGINX, HAPROXY_KA], ports, "/", measure, per_run=direct)


# --- T4: head-of-line blocking under open-loop Poisson load -------------------------------------

FAST = loadgen.TrafficClass("fast", "/fast", 20.0)
SLOW = loadgen.TrafficClass("slow", "/sleep?ms=2000", 1.0)


def service_times(port: int) -> dict[str, float]:
    """Unloaded per-class service time, measured directly on an idle worker."""
    fast = [loadgen.Arrival(i * 0.05, FAST.name, FAST.path) for i in range(40)]
    slow = [loadgen.Arrival(i * 2.3, SLOW.name, SLOW.path) for i in range(2)]
    out = loadgen.run(HOST, port, fast) + loadgen.run(HOST, port, slow)
    if any(not o.ok for o in out):
        raise RuntimeError("worker failed during service-time calibration")
    return {c: percentile([o.latency for o in out if o.cls == c], 50) for c in (FAST.name, SLOW.name)}


def t4(ctx: Context) -> None:
    res = ctx.results
    goals = [Goal("haproxy", "<=", 1.1), Goal("nginx-rr", "<=", 0.4)]
    m = {
        "fast_p50": res.metric("T4", "fast p50 ms", "lower"),
        "fast_p99": res.metric("T4", "fast p99 ms", "lower", goals),
        "slow_p50": res.metric("T4", "slow p50 ms", "lower"),
        "slow_p99": res.metric("T4", "slow p99 ms", "lower"),
        "errors": res.metric("T4", "errors", "lower", [Goal("abs", "<=", 0)]),
    }
    vs_ideal = {
        "fast_p50": res.metric("T4", "fast p50 / ideal"),
        "fast_p99": res.metric("T4", "fast p99 / ideal"),
    }
    duration = ctx.dur(60, 20)
    schedules: dict[int, list[loadgen.Arrival]] = {}
    ideal: dict[int, dict[str, dict[str, float]]] = {}
    pool = WorkerPool(worker_ports(4), ctx.tmp / "T4")

    def add(target: str, summary: dict[str, dict[str, float]], run: int) -> None:
        f, s = summary.get("fast", {}), summary.get("slow", {})
        nan = float("nan")
        m["fast_p50"].add(target, f.get("p50_ms", nan))
        m["fast_p99"].add(target, f.get("p99_ms", nan))
        m["slow_p50"].add(target, s.get("p50_ms", nan))
        m["slow_p99"].add(target, s.get("p99_ms", nan))
        m["errors"].add(target, f.get("errors", 0) + s.get("errors", 0))
        if target != "ideal":
            for key, metric in vs_ideal.items():
                cls, pct = key.split("_")
                got = summary.get(cls, {}).get(f"{pct}_ms", nan)
                metric.add(target, got / ideal[run][cls][f"{pct}_ms"])

    def per_run(run: int) -> None:
        schedules[run] = loadgen.poisson_schedule([FAST, SLOW], duration, SEED + run)
        ideal[run] = ggc.summarize(ggc.simulate(schedules[run], service, servers=len(pool.ports)))
        add("ideal", ideal[run], run)
        res.record("T4", "ideal", run, {"service_s": service, "summary": ideal[run]})

    def measure(proxy: RunningProxy, run: int) -> None:
        for _ in range(20):
            http_get(proxy.port, "/fast")
        outcomes = loadgen.run(HOST, proxy.port, schedules[run])
        summary = loadgen.summarize(outcomes)
        add(proxy.spec.name, summary, run)
        per_request = [[o.cls, round(o.scheduled, 4), round(o.sent_lag, 4), round(o.latency, 4), o.status]
                       for o in outcomes]  # fmt: skip
        res.record("T4", proxy.spec.name, run, {
            "summary": summary,
            "requests_fields": ["class", "scheduled_s", "sent_lag_s", "latency_s", "status"],
            "requests": per_request,
        })  # fmt: skip

    with pool:
        ctx.log("T4: measuring unloaded service times directly on a worker")
        service = service_times(pool.ports[0])
        ctx.log(f"T4: service times {service}")
        # issue 8: the same corral with cost-aware dispatch off, for the FIFO-vs-cost-aware rows
        fifo = replace(CORRAL, name="corral-fifo", corral_args=("--dispatch", "fifo"))
        specs = [CORRAL, fifo, HAPROXY, NGINX, NGINX_RR]
        each_proxy(ctx, "T4", specs, pool.ports, "/fast", measure, per_run=per_run)


# --- T5: scaling with the number of workers -----------------------------------------------------


def _t5_path() -> str:
    return f"/sleep?ms={T5_SLEEP_S * 1000:.0f}"


def _t5_measure(ctx: Context, n: int, rps: Metric, eff: Metric) -> Callable[[RunningProxy, int], None]:
    duration = ctx.dur(10, 4)

    def measure(proxy: RunningProxy, run: int) -> None:
        warm(ctx, proxy.port, _t5_path(), 2 * n)
        r = run_wrk(url(proxy.port, _t5_path()), 2 * n, duration)
        rps.add(proxy.spec.name, r.rps)
        eff.add(proxy.spec.name, r.rps / (n / T5_SLEEP_S))
        record_wrk(ctx, "T5", proxy.spec.name, run, r, workers=n)

    return measure


def _t5_direct(ctx: Context, n: int, rps: Metric, eff: Metric) -> Callable[[int], None]:
    """What the workers can do without any proxy: N x one worker loaded alone at c=2.

    The ideal N/0.05 ignores plumber's own per-request cost; this shows how much
    of the gap to the ideal is the app rather than the proxy.
    """
    duration = ctx.dur(10, 4)

    def direct(run: int) -> None:
        ctx.log(f"T5 N={n} run {run + 1}/{ctx.runs}: direct")
        headers = ["Connection: close"]  # keep-alive to httpuv stalls ~40 ms (delayed ACK)
        run_wrk(url(WORKER_PORT_BASE, _t5_path()), 2, ctx.warm_s, headers=headers)
        r = run_wrk(url(WORKER_PORT_BASE, _t5_path()), 2, duration, headers=headers)
        rps.add("direct", n * r.rps)
        eff.add("direct", r.rps * T5_SLEEP_S)
        rps.add("ideal", n / T5_SLEEP_S)
        record_wrk(ctx, "T5", "direct", run, r, workers=n)

    return direct


def t5(ctx: Context) -> None:
    res = ctx.results
    for n in T5_WORKERS:
        ideal = n / T5_SLEEP_S
        rps = res.metric("T5", f"N={n} req/s (/sleep 50ms, c={2 * n})", "higher")
        eff = res.metric("T5", f"N={n} req/s / ideal {ideal:.0f}", "higher", [Goal("abs", ">=", 0.95)])
        with WorkerPool(worker_ports(n), ctx.tmp / "T5" / f"n{n}") as pool:
            each_proxy(
                ctx, "T5", [CORRAL, NGINX, HAPROXY], pool.ports, "/fast",
                _t5_measure(ctx, n, rps, eff), per_run=_t5_direct(ctx, n, rps, eff),
            )  # fmt: skip


# --- T6: workers crashing under load ------------------------------------------------------------


def t6(ctx: Context) -> None:
    """SIGKILL a worker every 5 s under GET load. The peers balance the harness's workers, which the harness
    restarts; corral supervises 4 workers of its own (the same plumber app), the same kill schedule hitting
    them: a corral balancing workers it did not start cannot know how one died, so never sends a request again
    (issue 23, part 2), and would lose the request in flight on each killed worker."""
    res = ctx.results
    failed = res.metric("T6", "failed requests", "lower")
    kills_m = res.metric("T6", "workers SIGKILLed")
    per_kill = res.metric("T6", "failed per kill", "lower")
    total = res.metric("T6", "requests", "higher")
    duration = ctx.dur(60, 20)
    interval = 5.0
    path = "/sleep?ms=20"
    pool = WorkerPool(worker_ports(4), ctx.tmp / "T6")

    def measure(proxy: RunningProxy, run: int) -> None:
        pool.wait_ready()
        warm(ctx, proxy.port, path, 8)
        rng = random.Random(SEED + run)  # same kill sequence for every proxy in a run
        load = BackgroundWrk(url(proxy.port, path), 8, duration)
        kills: list[int] = []
        try:
            start = time.monotonic()
            while (nxt := start + interval * (len(kills) + 1)) < start + duration - 1:
                time.sleep(max(0.0, nxt - time.monotonic()))
                kills.append(_kill_own(proxy, rng) if proxy.spec.app else pool.kill_random(rng))
            r = load.result()
        finally:
            load.stop()
        name = proxy.spec.name
        failed.add(name, r.failed)
        kills_m.add(name, len(kills))
        per_kill.add(name, r.failed / max(len(kills), 1))
        total.add(name, r.requests)
        record_wrk(ctx, "T6", name, run, r, kills=len(kills))
        pool.wait_ready()  # every proxy starts with a full fleet

    with pool:
        pool.start_supervisor()
        own = replace(CORRAL, app=str(WORKER_APP), own_workers=len(pool.ports))
        each_proxy(ctx, "T6", [own, NGINX, HAPROXY], pool.ports, "/fast", measure)
        res.record("T6", "workers", 0, {"restarts": pool.restarts})


def _kill_own(proxy: RunningProxy, rng: random.Random) -> int:
    """SIGKILL one of the workers corral started (its children), chosen by rng as pool.kill_random chooses."""
    victims = sorted(psutil.Process(proxy.pid).children(), key=lambda p: p.pid)
    victim = rng.choice(victims)
    victim.send_signal(signal.SIGKILL)
    return victim.pid


# --- T7: corral's own footprint -----------------------------------------------------------------


class PeakRss:
    """Samples a proxy's process-tree RSS in the background; keeps the peak."""

    def __init__(self, proxy: RunningProxy, every_s: float = 0.2) -> None:
        self.proxy = proxy
        self.every_s = every_s
        self.peak = 0
        self.peak_root = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            u = self.proxy.usage()
            self.peak = max(self.peak, u.rss_bytes)
            self.peak_root = max(self.peak_root, u.root_rss_bytes)
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def t7(ctx: Context) -> None:
    res = ctx.results
    rss = res.metric("T7", "peak RSS MB (16 workers, c=32)", "lower", [Goal("abs", "<=", 60)])
    cpu = res.metric("T7", "proxy CPU µs/req (16 workers)", "lower", [Goal("nginx", "<=", 1.0)])
    duration = ctx.dur(10, 5)

    def measure(proxy: RunningProxy, run: int) -> None:
        warm(ctx, proxy.port, "/fast", 32)
        with PeakRss(proxy) as peak:
            before = proxy.usage()
            r = run_wrk(url(proxy.port, "/fast"), 32, duration)
            after = proxy.usage()
        name = proxy.spec.name
        # Whole process tree: nginx is master+workers; corral with --upstream has no children,
        # so for corral this is the corral process alone.
        rss.add(name, peak.peak / 2**20)
        cpu_us = cpu_us_per_request(before, after, r.requests)
        cpu.add(name, cpu_us)
        record_wrk(ctx, "T7", name, run, r, cpu_us_per_req=cpu_us,
                   peak_rss_mb=peak.peak / 2**20, peak_root_rss_mb=peak.peak_root / 2**20)  # fmt: skip

    with WorkerPool(worker_ports(16), ctx.tmp / "T7") as pool:
        each_proxy(ctx, "T7", [CORRAL, NGINX, HAPROXY], pool.ports, "/fast", measure)


# --- T8: one busy client next to a polite one (issue 23) -------------------------------------------

T8_BUSY = "/sleep?ms=100"  # the busy client: 64 of these in flight, closed loop
T8_POLITE = "/sleep?ms=10"  # the polite client: one every 200 ms, open loop, from another address
T8_UNLOADED_S = 10.0


def t8(ctx: Context) -> None:
    res = ctx.results
    m = {
        "unloaded_p50": res.metric("T8", "polite alone p50 ms", "lower"),
        "unloaded_p99": res.metric("T8", "polite alone p99 ms", "lower"),
        "polite_p50": res.metric("T8", "polite p50 ms (busy: 64 x 100 ms in flight)", "lower"),
        "polite_p99": res.metric("T8", "polite p99 ms", "lower"),
        "ratio": res.metric("T8", "polite p99 / its alone p50", "lower", [Goal("abs", "<=", 3.0)]),
        "busy_rps": res.metric("T8", "busy client req/s", "higher"),
        "errors": res.metric("T8", "errors (both clients)", "lower", [Goal("abs", "<=", 0)]),
    }
    duration = ctx.dur(60, 15)

    def measure(proxy: RunningProxy, run: int) -> None:
        for _ in range(20):
            http_get(proxy.port, T8_POLITE)
        alone = fairload.run(HOST, proxy.port, ctx.dur(T8_UNLOADED_S, 5), polite_path=T8_POLITE, concurrency=0)
        loaded = fairload.run(HOST, proxy.port, duration, busy_path=T8_BUSY, polite_path=T8_POLITE, concurrency=64)
        a, b = alone.summary(), loaded.summary()
        name = proxy.spec.name
        m["unloaded_p50"].add(name, a["polite_p50_ms"])
        m["unloaded_p99"].add(name, a["polite_p99_ms"])
        m["polite_p50"].add(name, b["polite_p50_ms"])
        m["polite_p99"].add(name, b["polite_p99_ms"])
        m["ratio"].add(name, b["polite_p99_ms"] / a["polite_p50_ms"])
        m["busy_rps"].add(name, b["busy_rps"])
        m["errors"].add(name, a["polite_errors"] + b["polite_errors"] + b["busy_errors"])
        res.record("T8", name, run, {
            "alone": a, "loaded": b,
            "polite_fields": ["due_s", "latency_s", "status"],
            "polite": [[round(x.due, 3), round(x.latency, 4), x.status] for x in loaded.polite],
        })  # fmt: skip

    with WorkerPool(worker_ports(4), ctx.tmp / "T8") as pool:
        none = replace(CORRAL, name="corral-none", corral_args=("--fair-key", "none"))
        r0 = replace(CORRAL, name="corral-r0", corral_args=("--reserve", "0"))
        each_proxy(ctx, "T8", [CORRAL, none, r0, HAPROXY, NGINX], pool.ports, "/fast", measure)


SCENARIOS: dict[str, Callable[[Context], None]] = {
    "T1": t1,
    "T2": t2,
    "T3": t3,
    "T4": t4,
    "T5": t5,
    "T6": t6,
    "T7": t7,
    "T8": t8,
}
