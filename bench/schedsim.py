"""Replay T4's arrival schedules through the REAL corral scheduler in simulated time (issue 8).

The proxy, sockets and plumber are replaced by an event loop with deterministic service times; the
queueing decisions are corral.datapath.scheduler.Scheduler's own (and corral.datapath.costs.RouteCosts learns the
route classes, warmed up with the 20 /fast requests the bench sends first). Policies that are not
in the scheduler yet are small subclasses here that only override how a long request may borrow the
reserve, so a variant that wins can move into scheduler.py unchanged.

    python bench/schedsim.py                   # all policies, 10 seeds, table + bench/out/schedsim-*.json
    python bench/schedsim.py --runs 3 --jitter # service times jittered from a seeded RNG
    python bench/schedsim.py --bound           # + clairvoyant lower bound (MILP, needs scipy)
    python bench/schedsim.py --plot docs/scheduling.png   # + latency CDFs and the trade-off frontier

Scenarios: `t4` (the bench's: /fast 20/s + /sleep?ms=2000 1/s, 4 workers, 60 s, seeds SEED+run),
`long` (only /sleep at 1.8/s: needs 3.6 of the 4 workers), `sparse` (the same plus a 0.2/s short
probe, the case where a reserve kept for rare short requests costs long ones real capacity).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import loadgen
from scenarios import FAST, SEED, SLOW
from stats import percentile

from corral.datapath.costs import LONG, MIN_SAMPLES, SHORT, RouteCosts
from corral.datapath.scheduler import QUEUED, QueueFull, Scheduler
from corral.datapath.worker import State, Worker

WORKERS = 4
FAST_S = 0.0027  # /fast on an idle plumber worker (bench service_times)
SLOW_S = 2.003  # /sleep?ms=2000: the sleep plus plumber's own ~3 ms
TICK_S = 0.1  # the proxy's ticker: queue timeouts (and, for timed rules, a pump)
FAST_TARGET_MS = 50.0
SLOW_TARGET = 1.25  # x FIFO's slow p99 on the same schedule
ROUTES = {"fast": "GET /fast", "slow": "GET /sleep", "probe": "GET /health"}
OUT = Path(__file__).resolve().parent / "out"


# --- policies -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    name: str
    cost_aware: bool = True
    reserve: int = 1
    long_bias: float = 5.0
    lend_within: float | None = None  # a long may borrow the reserve if a worker frees within this (s)
    patience: float | None = None  # ... or once it has waited this long (s)
    short_rate: float | None = None  # keep the reserve only while shorts arrive at >= this rate (/s)
    fifo_slack: float | None = None  # ... or once its wait makes it `slack` x slower than FIFO would
    tail_slack: float | None = None  # ... or once it waited `slack` x FIFO's recent long p99 - its cost
    note: str = ""


class VariantScheduler(Scheduler):
    """Scheduler plus the candidate borrowing rules; with none set it IS the scheduler."""

    RATE_WINDOW = 5.0

    def __init__(self, policy: Policy, max_queue: int, queue_timeout: float) -> None:
        super().__init__(
            max_queue, queue_timeout, reserve=policy.reserve, long_bias=policy.long_bias, cost_aware=policy.cost_aware
        )
        self.policy = policy
        self.short_times: deque[float] = deque()
        self.shadow: list[float] = []  # a virtual FIFO fed the same requests: when each slot frees
        self.shadow_long: deque[float] = deque(maxlen=64)  # its latencies of recent long requests

    def submit(self, job, now):  # type: ignore[no-untyped-def]
        if job.cls == SHORT and self.policy.short_rate is not None:
            self.short_times.append(now)
        if self.policy.fifo_slack is not None or self.policy.tail_slack is not None:
            job.deadline = self._shadow_deadline(job, now)
        return super().submit(job, now)

    def _shadow_deadline(self, job, now: float) -> float:  # type: ignore[no-untyped-def]
        cap = self.capacity()
        while len(self.shadow) < cap:
            heapq.heappush(self.shadow, now)
        start = max(now, heapq.heappop(self.shadow))
        heapq.heappush(self.shadow, start + job.cost)
        fifo_latency = start - now + job.cost
        if job.cls != LONG:
            return math.inf
        self.shadow_long.append(fifo_latency)
        p = self.policy
        if p.fifo_slack is not None:
            return now + p.fifo_slack * fifo_latency - job.cost
        return now + p.tail_slack * percentile(list(self.shadow_long), 99) - job.cost  # type: ignore[operator]

    def long_limit(self, now: float) -> int:
        rate = self.policy.short_rate
        if rate is not None and self.cost_aware:
            while self.short_times and self.short_times[0] < now - self.RATE_WINDOW:
                self.short_times.popleft()
            if len(self.short_times) < rate * self.RATE_WINDOW:
                return self.capacity()
        return super().long_limit(now)

    def _place(self, job, now):  # type: ignore[no-untyped-def]
        if job.cls == LONG and self.long_inflight >= self.long_limit(now) and not self._may_borrow(job, now):
            return None
        return self.pick()

    def _may_borrow(self, job, now: float) -> bool:  # type: ignore[no-untyped-def]
        p = self.policy
        if p.patience is not None and now - job.queued_at >= p.patience - 1e-9:
            return True
        if now >= getattr(job, "deadline", math.inf) - 1e-9:
            return True
        return p.lend_within is not None and self._next_free(now) <= p.lend_within + 1e-9

    def _next_free(self, now: float) -> float:
        busy = [w.busy_until - now for w in self.workers if w.routable and w.inflight]
        return max(0.0, min(busy)) if busy else 0.0

    def next_wake(self, now: float) -> float | None:
        """When a queued long request's borrowing condition may become true (None: never)."""
        p = self.policy
        long_q = self.queues[LONG]
        self._trim(long_q)
        if not long_q or self.pick() is None:
            return None  # nothing to wait for, or no free worker (its release pumps anyway)
        times = [getattr(long_q[0], "deadline", math.inf)]
        if p.patience is not None:
            times.append(long_q[0].queued_at + p.patience)
        if p.lend_within is not None:
            times.append(now + self._next_free(now) - p.lend_within)
        wake = min(times)
        return wake if wake > now + 1e-9 else None


