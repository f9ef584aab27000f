"""One read of every pool and supervisor, shared by /status, /metrics, the dashboard series and autoscaling.

`take(corral, now)` copies what those four need into frozen dataclasses, so each reads the same
facts the same way (which workers count as ready, starting or busy) instead of walking pools and
supervisors itself. Pure: no I/O, no clock (`now` is the scheduler's monotonic clock); per-process
figures that need a system call (RSS, CPU) are added by the readers that show them.

It sits below admin, autoscale and server (pyproject's import layers), so what it reads of them is
named by the Protocols here, not imported. `ceiling(app)` lives here for the same reason: /scale
and the autoscaler both obey it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .. import config
from ..datapath.fairness import shown
from ..datapath.worker import State
from ..supervision.supervisor import COLD_START, IDLE, SCALING_TO_ZERO

if TYPE_CHECKING:
    from ..config import AppConfig
    from ..datapath.pool import Pool
    from ..datapath.worker import Worker
    from ..supervision.supervisor import Supervisor

ROUTES = 50  # busiest learned routes kept (the learner tracks up to 512)
CLIENTS = 5  # heaviest fair-queueing keys shown


class Bounds(Protocol):
    """An autoscaling policy (autoscale.Policy), as read here and by /scale."""

    @property
    def min_workers(self) -> int: ...
    @property
    def max_workers(self) -> int: ...
    @property
    def scale_up_wait(self) -> float: ...
    @property
    def idle_timeout(self) -> float: ...
    def clamp(self, n: int) -> int: ...


class Scaler(Protocol):
    """An app's autoscaler (autoscale.Autoscaler)."""

    @property
    def policy(self) -> Bounds: ...
    @property
    def last_reason(self) -> str | None: ...


class Fleet(Protocol):
    """A running corral (server.Corral): its pools and who runs them."""

    @property
    def pools(self) -> list[Pool]: ...
    @property
    def supervisors(self) -> Mapping[str, Supervisor]: ...
    @property
    def autoscalers(self) -> Mapping[str, Scaler]: ...


def ceiling(app: AppConfig) -> int:
    """The most workers this app may ever run: each one costs a process and file descriptors."""
    return config.worker_ceiling(app)


# How a worker stands in its app: in service for its index, the replacement starting for it (reload,
# recycle), or on its way out (draining, stopping). External workers are always "serving".
SERVING, SUCCESSOR, RETIRING = "serving", "successor", "retiring"


@dataclass(frozen=True, slots=True)
class WorkerSnap:
    index: int
    pid: int | None
    port: int
    state: State
    display: str  # state as shown: "busy" for a ready worker holding a request
    role: str
    inflight: int
    max_inflight: int
    served: int
    failed: int
    restarts: int  # unplanned restarts of this index
    generation: int
    age: float  # seconds since spawned (or discovered)
    external: bool
    note: str | None  # why it is out of rotation
    sessions: int = 0  # open WebSocket sessions (they do not hold the request slot: `inflight` is apart)
    socket: str | None = None  # its Unix socket (worker_transport unix), shown instead of the port


@dataclass(frozen=True, slots=True)
class QueueSnap:
    depth: int
    max: int
    rejected: int
    timed_out: int
    refused_early: int
    oldest_wait: float
    long_inflight: int


@dataclass(frozen=True, slots=True)
class ClientSnap:
    """One of the heaviest clients of fair queueing, as shown (fairness.shown: never a whole address)."""

    key: str
    share: float  # of the worker time of the last one to two minutes
    queued: int
    inflight: int


@dataclass(frozen=True, slots=True)
class FairSnap:
    key: str  # fair_key: ip, header:NAME
    max_per_client: int | None
    rejected: int  # 429: a client's share of the queue was full
    waiting_clients: int  # clients with requests waiting now
    clients: tuple[ClientSnap, ...]


@dataclass(frozen=True, slots=True)
class QuarantinedSnap:
    """One quarantined request (datapath/quarantine.py): refused with 502 until it lifts."""

    route: str  # method and path
    digest: str  # the start of its query-and-body hash: tells two requests of one path apart
    deaths: int  # workers it made exit
    for_s: float  # quarantined this long
    left_s: float  # lifts in this long


@dataclass(frozen=True, slots=True)
class QuarantineSnap:
    period: float  # quarantine_period
    refused: int  # requests answered 502 because they were quarantined
    total: int  # requests ever quarantined
    entries: tuple[QuarantinedSnap, ...]


@dataclass(frozen=True, slots=True)
class AutoscaleSnap:
    min_workers: int
    max_workers: int
    scale_up_wait: float
    idle_timeout: float
    last_reason: str | None


