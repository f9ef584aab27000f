"""One worker: where it listens, what state it is in, what it is carrying.

The scheduler reads `routable`/`inflight`, the proxy keeps its idle upstream connections here, the
supervisor owns `proc`, health owns the probe counters, admin reads it all. Nothing here does I/O.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import subprocess


# Why a supervised worker's process ended (the supervisor sets `Worker.exit_cause` when it reaps it,
# supervision.processes.exit_cause): what the retry rule and the query-of-death quarantine read.
KILLED = "killed from outside"  # SIGKILL or SIGTERM corral did not send: an operator, the OOM killer, a drain
DIED = "died on its own"  # an exit status, or any other signal (SIGSEGV, SIGABRT, SIGBUS, ...)
STOPPED = "stopped by corral"  # after a signal corral sent: stop, reload, scale down, a deadline, a failed probe


class State(StrEnum):
    STARTING = "starting"  # spawned, not yet answering its readiness probe
    READY = "ready"  # in rotation (shown as "busy" while it holds a request)
    DRAINING = "draining"  # out of rotation, finishing what it holds, then stopped
    UNHEALTHY = "unhealthy"  # out of rotation: failed probes or refused connections
    STOPPING = "stopping"  # SIGTERM sent
    STOPPED = "stopped"  # process gone (or external worker unreachable)


class Worker:
    __slots__ = (
        "app",
        "awaiting",
        "born",
        "busy_until",
        "draining_since",
        "exit_cause",
        "external",
        "failed",
        "generation",
        "host",
        "idle",
        "index",
        "inflight",
        "last_probe",
        "last_used",
        "logs",
        "lost",
        "max_inflight",
        "max_requests",
        "max_sessions",
        "pipes_open",
        "port",
        "probe_due",
        "probe_fails",
        "probe_started",
        "probing",
        "proc",
        "ready_at",
        "retire_reason",
        "sent_signal",
        "served",
        "sessions",
        "sitting_out",
        "socket",
        "state",
        "sticky_token",
        "stop_reason",
        "tail",
    )

    def __init__(
        self,
        app: str,
        index: int,
        host: str,
        port: int,
        max_inflight: int,
        generation: int = 0,
        external: bool = False,
    ) -> None:
        self.app = app
        self.index = index
        self.host = host
        self.port = port
        self.socket: str | None = None  # its Unix socket (worker_transport unix): connected to instead of the port
        self.max_inflight = max_inflight
        self.generation = generation
        self.external = external
        self.state = State.STARTING
        self.inflight = 0
        self.sessions = 0  # open WebSocket tunnels (and upgrades under way) on this worker
        self.max_sessions = 1 << 30  # the pool sets the app's max_sessions when the worker joins
        self.sticky_token = b""  # names this process in the sticky cookie (pool.join)
        self.served = 0
        self.failed = 0
        self.max_requests: int | None = None
        self.last_used = 0.0
        self.busy_until = 0.0  # predicted time its current requests end (scheduler's estimate)
        self.born = time.monotonic()
        self.ready_at: float | None = None
        self.draining_since: float | None = None
        self.probe_fails = 0
        self.probing = False
        self.last_probe = time.monotonic()  # a new worker has just passed its readiness probe
        self.probe_due = False  # a health probe waits for this busy worker to free up
        self.sitting_out = False  # briefly passed over after it dropped a request (pool.sit_out)
        self.probe_started = 0.0
        self.retire_reason: str | None = None  # set when the supervisor wants it replaced
        self.stop_reason: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.idle: list[Any] = []  # pooled upstream connections with no request on them
        self.tail: list[str] = []  # last output lines, shown when the app cannot start
        self.pipes_open = 0  # its stdout/stderr not yet at EOF: its last lines may still be on the way
        self.logs: Any = None  # per-worker log file (--log-dir)
        self.sent_signal = 0  # the last signal corral sent it (supervisor): its exit is then corral's doing
        self.exit_cause: str | None = None  # KILLED, DIED or STOPPED, once its process has been reaped
        # Requests whose connection broke under them while it may be dying: their fingerprint, and whether the
        # request had been sent again already (pool.upstream_lost; counted once its exit_cause is known).
        self.lost: list[tuple[Any, bool]] = []
        self.awaiting: list[Any] = []  # exchanges waiting for exit_cause to decide: another worker, or 502

    @property
    def routable(self) -> bool:
        return self.state is State.READY

    @property
    def has_room(self) -> bool:
        # A worker under probe is passed over while another has room (pool._preempt_probe otherwise).
        return (
            self.state is State.READY
            and self.inflight < self.max_inflight
            and not self.probing
            and not self.probe_due
            and not self.sitting_out
        )

    @property
    def has_room_pinned(self) -> bool:
        """has_room for a request pinned to this very process (its sticky cookie, or its session named in the
        path): a draining worker still takes those, since the sessions it holds live nowhere else. The pool
        pins to a draining worker only while it holds sessions; nothing else reaches it."""
        return (
            (self.state is State.READY or self.state is State.DRAINING)
            and self.inflight < self.max_inflight
            and not self.probing
            and not self.probe_due
            and not self.sitting_out
        )

    @property
    def holding(self) -> bool:
        """Still owes a response or holds a session. A worker is stopped only when this is False
        (or when graceful_timeout has passed)."""
        return self.inflight > 0 or self.sessions > 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def name(self) -> str:
        return f"{self.app}:{self.index}"

    @property
    def address(self) -> str:
        return f"unix:{self.socket}" if self.socket is not None else f"{self.host}:{self.port}"

    def display_state(self) -> str:
        if self.state is State.READY and self.inflight:
            return "busy"
        return self.state.value

    def __repr__(self) -> str:
        return f"<Worker {self.name} {self.address} {self.display_state()} inflight={self.inflight}>"