def policies() -> list[Policy]:
    lend = 0.045  # under the fast budget: 50 ms target - 2.7 ms service, with a little margin
    return [
        Policy("fifo", cost_aware=False, reserve=0, note="dispatch = fifo (HAProxy maxconn 1)"),
        Policy("cost r0", reserve=0, note="classes + ageing, no reserve"),
        Policy("cost r1", note="current default: reserve 1, lent after 5 s without shorts"),
        Policy("r1 lend<=45ms", lend_within=lend, note="+ lent when a worker frees within 45 ms"),
        Policy("r1 rate>=1/s", short_rate=1.0, note="reserve only while shorts arrive at >= 1/s"),
        *[
            Policy(f"r1 patience {w:g}s", lend_within=lend, patience=w, note=f"+ lent to a long waiting {w:g} s")
            for w in (0.5, 1.0, 1.5)
        ],
        *[
            Policy(
                f"r1 fifo-slack {x:g}", lend_within=lend, fifo_slack=x, note=f"+ lent before {x:g}x its FIFO latency"
            )
            for x in (1.25, 1.5)
        ],
        Policy("r1 tail-slack 1.25", lend_within=lend, tail_slack=1.25, note="+ lent at 1.25x FIFO's recent p99"),
    ]


# --- the route-cost learner ----------------------------------------------------------------------
class EvidenceCosts(RouteCosts):
    """RouteCosts that also learns from requests still running (proposal for the cold-start gap).

    A route is unknown (short, cost 0) until MIN_SAMPLES requests have COMPLETED, so a burst of slow
    requests on a fresh route all go out as short ones. One request of the route that has already
    run past long_threshold is proof enough that the route is long, at least for now.
    """

    def __init__(self, long_threshold: float) -> None:
        super().__init__(long_threshold)
        self.provisional: dict[str, float] = {}

    def running(self, key: str, elapsed: float) -> None:
        st = self.stats(key)
        if not st.pinned and st.count < MIN_SAMPLES and elapsed >= self.long_threshold:
            st.cls = LONG
            self.provisional[key] = max(self.provisional.get(key, 0.0), elapsed)

    def classify(self, key: str) -> tuple[int, float]:
        cls, cost = super().classify(key)
        if cost == 0.0 and key in self.provisional:
            return cls, self.provisional[key]
        return cls, cost


