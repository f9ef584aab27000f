"""One app's workers behind the scheduler, and the upstream half of the data path.

Pool turns scheduler decisions into connections: it reuses a worker's idle upstream connection
(never holding more connections to a worker than its max_inflight, since many single-threaded
servers serve one connection at a time), opens one when there is none, and moves a request whose
worker could not be reached back to the head of the queue. UpstreamConnection is the asyncio
Protocol on the worker socket; it feeds the response parser, whose callbacks land on the Exchange.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import socket
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .. import edge
from ..config import effective_workers, sticky_mode
from ..logs import say
from . import sticky
from .costs import SHORT, RouteCosts, route_key
from .exchange import CUTS, OUTCOMES, PAUSE_UPSTREAM
from .scheduler import Scheduler
from .worker import State, Worker

if TYPE_CHECKING:
    from ..config import AppConfig
    from .exchange import Exchange, Refusal
    from .tunnel import Tunnel

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
# setsockopt through libc on the raw fd: uvloop's socket proxy builds a socket object per call
# (~4 us), and QUICKACK is re-armed twice per request.
_setsockopt = ctypes.CDLL(None, use_errno=True).setsockopt
_ONE = ctypes.byref(ctypes.c_int(1))
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)
FD_WARN_EVERY = 10.0  # seconds between two "out of file descriptors" (or "disk full") lines
QUARANTINE = 0.2  # seconds a supervised worker that dropped a request is passed over
PROBE_GRACE = 0.02  # seconds a request may wait for a probe to finish before taking its worker


class Pool:
    """Workers of one app, their central queue, and the connections to them."""

    def __init__(self, app: AppConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.name = app.name
        self.loop = loop
        self.cost_aware = app.dispatch == "cost"
        reserve = app.reserve if app.reserve is not None else (1 if effective_workers(app) >= 2 else 0)
        self.scheduler = Scheduler(
            app.max_queue, app.queue_timeout, reserve=reserve, long_bias=app.long_bias, cost_aware=self.cost_aware
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
        # The worker indexes this app should have (the supervisor's desired slots): ip stickiness
        # maps clients onto slots, so a client whose worker restarts waits for the same slot.
        self.slot_indexes: Callable[[], Iterable[int]] = lambda: sorted({w.index for w in self.workers})
        # Every exchange ends as exactly one outcome (exchange.OUTCOMES); these are their counts, and the
        # access log has one line for each.
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.cuts = dict.fromkeys(CUTS, 0)  # responses that did not reach their client whole, by why
        self.retried = 0  # sent again: the worker refused the connection, or had closed a kept-alive one
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
        """Dispatch now, queue, or raise QueueFull (the caller answers 503)."""
        if self.sticky != "none":
            self._pin(ex)
        ex.route = self.route_of(ex.head.method, ex.head.target)
        if self.cost_aware:
            ex.cls, ex.cost = self.costs.classify(ex.route)
        worker = self.scheduler.submit(ex, time.monotonic())
        if worker is not None:
            self.connect(ex, worker)
        elif self._preempt_timer is None and any(w.probing for w in self.scheduler.workers):
            self._preempt_timer = self.loop.call_later(PROBE_GRACE, self._preempt_probe)

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

    def _fewest_sessions(self, home: Worker | None) -> Worker | None:
        """The ready worker with a free slot holding the fewest sessions (`home` first among equals); None when
        every slot is taken (the page then waits in the queue like any request). A health probe under way
        does not count: it is over in a moment, and a request never waits long for one (_preempt_probe)."""
        best: Worker | None = None
        best_key: tuple[int, bool, int, float] | None = None
        for w in self.scheduler.workers:
            if w.routable and w.inflight < w.max_inflight and not w.quarantined:
                key = (w.sessions, w is not home, w.inflight, w.last_used)
                if best_key is None or key < best_key:
                    best, best_key = w, key
        return best

    def session_closed(self, worker: Worker) -> None:
        """A WebSocket tunnel to `worker` ended: its session place is free for a waiting one."""
        worker.sessions -= 1
        self.pump()

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

    def quarantine(self, worker: Worker, seconds: float = QUARANTINE) -> None:
        worker.quarantined = True

        def lift() -> None:
            worker.quarantined = False
            self.pump()

        self.loop.call_later(seconds, lift)

    def pump(self) -> None:
        for ex, worker in self.scheduler.pump(time.monotonic()):
            self.connect(ex, worker)  # type: ignore[arg-type]

    def cancel(self, ex: Exchange) -> None:
        self.scheduler.cancel(ex)

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

    @staticmethod
    def closed_while_idle(worker: Worker) -> bool:
        """A kept-alive connection closed with no byte of answer: the worker closed it while idle (gunicorn,
        uvicorn, Node do), not because of this request, if the worker process still lives. nginx's rule
        for cached connections: not held against the worker."""
        if worker.state not in (State.READY, State.DRAINING):
            return False
        return worker.proc is None or worker.proc.poll() is None

    def resend(self, ex: Exchange, worker: Worker) -> None:
        """Once, on a fresh connection to the same worker: a request that did crash its worker then fails
        to connect (a dead worker's socket refuses), and never reaches a second worker."""
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
            # The request did reach this worker once, on the connection it closed: it must not go elsewhere.
            ex.upstream_failed(f"worker closed the connection, then refused a new one ({exc.strerror or exc})")
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
        worker2 = self.scheduler.requeue_front(ex, time.monotonic())
        if worker2 is not None:
            self.connect(ex, worker2)

    def out_of_descriptors(self, what: str) -> str:
        """Say it once per FD_WARN_EVERY: at the limit, every request would otherwise log a line."""
        now = time.monotonic()
        if now - self._fd_warned > FD_WARN_EVERY:
            self._fd_warned = now
            say(f"corral: out of file descriptors: {what} (raise the open-file limit, or lower max_connections)")
        return "corral is out of file descriptors"

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
            self.quarantine(worker)

    def release(self, ex: Exchange, conn: UpstreamConnection | None, reusable: bool) -> None:
        """Exchange._release_worker's other half: free the slot, settle the connection, feed the queue."""
        worker = ex.worker
        if conn is not None:
            conn.finish(reusable)
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
        self.scheduler.release(worker, now, service, ex.cls)
        if served:
            worker.served += 1
            self.costs.observe(ex.route, service)

    def expire(self, now: float) -> None:
        self._close_idle_upstreams(now - self.app.upstream_keepalive_timeout)
        if self.cost_aware:
            threshold = self.costs.long_threshold
            for ex in self.inflight:
                if ex.cls == SHORT and now - ex.dispatched_at >= threshold:
                    self.costs.running_long(ex.route, now - ex.dispatched_at)
        for ex in self.scheduler.expire(now):
            ex.queue_timed_out(self.scheduler.retry_after())  # type: ignore[attr-defined]
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


class UpstreamConnection(asyncio.Protocol):
    """One connection (TCP or Unix) to a worker. Carries one exchange at a time: no request is ever sent on it
    before the previous response has fully arrived and been checked for surplus bytes."""

    __slots__ = (
        "answered",
        "closed",
        "exchange",
        "fd",
        "idle_since",
        "pool",
        "reader",
        "reused",
        "transport",
        "tunnel",
        "worker",
        "write_paused",
    )

    def __init__(self, pool: Pool, worker: Worker) -> None:
        self.pool = pool
        self.worker = worker
        self.exchange: Exchange | None = None
        self.transport: asyncio.Transport | None = None
        self.reader = edge.ResponseReader(self)
        self.closed = False
        self.fd = -1
        self.tunnel: Tunnel | None = None
        self.reused = False  # the current request went out on a connection kept from an earlier one
        self.answered = False  # a byte of the current request's response has come back
        self.idle_since = 0.0
        self.write_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        # A Unix socket has no Nagle and no delayed ACK: neither option exists there, nor is needed.
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.fd = sock.fileno() if _QUICKACK is not None else -1
        self._quickack()

    def _quickack(self) -> None:
        # httpuv writes head and body in two segments without TCP_NODELAY: on a reused connection
        # the second waits for our delayed ACK (~40 ms). Setting QUICKACK sends the pending ACK now.
        if self.fd >= 0 and not self.closed:
            _setsockopt(self.fd, socket.IPPROTO_TCP, _QUICKACK, _ONE, 4)

    def send(self, ex: Exchange, reused: bool = False) -> None:
        self.exchange = ex
        self.reused = reused
        self.answered = False
        ex.upstream = self
        self.reader.start(ex.head.method, ex.head.websocket)
        assert self.transport is not None
        self.transport.write(ex.upstream_head())
        ex.flush_body(self)

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def write_blocked(self) -> bool:
        return self.write_paused or self.closed

    def pause_reading(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.resume_reading()

    def switch(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.exchange = None

    # The tunnel's session id (tunnel.WorkerEnd), for session-id routing: see Pool._pin.
    def session_named(self, sid: str) -> None:
        self.pool.session_named(self.worker, sid)

    def session_unnamed(self, sid: str) -> None:
        self.pool.session_unnamed(self.worker, sid)

    def session_cut(self, why: str) -> None:
        self.pool.cuts[why] = self.pool.cuts.get(why, 0) + 1  # a session cut counts as a response cut

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_worker(data)
            return
        ex = self.exchange
        self.answered = True
        try:
            self.reader.feed(data)
        except edge.UpstreamError as exc:
            self.close()
            if ex is None:
                self.on_surplus()  # bytes on an idle connection: never the answer to a future request
            elif self.exchange is ex:
                ex.upstream_failed(f"malformed response: {exc}")
            return
        if ex is not None and self.exchange is ex:
            # The response is not whole yet: its rest may be held back (Nagle) until this part is ACKed.
            # A response that came whole in one read needs no ACK in a hurry, so a worker that writes
            # its response at once costs no setsockopt at all; httpuv (head, then body) costs one.
            self._quickack()

    # Response parser callbacks, relayed to the exchange.
    def on_response(self, status: int, headers: list[tuple[bytes, bytes]], framing: int) -> None:
        assert self.exchange is not None
        self.exchange.on_response(status, headers, framing)

    def on_response_body(self, data: bytes) -> None:
        assert self.exchange is not None
        self.exchange.on_response_body(data)

    def on_response_end(self, reusable: bool) -> None:
        assert self.exchange is not None
        self.exchange.on_response_end(reusable)

    def on_upgrade(self, headers: list[tuple[bytes, bytes]], rest: bytes) -> None:
        assert self.exchange is not None
        self.exchange.on_upgrade(headers, rest)

    def on_surplus(self) -> None:
        say(f"corral: worker {self.worker.name}: {edge.SURPLUS}; its connection is closed, not reused")

    def eof_received(self) -> bool:
        if self.tunnel is not None:
            self.tunnel.worker_gone()
            return False
        if self.exchange is not None:
            self.reader.eof()  # a close-delimited body ends here; anything else is a truncation
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.worker_gone()
        if self in self.worker.idle:
            self.worker.idle.remove(self)
        ex, self.exchange = self.exchange, None
        if ex is None:
            return
        if not (self.reused and not self.answered and self.pool.closed_while_idle(self.worker)):
            ex.upstream_failed("worker closed the connection")
        elif ex.resendable() and not ex.ended:
            self.pool.resend(ex, self.worker)
        else:  # the client left, or its streamed body is gone: no second try, and not the worker's failure
            ex.upstream_failed("worker had closed the kept-alive connection", blame=False)

    def finish(self, reusable: bool) -> None:
        """The exchange is over: keep the connection for the next one, or close it."""
        self.exchange = None
        worker = self.worker
        if not reusable or self.closed or worker.state not in (State.READY, State.DRAINING):
            self.close()
            return
        self.resume_reading()
        self.idle_since = time.monotonic()
        if self not in worker.idle:
            worker.idle.append(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.tunnel is not None:
            self.tunnel.worker_full()
            return
        ex = self.exchange
        if ex is not None:
            ex.client.pause(PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.tunnel is not None:
            self.tunnel.worker_drained()
            return
        ex = self.exchange
        if ex is not None:
            ex.client.resume(PAUSE_UPSTREAM)
            ex.send_body()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            if self in self.worker.idle:
                self.worker.idle.remove(self)
            self.transport.close()