@dataclass(frozen=True, slots=True)
class ZeroSnap:
    """Scale to zero (min_workers 0): where the app stands, and its cold starts so far."""

    state: str | None  # supervisor.IDLE, SCALING_TO_ZERO, COLD_START, START_FAILED; None: running
    for_s: float  # how long it has been in that state (0 while running)
    cold_starts: int  # completed: a worker was ready
    failures: int  # failed attempts of cold starts
    last_cold_start: float | None  # seconds the last completed one took
    refused: int  # requests answered 503 because a start from zero had failed

    @property
    def idle(self) -> bool:
        """At zero, on the way there, or starting from it and not failed: ready for /readyz without a worker."""
        return self.state in (IDLE, SCALING_TO_ZERO, COLD_START)


@dataclass(frozen=True, slots=True)
class CrashLoopSnap:
    """An app whose workers exited crash_limit times within its window (supervisor._check_crash_loop)."""

    for_s: float  # how long it has been crash-looping
    exits: int  # unplanned exits within the window now
    limit: int  # K of crash_limit K/T
    window: float  # T
    worker: str  # the worker that exited last
    last_lines: tuple[str, ...]  # what it printed last


@dataclass(frozen=True, slots=True)
class AppSnap:
    name: str
    route: str
    supervised: bool
    desired: int
    ceiling: int | None  # most workers it may run; None for external upstreams
    generation: int
    reloading: bool
    reload_note: str | None
    dispatch: str
    max_inflight: int
    workers: tuple[WorkerSnap, ...]
    queue: QueueSnap
    served: int
    failed: int
    retried: int
    inflight: int  # requests on workers now
    refused: int = 0  # answered by corral itself: edge 4xx, queue 503 (a client over its share: 429), no app 404
    abandoned: int = 0  # the client left before it had the whole response
    cut: dict[str, int] = field(default_factory=dict)  # responses that did not reach the client whole, by why
    restarts: dict[str, int] = field(default_factory=dict)  # restarts by reason (failures; recycling by count)
    routes: tuple[dict[str, Any], ...] = ()
    autoscale: AutoscaleSnap | None = None
    crash_loop: CrashLoopSnap | None = None
    sticky: str = "none"  # config.sticky_mode: cookie, ip or none
    max_sessions: int = 0  # WebSocket sessions one worker may hold
    sessions_opened: int = 0  # WebSocket sessions ever opened (tunnels after a worker's 101)
    sessions_rejected: int = 0  # new sessions answered 503 at the queue's limits
    fair: FairSnap | None = None  # fair queueing (None: fair_key none, or a snapshot taken with routes=0)
    zero: ZeroSnap | None = None  # scale to zero (None: min_workers is not 0)
    unproven: bool = False  # no worker ready yet, or its last start from zero failed (autoscale keeps one)
    redispatched: int = 0  # requests sent again, to another worker, after theirs was killed from outside
    quarantine: QuarantineSnap | None = None  # None: a snapshot taken with routes=0

    @property
    def sessions(self) -> int:
        """WebSocket sessions open now, on every worker (a retiring one keeps its own until they close)."""
        return sum(w.sessions for w in self.workers)

    @property
    def ready(self) -> int:
        """Workers in service and in rotation (a reload's successors not yet swapped in do not count)."""
        return sum(1 for w in self.workers if w.role == SERVING and w.state is State.READY)

    @property
    def busy(self) -> int:
        # A worker holding WebSocket sessions is in use too: scaling down must not drain it for idleness.
        return sum(
            1 for w in self.workers if w.role == SERVING and w.state is State.READY and (w.inflight or w.sessions)
        )

    @property
    def starting(self) -> int:
        """Capacity asked for that has not arrived yet: new slots and successors not ready yet."""
        return sum(1 for w in self.workers if w.role != RETIRING and w.state is State.STARTING)

    @property
    def restarts_total(self) -> int:
        return sum(self.restarts.values())

    def states(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in self.workers:
            out[w.display] = out.get(w.display, 0) + 1
        return out


@dataclass(frozen=True, slots=True)
class Snapshot:
    now: float
    apps: tuple[AppSnap, ...]


def take(corral: Fleet, now: float, routes: int = ROUTES) -> Snapshot:
    apps = tuple(
        take_app(pool, corral.supervisors.get(pool.name), corral.autoscalers.get(pool.name), now, routes)
        for pool in corral.pools
    )
    return Snapshot(now, apps)


def take_app(pool: Pool, sup: Supervisor | None, scaler: Scaler | None, now: float, routes: int = ROUTES) -> AppSnap:
    """One app. `routes=0` skips the learned-route table and fair queueing's heaviest clients (sorting them is
    the costly part; autoscaling, sampling ten times a second, does not need them)."""
    sched = pool.scheduler
    return AppSnap(
        name=pool.name,
        route=pool.route,
        supervised=sup is not None,
        desired=sup.desired if sup else len(pool.workers),
        ceiling=ceiling(sup.app) if sup else None,
        generation=sup.generation if sup else 0,
        reloading=_reloading(sup),
        reload_note=sup.reload_note if sup else None,
        dispatch="cost" if pool.cost_aware else "fifo",
        max_inflight=pool.app.max_inflight,
        workers=_workers(pool, sup, now),
        queue=QueueSnap(
            depth=sched.depth,
            max=sched.max_queue,
            rejected=sched.rejected,
            timed_out=sched.timed_out,
            refused_early=sched.refused_early,
            oldest_wait=sched.oldest_wait(now),
            long_inflight=sched.long_inflight,
        ),
        served=pool.served,
        failed=pool.failed,
        retried=pool.retried,
        refused=pool.outcomes["refused"],
        abandoned=pool.outcomes["abandoned"],
        cut=dict(pool.cuts),
        inflight=len(pool.inflight),
        restarts=dict(sup.restarts) if sup else {},
        routes=tuple(pool.costs.table()[:routes]) if routes else (),
        autoscale=_autoscale(scaler),
        crash_loop=_crash_loop(sup, now),
        sticky=config.sticky_mode(pool.app),
        max_sessions=pool.app.max_sessions,
        sessions_opened=pool.sessions_opened,
        sessions_rejected=pool.sessions_rejected,
        fair=_fair(pool, now) if routes else None,
        zero=_zero(pool, sup, now),
        unproven=sup is not None and sup.unproven,
        redispatched=pool.redispatched,
        quarantine=_quarantine(pool, now) if routes else None,
    )


def _zero(pool: Pool, sup: Supervisor | None, now: float) -> ZeroSnap | None:
    if sup is None or sup.floor != 0:
        return None
    state = sup.zero_state
    since = {IDLE: sup.idle_since, SCALING_TO_ZERO: sup.zero_since, None: None}.get(
        state, sup.cold.began if sup.cold is not None else None
    )
    return ZeroSnap(
        state=state,
        for_s=now - since if since is not None else 0.0,
        cold_starts=sup.cold_starts,
        failures=sup.cold_start_failures,
        last_cold_start=sup.last_cold_start,
        refused=pool.start_refused,
    )


def _quarantine(pool: Pool, now: float) -> QuarantineSnap:
    q = pool.quarantine
    return QuarantineSnap(q.period, q.refused, q.total, tuple(QuarantinedSnap(*row) for row in q.shown(now)))


def _fair(pool: Pool, now: float, n: int = CLIENTS) -> FairSnap | None:
    sched = pool.scheduler
    if not sched.fair:  # fair_key none
        return None
    rows = sched.heaviest(n, now)
    clients = tuple(ClientSnap(shown(k), share, queued, inflight) for k, share, queued, inflight in rows)
    return FairSnap(pool.app.fair_key, sched.max_per_key, sched.rejected_key, len(sched.key_queued), clients)


def _crash_loop(sup: Supervisor | None, now: float) -> CrashLoopSnap | None:
    since = getattr(sup, "crash_looping_since", None)
    if sup is None or since is None:
        return None
    k, t = sup.crash_limit
    return CrashLoopSnap(now - since, len(sup.exits), k, t, sup.crash_worker_name(), tuple(sup.crash_lines()))


def _reloading(sup: Supervisor | None) -> bool:
    if sup is None:
        return False
    return bool(sup.successors) or any(w.generation < sup.generation for w in sup.slots.values())


def _workers(pool: Pool, sup: Supervisor | None, now: float) -> tuple[WorkerSnap, ...]:
    restarts = sup.index_restarts if sup else {}
    ordered = sorted(pool.workers, key=lambda w: (w.index, w.generation))
    return tuple(_worker(w, _role(w, sup), restarts.get(w.index, 0), now) for w in ordered)


def _role(w: Worker, sup: Supervisor | None) -> str:
    if sup is None or sup.slots.get(w.index) is w:
        return SERVING
    if sup.successors.get(w.index) is w:
        return SUCCESSOR
    return RETIRING


def _worker(w: Worker, role: str, restarts: int, now: float) -> WorkerSnap:
    return WorkerSnap(
        index=w.index,
        pid=w.pid,
        port=w.port,
        state=w.state,
        display=w.display_state(),
        role=role,
        inflight=w.inflight,
        max_inflight=w.max_inflight,
        served=w.served,
        failed=w.failed,
        restarts=restarts,
        generation=w.generation,
        age=now - w.born,
        external=w.external,
        note=w.stop_reason if w.state not in (State.READY, State.STARTING) else None,
        sessions=w.sessions,
        socket=w.socket,
    )


def _autoscale(scaler: Scaler | None) -> AutoscaleSnap | None:
    if scaler is None:
        return None
    p = scaler.policy
    return AutoscaleSnap(p.min_workers, p.max_workers, p.scale_up_wait, p.idle_timeout, scaler.last_reason)