def learner(mode: str, rng_free_service: Callable[[str], float]) -> RouteCosts:
    """warm: both routes already learned (steady state); cold: as the bench (only /fast warmed);
    evidence: cold, with EvidenceCosts."""
    costs = EvidenceCosts(0.5) if mode == "evidence" else RouteCosts(0.5)
    for _ in range(20):  # the bench sends 20 /fast before measuring
        costs.observe(ROUTES["fast"], rng_free_service("fast"))
    if mode == "warm":
        for _ in range(MIN_SAMPLES):
            costs.observe(ROUTES["slow"], rng_free_service("slow"))
    return costs


# --- one simulated run --------------------------------------------------------------------------
@dataclass(eq=False)
class SimJob:
    kind: str  # "fast", "slow", "probe"
    arrival: float
    service: float
    queued_at: float = 0.0
    sched_state: int = 0
    cls: int = SHORT
    cost: float = 0.0
    end: float = math.nan
    error: str = ""
    started: float = math.nan
    deadline: float = math.inf  # when it may take the reserve regardless (fifo_slack / tail_slack)
    session: bool = False
    pin: object = None

    @property
    def latency(self) -> float:
        return self.end - self.arrival


@dataclass
class RunResult:
    latencies: dict[str, list[float]] = field(default_factory=dict)  # seconds, per kind
    errors: int = 0
    lost_worker_s: float = 0.0  # idle worker-seconds while a long request waited
    all_busy_s: float = 0.0  # seconds with every worker busy
    duration: float = 0.0

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {"errors": self.errors}
        for kind, lat in self.latencies.items():
            ms = [x * 1e3 for x in lat]
            out[f"{kind}_p50"] = percentile(ms, 50)
            out[f"{kind}_p99"] = percentile(ms, 99)
            out[f"{kind}_max"] = max(ms) if ms else math.nan
            out[f"{kind}_late"] = sum(x > FAST_TARGET_MS for x in ms)
        out["lost_pct"] = 100.0 * self.lost_worker_s / (WORKERS * self.duration)
        out["all_busy_pct"] = 100.0 * self.all_busy_s / self.duration
        return out


def service_time(kind: str, rng: random.Random | None) -> float:
    base = SLOW_S if kind == "slow" else FAST_S
    if rng is None:
        return base
    if kind == "slow":
        return base + abs(rng.gauss(0.0, 0.005))  # a sleep is precise; the R side adds a little
    return base * rng.lognormvariate(0.0, 0.3)  # R request handling varies more, relatively


