"""One app's workers behind the scheduler: where each request goes, and the slot it holds there.

Pool turns scheduler decisions into connections: it reuses a worker's idle upstream connection
(never holding more connections to a worker than its max_inflight, since many single-threaded
servers serve one connection at a time), opens one when there is none, and moves a request whose
worker could not be reached back to the head of the queue. The connection (upstream.py) then carries
the request and hands the response to its Exchange directly; the exchange gives the slot back here
(`release`) and is counted here once (`finished`).
"""

from __future__ import annotations

import asyncio
import errno
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..config import effective_workers, sticky_mode
from ..logs import say
from . import fairness, sticky
from .costs import SHORT, RouteCosts, route_key, route_pattern
from .outcomes import CUTS, OUTCOMES
from .quarantine import Quarantine, fingerprint
from .scheduler import QueueFull, Scheduler
from .upstream import UpstreamConnection
from .worker import DIED, KILLED, STOPPED, State, Worker

if TYPE_CHECKING:
    from ..config import AppConfig
    from .exchange import Exchange
    from .outcomes import Refusal

_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)
FD_WARN_EVERY = 10.0  # seconds between two "out of file descriptors" (or "disk full") lines
SIT_OUT = 0.2  # seconds a supervised worker that dropped a request is passed over
PROBE_GRACE = 0.02  # seconds a request may wait for a probe to finish before taking its worker
# How long a request whose worker connection broke waits to learn how the worker ended (the supervisor reaps it):
# the socket closes a moment before the process is reaped, or the worker closed it and lives on (then: 502).
EXIT_WAIT = 0.5
# Fresh connections a request may find closed by its worker before it goes out on them (Pool.resend, unsent).
UNSENT_TRIES = 3
LOST_KEPT = 16  # requests lost per worker remembered until its exit is known (a live worker that drops many)