def simulate(
    policy: Policy,
    arrivals: Sequence[loadgen.Arrival],
    duration: float,
    jitter_seed: int | None = None,
    exact_wakes: bool = True,
    learn: str = "warm",
) -> RunResult:
    """Replay `arrivals` through the scheduler; every request runs to completion (no deadline)."""
    rng = random.Random(jitter_seed) if jitter_seed is not None else None
    sched = VariantScheduler(policy, max_queue=1000, queue_timeout=30.0)
    for i in range(WORKERS):
        w = Worker("sim", i, "127.0.0.1", 19100 + i, 1)
        w.state = State.READY
        sched.add_worker(w)
    costs = learner(learn, lambda kind: service_time(kind, None))
    seq = itertools.count()
    events: list[tuple[float, int, str, object]] = []
    jobs = [SimJob(a.cls, a.at, service_time(a.cls, rng)) for a in arrivals]
    for job in jobs:
        heapq.heappush(events, (job.arrival, next(seq), "arrive", job))
    tick = TICK_S
    while tick < duration + 120:
        heapq.heappush(events, (tick, next(seq), "tick", None))
        tick += TICK_S
    res = RunResult(duration=duration)
    running: dict[int, SimJob] = {}
    pending_wake = math.inf
    now = 0.0

    def start(job: SimJob, worker: Worker) -> None:
        running[id(job)] = job
        job.started = now
        heapq.heappush(events, (now + job.service, next(seq), "done", (job, worker)))

    def pump() -> None:
        for job, worker in sched.pump(now):
            start(job, worker)  # type: ignore[arg-type]

    while events:
        t, _, kind, obj = heapq.heappop(events)
        if kind == "tick" and not running and not sched.depth and t > duration:
            break
        _account(sched, res, t - now)
        now = t
        if kind == "arrive":
            job = obj
            assert isinstance(job, SimJob)
            if policy.cost_aware:
                job.cls, job.cost = costs.classify(ROUTES[job.kind])
            try:
                worker = sched.submit(job, now)
            except QueueFull:
                job.error, job.end = "refused", now
                res.errors += 1
            else:
                if worker is not None:
                    start(job, worker)
        elif kind == "done":
            job, worker = obj  # type: ignore[misc]
            del running[id(job)]
            job.end = now
            sched.release(worker, now, job.service, job.cls)
            costs.observe(ROUTES[job.kind], job.service)
            pump()
        elif kind == "tick":
            for job in sched.expire(now):
                job.error, job.end = "expired", now  # type: ignore[attr-defined]
                res.errors += 1
            if isinstance(costs, EvidenceCosts):
                for job in running.values():
                    costs.running(ROUTES[job.kind], now - job.started)
            pump()  # timed rules (patience) need a pump without a release; harmless otherwise
        elif kind == "wake":
            pending_wake = math.inf
            pump()
        wake = sched.next_wake(now) if exact_wakes else None
        if wake is not None and wake < pending_wake:
            pending_wake = wake
            heapq.heappush(events, (wake, next(seq), "wake", None))
    for job in jobs:
        if not job.error:
            res.latencies.setdefault(job.kind, []).append(job.latency)
    return res


def _account(sched: Scheduler, res: RunResult, dt: float) -> None:
    if dt <= 0:
        return
    idle = sum(1 for w in sched.workers if w.inflight == 0)
    waiting = sum(1 for j in sched.queues[LONG] if j.sched_state == QUEUED)
    res.lost_worker_s += dt * min(idle, waiting)
    if idle == 0:
        res.all_busy_s += dt


# --- scenarios ----------------------------------------------------------------------------------
def schedule(scenario: str, run: int, duration: float) -> list[loadgen.Arrival]:
    seed = SEED + run
    if scenario == "t4":
        return loadgen.poisson_schedule([FAST, SLOW], duration, seed)
    heavy = loadgen.TrafficClass("slow", SLOW.path, 1.8)
    if scenario == "long":
        return loadgen.poisson_schedule([heavy], duration, seed)
    if scenario == "sparse":
        return loadgen.poisson_schedule([heavy, loadgen.TrafficClass("probe", "/health", 0.2)], duration, seed)
    raise ValueError(scenario)


@dataclass
class Opts:
    runs: int = 10
    duration: float = 60.0
    jitter: bool = False
    exact_wakes: bool = True
    learn: str = "warm"

    def jitter_seed(self, run: int) -> int | None:
        return SEED + 1000 + run if self.jitter else None


def run_policy(policy: Policy, scenario: str, run: int, o: Opts, learn: str | None = None) -> RunResult:
    sched = schedule(scenario, run, o.duration)
    return simulate(policy, sched, o.duration, o.jitter_seed(run), o.exact_wakes, learn or o.learn)


FIFO = Policy("fifo", cost_aware=False, reserve=0)


@dataclass
class Row:
    policy: Policy
    t4: list[dict[str, float]] = field(default_factory=list)
    long: list[dict[str, float]] = field(default_factory=list)
    sparse: list[dict[str, float]] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)  # slow p99 / FIFO slow p99, per seed
    met: list[bool] = field(default_factory=list)

    def bench_style(self, fifo_row: Row) -> bool:
        """What bench/report.py would say on runs 0-2: medians, ratio of medians."""
        f99 = _med([s["fast_p99"] for s in self.t4[:3]])
        ratio = _med([s["slow_p99"] for s in self.t4[:3]]) / _med([s["slow_p99"] for s in fifo_row.t4[:3]])
        return f99 <= FAST_TARGET_MS and ratio <= SLOW_TARGET and sum(s["errors"] for s in self.t4[:3]) == 0


def meets(s: dict[str, float], fifo: dict[str, float]) -> bool:
    return s["fast_p99"] <= FAST_TARGET_MS and s["slow_p99"] <= SLOW_TARGET * fifo["slow_p99"] and s["errors"] == 0


def evaluate(pols: Sequence[Policy], o: Opts) -> tuple[list[Row], dict[str, dict[str, list[float]]]]:
    rows = [Row(p) for p in pols]
    pooled: dict[str, dict[str, list[float]]] = {}  # policy -> kind -> T4 latencies (s), all seeds
    for run in range(o.runs):
        fifo = run_policy(FIFO, "t4", run, o).summary()
        fifo_long = run_policy(FIFO, "long", run, o).summary()
        for row in rows:
            r = run_policy(row.policy, "t4", run, o)
            s = r.summary()
            row.t4.append(s)
            row.ratio.append(s["slow_p99"] / fifo["slow_p99"])
            row.met.append(meets(s, fifo))
            for kind in ("fast", "slow"):
                pooled.setdefault(row.policy.name, {}).setdefault(kind, []).extend(
                    round(x, 5) for x in r.latencies.get(kind, [])
                )
            lo = run_policy(row.policy, "long", run, o).summary()
            lo["slow_p99_vs_fifo"] = lo["slow_p99"] / fifo_long["slow_p99"]
            row.long.append(lo)
            sp = run_policy(row.policy, "sparse", run, o).summary()
            sp["slow_p99_vs_fifo"] = sp["slow_p99"] / fifo_long["slow_p99"]
            row.sparse.append(sp)
    return rows, pooled


def _med(xs: Sequence[float]) -> float:
    return percentile(list(xs), 50)


def table(rows: Sequence[Row], runs: int) -> str:
    head = (
        f"{'policy':<19} {'fast p50':>8} {'fast p99 (worst)':>16} {'late':>4} {'slow p99 (worst)':>16} "
        f"{'slow/fifo (worst)':>17} {'err':>3} {'met':>5} {'bench3':>6} "
        f"{'long-only lost':>14} {'p99/fifo':>8} {'sparse lost':>11} {'p99/fifo':>8}"
    )
    lines = [head, "-" * len(head)]
    fifo_row = next(r for r in rows if r.policy.name == "fifo")
    for row in rows:
        f99 = [s["fast_p99"] for s in row.t4]
        s99 = [s["slow_p99"] for s in row.t4]
        lines.append(
            f"{row.policy.name:<19} {_med([s['fast_p50'] for s in row.t4]):8.1f} "
            f"{_med(f99):7.1f} ({max(f99):6.0f}) {_med([s['fast_late'] for s in row.t4]):4.0f} "
            f"{_med(s99):6.0f} ({max(s99):7.0f}) {_med(row.ratio):7.2f}x ({max(row.ratio):5.2f}x) "
            f"{sum(s['errors'] for s in row.t4):3.0f} {sum(row.met):>2}/{runs:<2} "
            f"{'PASS' if row.bench_style(fifo_row) else 'fail':>6} "
            f"{_med([s['lost_pct'] for s in row.long]):13.2f}% {_med([s['slow_p99_vs_fifo'] for s in row.long]):7.2f}x "
            f"{_med([s['lost_pct'] for s in row.sparse]):10.2f}% "
            f"{_med([s['slow_p99_vs_fifo'] for s in row.sparse]):7.2f}x"
        )
    lines.append(
        f"T4 over {runs} seeds (60 s each unless --duration): medians, worst seed in brackets, ms. late = fast "
        f"requests over {FAST_TARGET_MS:g} ms per run. met = seeds with fast p99 <= {FAST_TARGET_MS:g} ms AND slow "
        f"p99 <= {SLOW_TARGET}x FIFO's on the same schedule AND no errors. bench3 = the bench's verdict on runs 0-2 "
        "(medians). lost = idle worker-time while a long request waited, % of 4 workers; long-only: /sleep 1.8/s; "
        "sparse: the same + 0.2/s short; p99/fifo = their slow p99 vs FIFO on long-only."
    )
    return "\n".join(lines)