class Pool:
    """Workers of one app, their central queue, and the connections to them."""

    def __init__(self, app: AppConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.name = app.name
        self.loop = loop
        self.cost_aware = app.dispatch == "cost"
        reserve = app.reserve if app.reserve is not None else (1 if effective_workers(app) >= 2 else 0)
        # Fair queueing (fair_key): None (one FIFO), "ip" or "header"; a header's name as the edge stores it.
        mode, _, name = app.fair_key.partition(":")
        self.fair: str | None = None if mode == "none" else mode
        self.fair_header = name.strip().lower().encode() if mode == "header" else None
        self._v6_keys: dict[bytes, bytes] = {}  # IPv6 address -> its /64 key (bounded in _client_key)
        self.scheduler = Scheduler(
            app.max_queue,
            app.queue_timeout,
            reserve=reserve,
            long_bias=app.long_bias,
            cost_aware=self.cost_aware,
            fair=self.fair is not None,
            max_per_key=app.max_queue_per_client,
        )
        self.costs = RouteCosts(app.long_threshold, app.long_routes, app.short_routes)
        self._route_keys: dict[tuple[bytes, bytes], str] = {}
        self.workers: list[Worker] = []  # every known worker, routable or not (status, admin)
        self.inflight: set[Exchange] = set()
        self.route = app.route
        self.strip_prefix = app.strip_prefix
        self.request_timeout = app.request_timeout
        self.on_hung: Callable[[Worker, str], None] = lambda w, why: None  # set by the supervisor
        self.on_observe: Callable[[Exchange | Refusal], None] = lambda ex: None  # metrics / access log
        self.on_unreachable: Callable[[Worker, str], None] = self._mark_unreachable
        self.on_probe_due: Callable[[Worker], None] = lambda w: None  # set by the health checker
        # Called when in-flight requests, queued ones or sessions drop; set only while corral stops (what the
        # stop waits for), so serving pays one None test per request for it.
        self.on_settle: Callable[[], None] | None = None
        # The worker indexes this app should have (the supervisor's desired slots): ip stickiness
        # maps clients onto slots, so a client whose worker restarts waits for the same slot.
        self.slot_indexes: Callable[[], Iterable[int]] = lambda: sorted({w.index for w in self.workers})
        # Every exchange ends as exactly one outcome (outcomes.OUTCOMES); these are their counts, and the
        # access log has one line for each.
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.cuts = dict.fromkeys(CUTS, 0)  # responses that did not reach their client whole, by why
        self.retried = 0  # sent again: the worker refused the connection, or had closed a kept-alive one
        self.redispatched = 0  # sent again, to another worker: theirs was killed from outside
        self.no_retry = [route_pattern(p) for p in app.no_retry_routes]
        self._no_retry_routes: dict[str, bool] = {}
        self.quarantine = Quarantine(app.quarantine_period)
        self.sticky = sticky_mode(app)
        self.tokens: dict[bytes, Worker] = {}  # sticky cookie token -> the worker process it names
        self.ws_idle_timeout = app.ws_idle_timeout
        self.sessions_opened = 0
        self.sessions_rejected = 0  # sessions answered 503 (queue full, or waited past queue_timeout)
        # Session ids the workers named in their sessions' first WebSocket message (Shiny's config message,
        # tunnel.py) -> the worker holding each, while the session is open: a request whose path names one
        # goes there (_pin). Bounded by the open tunnels: one name each, dropped when the tunnel closes.
        self.session_workers: dict[bytes, Worker] = {}
        self.names_sessions = False  # this app's paths name its sessions: page loads spread by sessions
        # Scale to zero (min_workers 0): on_demand tells the autoscaler that a request waits with no worker in
        # rotation (it decides; the pool starts nothing). After a start from zero failed, requests are answered
        # 503 with Retry-After at once until `unavailable_until`, the supervisor's next attempt.
        self.on_demand: Callable[[], None] | None = None
        self.unavailable_until = 0.0
        self.unavailable_why = ""
        self.start_refused = 0  # requests answered 503 because a start from zero had failed
        self._fd_warned = -FD_WARN_EVERY
        self._disk_warned = -FD_WARN_EVERY
        self._preempt_timer: asyncio.TimerHandle | None = None

    @property
    def served(self) -> int:
        return self.outcomes["served"]

    @property
    def failed(self) -> int:
        return self.outcomes["failed"]

    def finished(self, ex: Exchange | Refusal) -> None:
        """An exchange has ended, both halves: count it by outcome, then the observers (metrics, access log)."""
        self.outcomes[ex.outcome] += 1
        if ex.cut:
            self.cuts[ex.cut] += 1
        self.on_observe(ex)
        if self.on_settle is not None:  # a stop's drain waits for every exchange's end
            self.on_settle()

    def disk_full(self, what: str, exc: OSError) -> None:
        """Say it once per FD_WARN_EVERY: a full temporary directory would otherwise log on every read."""
        now = time.monotonic()
        if now - self._disk_warned > FD_WARN_EVERY:
            self._disk_warned = now
            say(
                f"corral: app {self.name}: cannot buffer {what} in a temporary file ({exc.strerror or exc}); "
                "responses are read from the worker only as fast as the client takes them, request bodies "
                "are refused with 503 (free space in $TMPDIR)"
            )

    # --- worker membership (supervisor, discovery and health call these) ---------------------
    def join(self, worker: Worker) -> None:
        """A new worker (starting, or an upstream to discover): known, not yet routable."""
        if worker not in self.workers:
            self.workers.append(worker)
        worker.max_sessions = self.app.max_sessions
        if self.sticky == "cookie":
            worker.sticky_token = sticky.new_token()
            self.tokens[worker.sticky_token] = worker

    def set_state(self, worker: Worker, state: State) -> None:
        worker.state = state
        if state is State.READY:
            worker.probe_due = False
            self.scheduler.add_worker(worker)
            self.pump()
        elif state is not State.DRAINING:
            self.close_idle(worker)

    def forget(self, worker: Worker) -> None:
        self.scheduler.remove_worker(worker)
        self.close_idle(worker)
        if worker in self.workers:
            self.workers.remove(worker)
        self.tokens.pop(worker.sticky_token, None)
        for sid in [sid for sid, w in self.session_workers.items() if w is worker]:
            del self.session_workers[sid]  # its tunnels have closed already; this is the backstop
        # Requests waiting for this worker process (cookie, session path), or for a slot scaled away (ip), go anywhere.
        slots = set(self.slot_indexes())
        self.scheduler.unpin(lambda pin: pin is worker or (isinstance(pin, int) and pin not in slots))
        self.pump()

    def close_idle(self, worker: Worker) -> None:
        for conn in list(worker.idle):
            conn.close()

    def routable(self) -> list[Worker]:
        return [w for w in self.workers if w.routable]

    # --- requests -------------------------------------------------------------------------
    def submit(self, ex: Exchange) -> None:
        """Dispatch now, queue, or raise QueueFull (the caller answers 503, or 429 for a client over its share), or
        Quarantined (502: this very request made workers exit)."""
        if self.quarantine.entries:
            head = ex.head
            self.quarantine.check(head.method, head.target, ex.body, ex.streamed(), time.monotonic())
        if self.sticky != "none":
            self._pin(ex)
        if self.fair is not None:
            ex.fair_key = self._client_key(ex)
        ex.route = self.route_of(ex.head.method, ex.head.target)
        if self.cost_aware:
            ex.cls, ex.cost = self.costs.classify(ex.route)
        if self.unavailable_until and not self.scheduler.workers:
            self._refuse_while_unavailable()
        worker = self.scheduler.submit(ex, time.monotonic())
        if worker is not None:
            self.connect(ex, worker)
        elif self.on_demand is not None and not self.scheduler.workers:
            self.on_demand()  # scaled to zero (or on the way): a worker is wanted
        elif self._preempt_timer is None and any(w.probing for w in self.scheduler.workers):
            self._preempt_timer = self.loop.call_later(PROBE_GRACE, self._preempt_probe)

    # --- starts from zero (the supervisor calls these) ----------------------------------------
    def hold_for_start(self, on: bool) -> None:
        """on: a worker is starting from zero, and what waits is held for it (its bound is startup_timeout, not
        queue_timeout); off: the start is over, and queue_timeout counts from now for what still waits."""
        sched = self.scheduler
        if on:
            sched.wait_from = math.inf
            self.unavailable_until = 0.0
        elif sched.wait_from == math.inf:
            sched.wait_from = time.monotonic()

    def start_failed(self, backoff: float, why: str) -> int:
        """A start from zero failed: every waiting request gets 503 now, Retry-After the time until the next
        attempt; so does every request that arrives before it. Returns how many were waiting."""
        now = time.monotonic()
        self.hold_for_start(False)
        self.unavailable_until = now + backoff
        self.unavailable_why = why
        waiting = self.scheduler.flush()
        retry = max(1, math.ceil(backoff))
        for ex in waiting:
            self.start_refused += 1
            ex.respond_error(503, why, retry_after=retry)  # type: ignore[attr-defined]
        if waiting and self.on_settle is not None:
            self.on_settle()
        return len(waiting)

    def _refuse_while_unavailable(self) -> None:
        left = self.unavailable_until - time.monotonic()
        if left <= 0:
            self.unavailable_until = 0.0
            return
        self.start_refused += 1
        raise QueueFull(max(1, math.ceil(left)), self.unavailable_why)

    def _pin(self, ex: Exchange) -> None:
        """Where a sticky request must go (ex.pin), in this order:

        1. its path names an open session (`session/<id>/...`): that session's worker, even a draining one;
        2. cookie mode, a page load in an app whose paths name sessions: the worker with the fewest open
           sessions among those with room, the cookie's own on a tie, so a browser's tabs spread (its
           other requests follow the cookie, re-issued with the page);
        3. cookie mode: the cookie's worker if live; if draining with sessions still open, for every
           request but a page load or a new session (those go to live workers);
        4. ip mode: the client address's slot.
        """
        head = ex.head
        if self.session_workers:
            sid = sticky.session_in_path(head.target)
            owner = self.session_workers.get(sid) if sid is not None else None
            if owner is not None and not head.websocket:
                ex.pin = owner
                if self.sticky == "cookie":
                    # The client's cookie stays as it is: this request belongs to one tab's session,
                    # the cookie to the browser's latest page (connect() re-issues only on a mismatch).
                    ex.sticky_token = owner.sticky_token
                return
        if self.sticky == "cookie":
            ex.sticky_token = sticky.cookie_token(head.header(b"cookie"))
            worker = self.tokens.get(ex.sticky_token) if ex.sticky_token else None
            page = not head.websocket and sticky.is_navigation(
                head.method, head.header(b"sec-fetch-mode"), head.header(b"accept")
            )
            if page and self.names_sessions:
                spread = self._fewest_sessions(worker)
                if spread is not None:
                    ex.pin = spread
                    return
            if worker is None:
                return
            if worker.state in (State.READY, State.STARTING):
                ex.pin = worker
            elif worker.state is State.DRAINING and worker.sessions > 0 and not head.websocket and not page:
                ex.pin = worker  # a request of a session it still holds, as far as a cookie can tell
            return
        client = ex.client.peer
        forwarded = ex.head.header(b"x-forwarded-for") if ex.client.trusted else None
        if forwarded:
            client = forwarded.split(b",", 1)[0].strip()  # the original client, as the trusted proxy saw it
        ex.pin = sticky.ip_slot(client, list(self.slot_indexes()))

    def _client_key(self, ex: Exchange) -> bytes:
        """Whose request this is, for fair queueing: the header's value (header:NAME), else the client's
        address; behind a trusted proxy, the client it forwarded for (fairness.origin)."""
        head = ex.head
        if self.fair_header is not None:
            value = head.header(self.fair_header)
            if value:
                return fairness.header_key(value)
        client = ex.client
        addr = client.peer
        if client.trusted:
            forwarded = head.header(b"x-forwarded-for")
            if forwarded:
                addr = client.origin(forwarded)
        if len(self._v6_keys) > 4096:
            self._v6_keys.clear()
        return fairness.ip_key(addr, self._v6_keys)

    def _fewest_sessions(self, home: Worker | None) -> Worker | None:
        """The ready worker with a free slot holding the fewest sessions (`home` first among equals); None when
        every slot is taken (the page then waits in the queue like any request). A health probe under way
        does not count: it is over in a moment, and a request never waits long for one (_preempt_probe)."""
        best: Worker | None = None
        best_key: tuple[int, bool, int, float] | None = None
        for w in self.scheduler.workers:
            if w.routable and w.inflight < w.max_inflight and not w.sitting_out:
                key = (w.sessions, w is not home, w.inflight, w.last_used)
                if best_key is None or key < best_key:
                    best, best_key = w, key
        return best

    def session_closed(self, worker: Worker) -> None:
        """A WebSocket tunnel to `worker` ended: its session place is free for a waiting one."""
        worker.sessions -= 1
        self.pump()
        if self.on_settle is not None:
            self.on_settle()

    def session_named(self, worker: Worker, sid: str) -> None:
        """A tunnel to `worker` learned its session's id: requests naming it go to `worker` until it closes.
        The first tunnel to claim an id keeps it (a worker that echoes what a client sends cannot move
        another client's session)."""
        key = sid.encode()
        if key not in self.session_workers:
            self.session_workers[key] = worker
            self.names_sessions = True

    def session_unnamed(self, worker: Worker, sid: str) -> None:
        key = sid.encode()
        if self.session_workers.get(key) is worker:
            del self.session_workers[key]

    def _preempt_probe(self) -> None:
        # A probe must never delay a real request for long: a healthy worker answers one in about a
        # millisecond (the queue is pumped when it does); past the grace, the request takes the worker
        # and is the probe. The most recent probe is the likeliest to be quick.
        self._preempt_timer = None
        probing = [w for w in self.scheduler.workers if w.probing and w.routable and w.inflight < w.max_inflight]
        if probing and self.scheduler.depth:
            max(probing, key=lambda w: w.probe_started).probing = False
            self.pump()

    def route_of(self, method: bytes, target: bytes) -> str:
        cache = self._route_keys
        key = cache.get((method, target))
        if key is None:
            if len(cache) > 4096:
                cache.clear()
            key = cache[(method, target)] = route_key(method, target)
        return key

    def sit_out(self, worker: Worker, seconds: float = SIT_OUT) -> None:
        worker.sitting_out = True

        def lift() -> None:
            worker.sitting_out = False
            self.pump()

        self.loop.call_later(seconds, lift)

    def pump(self) -> None:
        for ex, worker in self.scheduler.pump(time.monotonic()):
            self.connect(ex, worker)  # type: ignore[arg-type]

    def cancel(self, ex: Exchange) -> None:
        self.scheduler.cancel(ex)

    def queue_full(self) -> bool:
        """A request that finds no free worker now would be answered 503 (queue full)."""
        return self.scheduler.depth >= self.scheduler.max_queue
        if self.on_settle is not None:
            self.on_settle()

    def connect(self, ex: Exchange, worker: Worker) -> None:
        ex.worker = worker
        ex.dispatched_at = time.monotonic()
        self.inflight.add(ex)
        if self.sticky == "cookie" and ex.sticky_token != worker.sticky_token:
            ex.extra_headers.append(sticky.set_cookie(worker.sticky_token))  # (re-)issued: it names this worker
        idle = worker.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.send(ex, reused=True)
                return
        self.loop.create_task(self._open(ex, worker))

    def resend(self, ex: Exchange, worker: Worker, unsent: bool = False) -> None:
        """Once, on a fresh connection to the same worker: a request that did crash its worker then fails
        to connect (a dead worker's socket refuses), and never reaches a second worker. `unsent`: the worker
        had closed the connection before any byte of the request went out (UpstreamConnection.send): it is
        not the one retry, but a worker that closes every connection at once gets UNSENT_TRIES, then a 502."""
        if unsent:
            ex.unsent += 1
            if ex.unsent > UNSENT_TRIES:
                ex.upstream_failed("worker closed every connection before the request went out")
                return
        else:
            ex.retried = True
        ex.upstream = None
        self.retried += 1
        self.loop.create_task(self._open(ex, worker))

    async def _open(self, ex: Exchange, worker: Worker) -> None:
        try:
            if worker.socket is not None:
                _, conn = await self.loop.create_unix_connection(
                    lambda: UpstreamConnection(self, worker), worker.socket
                )
            else:
                _, conn = await self.loop.create_connection(
                    lambda: UpstreamConnection(self, worker), worker.host, worker.port
                )
        except OSError as exc:
            if ex.worker is worker:  # else the exchange already ended, and its slot went back then
                self._unreached(ex, worker, exc)
            return
        if ex.worker is not worker:
            # The exchange ended (timed out, client left) while we connected: keep the connection only
            # if the worker has a slot for it, or a one-connection server could wait on an idle one.
            conn.finish(worker.inflight + len(worker.idle) < worker.max_inflight)
            return
        conn.send(ex)

    def _unreached(self, ex: Exchange, worker: Worker, exc: OSError) -> None:
        if ex.retried:
            # The request did reach this worker once, on the connection it closed: it goes elsewhere only if the
            # worker turns out to have been killed from outside (it was dying, not idle-closing: upstream_lost).
            self.upstream_lost(ex, f"worker closed the connection, then refused a new one ({exc.strerror or exc})")
            return
        # Nothing reached the worker, so the request may go elsewhere: first in line, not last.
        self._free_slot(ex, worker, served=False)
        if exc.errno in _OUT_OF_FDS:
            # Our shortage, not the worker's fault: it stays in rotation and the client hears why.
            ex.respond_error(503, self.out_of_descriptors("requests answered 503"), retry_after=1)
            self.pump()
            return
        self.on_unreachable(worker, f"connect failed: {exc.strerror or exc}")
        if ex.ended:
            return
        self.retried += 1
        self._requeue_front(ex)

    def out_of_descriptors(self, what: str) -> str:
        """Say it once per FD_WARN_EVERY: at the limit, every request would otherwise log a line."""
        now = time.monotonic()
        if now - self._fd_warned > FD_WARN_EVERY:
            self._fd_warned = now
            say(f"corral: out of file descriptors: {what} (raise the open-file limit, or lower max_connections)")
        return "corral is out of file descriptors"

    # --- a worker lost under a request: another worker, or 502 (docs/operations.md, "Retry and quarantine") ---
    def upstream_lost(self, ex: Exchange, why: str) -> None:
        """The connection to ex's worker closed under its request, before the whole response came. A worker corral
        supervises may be dying: its request is remembered for the quarantine, and it goes to another worker if the
        worker turns out to have been killed from outside and the request is safe to send again. corral learns how
        the worker ended when the supervisor reaps it, usually a moment after the socket closed: the request waits
        for that (EXIT_WAIT at most; a worker that closed the connection and lives on did not die: 502)."""
        worker = ex.worker
        assert worker is not None
        if worker.proc is None:  # not started by corral (or a test's): how it ended is unknown, so no retry
            ex.upstream_failed(why)
            return
        # A closed body: its response had begun, nothing left to fingerprint. A streamed body was never ours
        # to hash: its fingerprint would be every upload to the route, one client's crashes refusing everyone's.
        if not ex.streamed() and (ex.body is None or not ex.body.closed):
            worker.lost.append((fingerprint(ex.head.method, ex.head.target, ex.body, ex.streamed()), ex.redispatched))
            if len(worker.lost) > LOST_KEPT:
                del worker.lost[0]
        if not (ex.redispatchable() and self.retry_on(ex.route)):
            ex.upstream_failed(why)
        elif worker.exit_cause is not None:
            self._settle_lost(ex, worker, why)
        else:
            self.sit_out(worker)  # not handed the next request while it may be dying
            ex.detach()
            worker.awaiting.append(ex)
            self.loop.call_later(EXIT_WAIT, self._exit_unseen, ex, worker, why)
        if worker.exit_cause is not None:
            self._count_deaths(worker)

    def retry_on(self, route: str) -> bool:
        """Whether requests of this route may be sent again (no_retry_routes), cached per route."""
        if not self.no_retry:
            return True
        cache = self._no_retry_routes
        on = cache.get(route)
        if on is None:
            if len(cache) > 4096:
                cache.clear()
            on = cache[route] = not any(p(route) for p in self.no_retry)
        return on

    def worker_exited(self, worker: Worker) -> None:
        """The supervisor reaped `worker` (worker.exit_cause is set): the requests lost with it are settled."""
        self._count_deaths(worker)
        awaiting, worker.awaiting = worker.awaiting, []
        for ex in awaiting:
            self._settle_lost(ex, worker, "worker closed the connection")

    def _exit_unseen(self, ex: Exchange, worker: Worker, why: str) -> None:
        if ex in worker.awaiting:  # no exit within EXIT_WAIT: the worker closed the connection, and lives
            worker.awaiting.remove(ex)
            worker.failed += 1
            ex.upstream_failed(why, blame=False)  # its slot was given back already

    def _settle_lost(self, ex: Exchange, worker: Worker, why: str) -> None:
        if ex.ended:
            return  # the client left while it waited: counted as abandoned already
        if worker.exit_cause == KILLED:
            self.redispatch(ex, worker)
            return
        if ex.worker is not None:
            ex.upstream_failed(why)
        else:
            worker.failed += 1
            ex.upstream_failed(why, blame=False)

    def redispatch(self, ex: Exchange, dead: Worker) -> None:
        """Once, to another worker, first in line: it has waited already (its queue_timeout clock runs on)."""
        if ex.worker is not None:
            ex.detach()
        ex.redispatched = True
        ex.retried = False  # the new worker's stale kept-alive connection may be retried once, as for any request
        self.redispatched += 1
        if ex.pin is dead:
            ex.pin = None  # its sticky worker is gone: any worker (the client's cookie is re-issued)
        ex.extra_headers = []  # the first worker's Set-Cookie, if any
        ex.status = 0
        ex.out_head = b""  # a head that came without a body byte never reached the client
        self._requeue_front(ex)

    def _requeue_front(self, ex: Exchange) -> None:
        """Back in line, first: to a free worker now, or it waits; with no worker left (an app that scales to
        zero lost its last one), the autoscaler hears of it at once, as for a new request."""
        worker = self.scheduler.requeue_front(ex, time.monotonic())
        if worker is not None:
            self.connect(ex, worker)
        elif self.on_demand is not None and not self.scheduler.workers:
            self.on_demand()

    def _count_deaths(self, worker: Worker) -> None:
        """A worker that held requests has ended: each of them may have killed it (DIED); one sent again after
        its first worker was killed from outside, and whose second worker ended too (not by corral), killed two."""
        cause, lost = worker.exit_cause, worker.lost
        worker.lost = []
        if cause == STOPPED:
            return
        now = time.monotonic()
        for fp, second in lost:
            if not second and cause != DIED:
                continue
            entry = self.quarantine.death(fp, now, 2 if second else 1)
            if entry is not None:
                say(
                    f"corral: app {self.name}: quarantined {entry.route}: this request made {entry.deaths} "
                    f"workers exit; it is answered 502 without reaching a worker for "
                    f"{self.quarantine.period:g}s (a reload lifts it)"
                )

    def lift_quarantine(self, why: str) -> None:
        n = self.quarantine.clear()
        if n:
            say(f"corral: app {self.name}: {why}: lifted the quarantine of {n} request(s)")

    def _mark_unreachable(self, worker: Worker, why: str) -> None:
        if worker.state is State.READY:
            worker.stop_reason = why
            self.set_state(worker, State.UNHEALTHY)

    def worker_failed(self, worker: Worker, why: str) -> None:
        """A worker dropped or garbled a request it had received."""
        worker.failed += 1
        # A worker that drops a request may be dying, its kernel still accepting for a moment: the
        # queue must not follow it there. An upstream stays out until a probe answers; a supervised
        # worker sits out a moment, long enough for its exit to be seen.
        if worker.external:
            self.on_unreachable(worker, why)
        else:
            self.sit_out(worker)

    def release(self, ex: Exchange) -> None:
        """Exchange._release_worker's other half (its connection already kept or closed): free the slot,
        feed the queue."""
        worker = ex.worker
        if worker is not None:
            self._free_slot(ex, worker, served=ex.response_complete)
            if worker.probe_due and worker.inflight == 0:
                self.on_probe_due(worker)  # a due probe goes before the next request
        self.pump()

    def _free_slot(self, ex: Exchange, worker: Worker, served: bool) -> None:
        ex.worker = None
        now = time.monotonic()
        self.inflight.discard(ex)
        if ex.session:
            if ex.switched:
                self.sessions_opened += 1  # the request slot goes back; the session place stays taken
            else:
                worker.sessions -= 1  # the upgrade never happened
        service = now - ex.dispatched_at
        self.scheduler.release(worker, now, service, ex.cls, ex.fair_key)
        if served:
            worker.served += 1
            self.costs.observe(ex.route, service)
        if self.on_settle is not None:
            self.on_settle()

    def expire(self, now: float) -> None:
        self._close_idle_upstreams(now - self.app.upstream_keepalive_timeout)
        if self.cost_aware:
            threshold = self.costs.long_threshold
            for ex in self.inflight:
                if ex.cls == SHORT and now - ex.dispatched_at >= threshold:
                    self.costs.running_long(ex.route, now - ex.dispatched_at)
        expired = self.scheduler.expire(now)
        for ex in expired:
            ex.queue_timed_out(self.scheduler.retry_after())  # type: ignore[attr-defined]
        if expired and self.on_settle is not None:
            self.on_settle()
        if self.fair is not None and self.scheduler.depth:
            # The reserve for other clients lapses with time, not with a release: a busy client's waiting
            # requests may take the worker it kept free once the others have gone quiet.
            self.pump()
        if self.request_timeout:
            limit = now - self.request_timeout
            # The worker's clock runs from when it has the whole request (a streamed upload's client time is
            # not the worker's) and stops while corral holds it back (a slow client's back-pressure).
            late = [
                e
                for e in self.inflight
                if e.request_done
                and max(e.dispatched_at, e.body_done_at) + e.held_back <= limit
                and e.worker is not None
                and not e.upstream_paused
            ]
            for ex in late:
                worker = ex.worker
                assert worker is not None
                # Out of rotation first, so the freed slot is not handed straight back to it.
                self.on_hung(worker, f"request exceeded request_timeout ({self.request_timeout:g}s)")
                ex.timed_out()

    def _close_idle_upstreams(self, before: float) -> None:
        for worker in self.workers:
            idle = worker.idle
            while idle and idle[0].idle_since <= before:  # the oldest first: finish() appends
                idle[0].close()