def sweep(o: Opts) -> dict[str, list[dict[str, float]]]:
    """The trade-off frontier: the later a long request may take the reserve, the better for short ones."""
    lend = 0.045
    families: dict[str, list[tuple[float, Policy]]] = {
        "patience W (s)": [
            (w, Policy(f"W={w}", lend_within=lend, patience=None if math.isinf(w) else w))
            for w in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, math.inf)
        ],
        "fifo-slack x": [
            (x, Policy(f"x={x}", lend_within=lend, fifo_slack=x)) for x in (1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5)
        ],
    }
    fifo = [run_policy(FIFO, "t4", run, o).summary() for run in range(o.runs)]
    out: dict[str, list[dict[str, float]]] = {}
    for fam, members in families.items():
        for value, pol in members:
            sums = [run_policy(pol, "t4", run, o).summary() for run in range(o.runs)]
            ratio = [s["slow_p99"] / f["slow_p99"] for s, f in zip(sums, fifo, strict=True)]
            f99 = [s["fast_p99"] for s in sums]
            out.setdefault(fam, []).append({
                "value": -1 if math.isinf(value) else value,
                "fast_p99_med": _med(f99), "fast_p99_max": max(f99),
                "fast_late_med": _med([s["fast_late"] for s in sums]),
                "ratio_med": _med(ratio), "ratio_max": max(ratio),
                "met": sum(meets(s, f) for s, f in zip(sums, fifo, strict=True)),
            })  # fmt: skip
    return out


def cold_start(o: Opts) -> dict[str, list[dict[str, float]]]:
    """The default policy with the learner as the bench leaves it (only /fast warmed), and with the fix."""
    cost_r1 = Policy("cost r1")
    out: dict[str, list[dict[str, float]]] = {}
    for learn in ("cold", "evidence", "warm"):
        for run in range(o.runs):
            s = run_policy(cost_r1, "t4", run, o, learn).summary()
            out.setdefault(learn, []).append({k: s[k] for k in ("fast_p99", "fast_late", "slow_p99")})
    return out


def bounds(o: Opts) -> list[dict[str, object]]:
    from schedbound import lower_bound

    out = []
    cases = [(run, o.duration) for run in range(o.runs)] + [(0, 20.0)]  # + the measured quick run
    for run, duration in cases:
        sched = schedule("t4", run, duration)
        row: dict[str, object] = {"seed": SEED + run, "duration": duration}
        for label, kw in (
            ("clairvoyant_p99", {"clairvoyant": True, "exceptions": True}),
            ("clairvoyant_all", {"clairvoyant": True, "exceptions": False}),
            ("online_all", {"clairvoyant": False, "exceptions": False}),
        ):
            row[label] = lower_bound(sched, SLOW_S, FAST_S, WORKERS, SLOW_TARGET, FAST_TARGET_MS, **kw)
        out.append(row)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="seeds SEED+0 .. SEED+runs-1 (default 10)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals (default 60, as T4)")
    ap.add_argument("--jitter", action="store_true", help="jitter service times from a seeded RNG")
    ap.add_argument("--tick-only", action="store_true", help="timed rules act on the 0.1 s ticker only")
    ap.add_argument("--learn", choices=("warm", "cold", "evidence"), default="warm",
                    help="route learner at start: warm (steady state), cold (as the bench), evidence")  # fmt: skip
    ap.add_argument("--bound", action="store_true", help="also compute the lower bounds (MILP, scipy)")
    ap.add_argument("--plot", type=Path, help="write latency CDFs + frontier to this PNG (matplotlib)")
    args = ap.parse_args(argv)
    o = Opts(args.runs, args.duration, args.jitter, not args.tick_only, args.learn)
    t0 = time.monotonic()
    rows, pooled = evaluate(policies(), o)
    print(table(rows, o.runs))
    front = sweep(o)
    print("\nfrontier: when a queued long request may take the reserve (all with lend<=45ms); medians over seeds")
    for fam, pts in front.items():
        for pt in pts:
            value = "never" if pt["value"] < 0 else f"{pt['value']:g}"
            print(
                f"  {fam:<15} {value:>6}: fast p99 {pt['fast_p99_med']:7.1f} ms (worst {pt['fast_p99_max']:7.1f}), "
                f"late {pt['fast_late_med']:4.0f}; slow/fifo {pt['ratio_med']:.2f}x (worst {pt['ratio_max']:.2f}x); "
                f"met {pt['met']}/{o.runs}"
            )
    cold = cold_start(o)
    print("\ncold start (cost r1): fast p99 ms per seed; learner cold as in the bench, + in-flight evidence, warm")
    for learn, per_seed in cold.items():
        print(f"  {learn:<9}" + " ".join(f"{s['fast_p99']:7.1f}" for s in per_seed))
    found = bounds(o) if args.bound else []
    if found:
        print("\nlower bounds: fewest fast requests over 50 ms for ANY non-pre-emptive policy keeping slow p99 within")
        print(f"{SLOW_TARGET}x FIFO's (clairvoyant: exact count; online: expected count), vs what p99 <= 50 ms allows")
        for b in found:
            cells = []
            for label in ("clairvoyant_p99", "clairvoyant_all", "online_all"):
                r = b[label]
                verdict = "INFEASIBLE" if r["min_late_fast"] > r["allowed_late"] else "open"  # type: ignore[index,operator]
                cells.append(f"{label} >= {r['min_late_fast']} ({verdict})")  # type: ignore[index]
            first = b["clairvoyant_p99"]
            print(
                f"  seed {b['seed']} {b['duration']:g} s: FIFO slow p99 {first['fifo_slow_p99_ms']:.0f} ms -> max wait "  # type: ignore[index]
                f"{first['max_wait_s']:.2f} s, allowed late {first['allowed_late']}; " + "; ".join(cells)  # type: ignore[index]
            )
    OUT.mkdir(exist_ok=True)
    out = OUT / f"schedsim-{time.strftime('%Y%m%d-%H%M%S')}.json"
    doc = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "service_s": {"fast": FAST_S, "slow": SLOW_S},
        "workers": WORKERS,
        "seeds": [SEED + r for r in range(o.runs)],
        "policies": [
            {**asdict(r.policy), "t4": r.t4, "slow_vs_fifo": r.ratio, "met": r.met, "long": r.long, "sparse": r.sparse}
            for r in rows
        ],
        "frontier": front,
        "cold_start": cold,
        "bounds": found,
        "t4_latencies_s": pooled,
    }
    out.write_text(json.dumps(doc))
    print(f"\nraw: {out}  ({time.monotonic() - t0:.0f} s)")
    if args.plot:
        plot(pooled, front, rows, found, args.plot)
        print(f"plot: {args.plot}")


def plot(
    pooled: dict[str, dict[str, list[float]]],
    front: dict[str, list[dict[str, float]]],
    rows: Sequence[Row],
    found: Sequence[dict[str, object]],
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["fifo", "cost r0", "cost r1", "r1 lend<=45ms", "r1 patience 1s", "r1 fifo-slack 1.25"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (ax_fast, ax_slow), (ax_front, ax_bound) = axes
    for name in shown:
        for ax, kind in ((ax_fast, "fast"), (ax_slow, "slow")):
            xs = sorted(x * 1e3 for x in pooled[name][kind])
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=name, lw=1.4, ls="--" if name == "fifo" else "-")
    ax_fast.set_xscale("log")
    ax_fast.axvline(FAST_TARGET_MS, color="grey", lw=0.8, ls=":")
    ax_fast.set(
        title="T4 /fast latency (2.7 ms service), all seeds", xlabel="ms (log)", ylabel="CDF", ylim=(0.9, 1.002)
    )
    ax_slow.set(title="T4 /sleep?ms=2000 latency, all seeds", xlabel="ms", ylabel="CDF", ylim=(0.5, 1.005))
    for ax in (ax_fast, ax_slow):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for fam, pts in front.items():
        ax_front.plot([p["ratio_med"] for p in pts], [p["fast_p99_med"] for p in pts], "o-", ms=4, label=fam)
        for k, p in enumerate(pts):
            if k and (p["ratio_med"], p["fast_p99_med"]) == (pts[k - 1]["ratio_med"], pts[k - 1]["fast_p99_med"]):
                continue  # same point as the previous value: one label is enough
            label = ("never" if p["value"] < 0 else f"{p['value']:g}") + f" ({p['met']:g})"
            ax_front.annotate(label, (p["ratio_med"], p["fast_p99_med"]), fontsize=7, xytext=(3, 3),
                              textcoords="offset points")  # fmt: skip
    for row in rows:
        if row.policy.name in ("fifo", "cost r0", "cost r1"):
            ax_front.plot(_med(row.ratio), _med([s["fast_p99"] for s in row.t4]), "s", label=row.policy.name)
    ax_front.add_patch(plt.Rectangle((0.9, 1), SLOW_TARGET - 0.9, FAST_TARGET_MS - 1, color="green", alpha=0.12,
                                     label="both targets"))  # fmt: skip
    ax_front.set(yscale="log", xlabel="slow p99 / FIFO slow p99 (median over seeds)", ylabel="fast p99 ms (median)",
                 title="trade-off (T4, 60 s): label = W or x (seeds meeting both)")  # fmt: skip
    ax_front.grid(alpha=0.3)
    ax_front.legend(fontsize=7, loc="upper right")
    if found:
        labels = [f"{b['seed'] - SEED}" + ("" if b["duration"] == 60 else f"\n{b['duration']:g}s") for b in found]
        xs = range(len(found))
        allowed = [b["clairvoyant_p99"]["allowed_late"] for b in found]  # type: ignore[index]
        for k, (label, key) in enumerate((
            ("clairvoyant, p99 rule (1 long may wait W/f)", "clairvoyant_p99"),
            ("clairvoyant, every long within W", "clairvoyant_all"),
            ("online (expected), every long within W", "online_all"),
        )):  # fmt: skip
            ax_bound.bar([x + (k - 1) * 0.27 for x in xs], [b[key]["min_late_fast"] for b in found], 0.27,  # type: ignore[index]
                         label=label)  # fmt: skip
        ax_bound.step([x - 0.5 for x in xs] + [len(found) - 0.5], [*allowed, allowed[-1]], where="post", color="k",
                      lw=1, label="most late /fast p99 <= 50 ms allows")  # fmt: skip
        ax_bound.set_xticks(list(xs), labels, fontsize=8)
        ax_bound.set(xlabel="seed (SEED+k)", ylabel="fewest /fast over 50 ms, any policy",
                     title="lower bound with slow p99 <= 1.25x FIFO (MILP)")  # fmt: skip
        ax_bound.legend(fontsize=7)
        ax_bound.grid(alpha=0.3, axis="y")
    else:
        ax_bound.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
