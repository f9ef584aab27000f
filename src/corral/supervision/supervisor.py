"""Worker processes of one app: a reconcile loop in the manner of gunicorn's arbiter.

`reconcile()` is the one place that decides: it compares the desired fleet (count, generation,
recycle marks) with the actual workers and starts, swaps, drains or stops processes to close the
gap. Everything else (exits, readiness, health verdicts, hung requests, reload and scale requests)
only records facts and wakes the loop.

Scale to zero (min_workers 0): the autoscaler sets desired to 0 and reconcile drains the last worker like
any surplus one; the app is then idle. A start from zero (desired back above 0) is a cold start: the pool
holds its waiting requests for it (bounded by startup_timeout, not queue_timeout), one line logs how long it
took and how many requests waited, and a start that fails answers them 503 + Retry-After (the backoff) at
once rather than letting them hang.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import (
    AppConfig,
    Config,
    connect_host,
    effective_workers,
    parse_crash_limit,
    scales_to_zero,
    worker_ports,
)
from ..datapath.worker import State, Worker
from ..logs import event, say, warn
from ..net import PORT_MAX
from ..portable import paths
from . import deathpipe, exits, health, launch, sockdir
from .changes import Changes
from .output import WorkerOutput, error_lines
from .processes import describe_error, describe_exit, exit_cause, port_free, prepare_child, tree_rss

if TYPE_CHECKING:
    from ..datapath.pool import Pool

BACKOFF_START, BACKOFF_MAX, BACKOFF_RESET = 0.1, 15.0, 30.0
CRASH_LINES = 10  # last output lines kept with a crash loop
# reconcile runs on every wake, and at least this often: some of what it acts on is time (startup_timeout,
# backoff, graceful_timeout, max_memory) or a draining worker's in-flight count, which the data path changes.
TICK = 0.1
# How long a report (cannot start, crash loop) waits for the last output of a worker that has exited: its
# exit and the end of its pipes are separate events, and a child it left behind may hold the pipes open.
OUTPUT_GRACE = 2.0
MEMORY_EVERY = 2.0
COLD_POLL = 0.05  # seconds between readiness probes of a worker starting from zero (requests wait for it)
# What the app's status says about zero (status, metrics, the dashboard, /readyz).
IDLE, SCALING_TO_ZERO = "idle (scaled to zero)", "scaling to zero"
COLD_START, START_FAILED = "cold start", "start failed"


@dataclass
class ColdStart:
    """A start from zero, from its first spawn until a worker is ready (or the app is scaled to zero again)."""

    began: float
    failures: int = 0  # failed attempts so far: the app is not "idle" then, and /readyz says not ready


class Supervisor:
    def __init__(
        self,
        app: AppConfig,
        cfg: Config,
        pool: Pool,
        loop: asyncio.AbstractEventLoop,
        changes: Changes | None = None,
    ) -> None:
        self.app = app
        self.pool = pool
        self.loop = loop
        self.clock: Callable[[], float] = time.monotonic  # every supervisor decision reads this clock
        self.desired = effective_workers(app)
        self.base_port = worker_ports(cfg, app)[0]
        self.generation = 0
        self.slots: dict[int, Worker] = {}  # the worker in service (or starting) for each index
        self.successors: dict[int, Worker] = {}  # a replacement starting for an index
        self.retiring: list[Worker] = []  # drained, stopping
        self.failures: dict[int, int] = {}  # consecutive failed starts per index (backoff)
        self._backoff_until: dict[int, float] = {}
        self.last_tail: list[str] = []
        self.restarts: dict[str, int] = {}  # reason -> count, for metrics
        self.index_restarts: dict[int, int] = {}  # worker index -> unplanned restarts, for status
        self.surge = 1
        self.fixed_ports = False  # --supervise-only: workers keep their ports across reloads
        self.unix = launch.transport(app) == "unix"  # each worker on a socket in sockdir, not a port
        self.ever_ready = False
        self.fatal: str | None = None
        self.reload_note: str | None = None
        self.stopping = False
        self._wake = asyncio.Event()
        # Told of every fact wake() records, and of fatal: corral waits on it (all ready, cannot start), as
        # shutdown does (all stopped). Corral passes one notifier to all its supervisors.
        self.changes = changes if changes is not None else Changes()
        self._last_memory = 0.0
        self._errors_seen: set[tuple[str, str, int]] = set()
        self.log_dir = cfg.server.log_dir
        self.crash_limit = parse_crash_limit(app.crash_limit)  # (K exits, within T seconds)
        self.exits: collections.deque[float] = collections.deque()  # unplanned exits within the last T seconds
        self.crash_worker: Worker | None = None  # the last one that exited: its tail is the crash loop's lines
        self.crash_seen = 0.0  # when it exited
        self.crash_looping_since: float | None = None
        self._killed: dict[Worker, float] = {}  # SIGKILLed as failed by reconcile -> the backoff it began
        # Scale to zero (min_workers 0). zero_since: desired has been 0 since then (a spawn then is a cold
        # start); idle_since: and no worker has been left since then.
        self.floor = 0 if scales_to_zero(app) else 1
        self.zero_since: float | None = None
        self.idle_since: float | None = None
        self.cold: ColdStart | None = None
        self.cold_starts = 0  # completed: a worker was ready
        self.cold_start_failures = 0  # failed attempts of cold starts (each answered its waiting requests 503)
        self.last_cold_start: float | None = None  # seconds the last completed cold start took
        pool.on_hung = self.kill_hung
        pool.slot_indexes = lambda: range(self.desired)

    # --- public requests: record the wish, let reconcile act ------------------------------------
    def reload(self) -> str:
        self.generation += 1
        self.pool.lift_quarantine("reload")  # the new code may not crash on what the old one did
        self.reload_note = None
        self.wake()
        if not self.slots and self.desired == 0:
            return f"reloading {self.app.name}: scaled to zero, no worker to replace; the next start runs the new code"
        return f"reloading {self.app.name}: replacing {len(self.slots)} workers, {self.surge} at a time"

    def scale(self, n: int) -> str:
        self.desired = max(self.floor, n)
        self.wake()
        if self.desired == 0:
            return f"scaling {self.app.name} to zero: its workers drain and stop; the next request starts one"
        return f"scaling {self.app.name} to {self.desired} workers"

    def wake(self) -> None:
        self._wake.set()
        self.changes.notify()

    def kill_hung(self, worker: Worker, why: str) -> None:
        """The pool's verdict on a worker past its request deadline: out of rotation now, killed by reconcile."""
        if worker.state in (State.STOPPING, State.STOPPED):
            return
        worker.stop_reason = why
        self.pool.set_state(worker, State.UNHEALTHY)
        self.wake()

    def all_workers(self) -> list[Worker]:
        return [*self.slots.values(), *self.successors.values(), *self.retiring]

    # --- the loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        while not self.stopping:
            try:
                self.reconcile(self.clock())
            except Exception as exc:  # a bug costs one tick, never the supervision of the app
                self._internal_error(exc)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK)

    def _internal_error(self, exc: Exception) -> None:
        # A fault that recurs every tick is reported once per place it happens, not ten times a second.
        where = traceback.extract_tb(exc.__traceback__)[-1]
        key = (type(exc).__name__, where.filename, where.lineno or 0)
        if key in self._errors_seen:
            return
        self._errors_seen.add(key)
        trace = "".join(traceback.format_exception(exc)).rstrip()
        warn(f"corral: internal error in supervisor for app {self.app.name}: {exc!r}\n{trace}")

    def reconcile(self, now: float) -> None:
        if self.stopping or self.fatal:
            return
        for index in range(self.desired):
            self._reconcile_index(index, now)
        for index in [i for i in self.slots if i >= self.desired]:
            worker = self.slots.pop(index)
            self._retire(worker, f"scaled down to {self.desired}")
            succ = self.successors.pop(index, None)
            if succ is not None:
                self._stop(succ, "scaled down before it was ready")
        for worker in list(self.retiring):
            self._reconcile_retiring(worker, now)
        if self.floor == 0:
            self._reconcile_zero(now)
        if now - self._last_memory >= MEMORY_EVERY and self.app.max_memory:
            self._last_memory = now
            self._check_memory()
        self._check_fatal()
        self._check_crash_loop(now)

    def _reconcile_index(self, index: int, now: float) -> None:
        worker = self.slots.get(index)
        if worker is None or worker.state is State.STOPPED:
            if worker is not None:
                del self.slots[index]
            succ = self.successors.pop(index, None)
            if succ is not None:  # its predecessor died: the replacement simply takes the slot
                self.slots[index] = succ
            elif now >= self._next_start(index):
                if self.floor == 0:
                    self._cold_attempt(now)
                self.slots[index] = self._spawn(index, self.base_ports_for(index))
            return
        if self._kill_if_failed(worker, now):
            return
        spent = worker.max_requests and worker.served >= worker.max_requests
        if spent and worker.state is State.READY and worker.retire_reason is None:
            worker.retire_reason = f"served max_requests ({worker.max_requests})"
            self._count_restart(worker.retire_reason)  # planned: counted by its reason, never backed off
        self._reconcile_successor(index, worker, now)

    def _reconcile_successor(self, index: int, worker: Worker, now: float) -> None:
        wants = worker.generation < self.generation or worker.retire_reason is not None
        succ = self.successors.get(index)
        if succ is None and wants and self.fixed_ports:
            self._replace_in_place(worker)
            return
        if succ is None:
            room = len(self.successors) < self.surge
            if wants and room and worker.state is State.READY and now >= self._next_start(index):
                self.successors[index] = self._spawn(index, self._fresh_port())
            return
        if succ.state is State.STOPPED:
            if self.crash_worker is succ and self._last_lines_pending(now):
                return  # the abort names its last lines: its exit may be seen before its pipes are read
            del self.successors[index]
            if succ.generation > worker.generation and worker.retire_reason is None:
                self._abort_reload(succ)
            return
        if self._kill_if_failed(succ, now):
            return
        if succ.state is State.READY:
            del self.successors[index]
            self.slots[index] = succ
            why = worker.retire_reason or f"replaced by pid {succ.pid} (reload)"
            self._retire(worker, why)

    def _kill_if_failed(self, worker: Worker, now: float) -> bool:
        """SIGKILL a worker too late to start or judged unhealthy (failed probes, a request past its
        deadline: kill_hung, refused connections). True when it was. Such a kill is a failure like a
        crash: counted by its reason, backed off, and towards crash_limit."""
        if worker.state is State.STARTING and now - worker.born > self.app.startup_timeout:
            why = f"not ready after startup_timeout ({self.app.startup_timeout:g}s)"
        elif worker.state is State.UNHEALTHY and not worker.external:
            # A hung R handler cannot be cancelled, and a process that stopped answering may not heed SIGTERM.
            why = worker.stop_reason or "unhealthy"
        else:
            return False
        self._killed[worker] = self._record_failure(worker, why, now)
        self._stop(worker, why, kill=True)
        return True

    # --- scale to zero ---------------------------------------------------------------------------
    def _reconcile_zero(self, now: float) -> None:
        """At desired 0: note when the app got there, and when its last worker was gone (logged once). A cold
        start scaled away before a worker was ready is over: its waiting requests go back to queue_timeout."""
        if self.desired != 0:
            return
        if self.cold is not None:
            self.cold = None
            self.pool.hold_for_start(False)
        if self.zero_since is None:
            self.zero_since = now
        if self.idle_since is None and not any(w.state is not State.STOPPED for w in self.all_workers()):
            self.idle_since = now
            say(
                f"corral: app {self.app.name}: idle (scaled to zero): no worker runs; the next request starts one",
                app=self.app.name,
            )

    def _cold_attempt(self, now: float) -> None:
        """A slot is about to spawn: from zero, that is a cold start (or its next attempt after a failure).
        The pool holds the waiting requests for it: they wait for the start, not queue_timeout."""
        if self.zero_since is not None:
            self.zero_since = self.idle_since = None
            self.cold = ColdStart(now)
        if self.cold is not None:
            self.pool.hold_for_start(True)

    def _cold_done(self, worker: Worker) -> None:
        """The first worker of a cold start is ready: one line with the time it took and who waited."""
        cold = self.cold
        if cold is None or worker.ready_at is None:
            return
        self.cold = None
        took = worker.ready_at - cold.began
        waited = self.pool.scheduler.depth  # read before the pool hands them to the worker
        self.cold_starts += 1
        self.last_cold_start = took
        after = f" (after {cold.failures} failed start{'s' * (cold.failures != 1)})" if cold.failures else ""
        say(
            f"corral: app {self.app.name}: cold start: worker ready in {took:.2f} s{after}, "
            f"{waited} request{'s' * (waited != 1)} waited",
            app=self.app.name,
        )
        self.pool.hold_for_start(False)

    def _cold_failed(self, delay: float, reason: str) -> None:
        """A cold start's attempt failed and no worker serves: its waiting requests get 503 with the backoff as
        Retry-After now, and so does every request until the next attempt; none hangs for a start."""
        cold = self.cold
        if cold is None or any(w.state is State.READY for w in self.slots.values()):
            return
        cold.failures += 1
        self.cold_start_failures += 1
        refused = self.pool.start_failed(delay, "the app's worker failed to start; try again later")
        say(
            f"corral: app {self.app.name}: cold start failed ({reason}): {refused} waiting "
            f"request{'s' * (refused != 1)} answered 503; next attempt in {delay:.1f}s",
            app=self.app.name,
        )

    @property
    def zero_state(self) -> str | None:
        """The app's place on the way to and from zero, as status shows it; None: none of that (running)."""
        if self.cold is not None:
            return START_FAILED if self.cold.failures else COLD_START
        if self.desired != 0:
            return None
        return IDLE if self.idle_since is not None else SCALING_TO_ZERO

    @property
    def unproven(self) -> bool:
        """No worker has been ready yet, or the last start from zero failed: the autoscaler keeps a worker
        going rather than leave at zero an app that may not be able to start."""
        return not self.ever_ready or (self.cold is not None and self.cold.failures > 0)

    def _replace_in_place(self, worker: Worker) -> None:
        # Behind nginx/HAProxy (--supervise-only) the worker ports are in their config: a reload or
        # recycle stops one worker at a time and restarts it on the same port, instead of surging.
        if worker.state is State.READY and all(w.state is State.READY for w in self.slots.values()):
            self._stop(worker, worker.retire_reason or "reload: restarting in place (fixed ports)")

    def _reconcile_retiring(self, worker: Worker, now: float) -> None:
        if worker.state is State.STOPPED:
            self.retiring.remove(worker)
            self.pool.forget(worker)
            return
        if self._kill_if_failed(worker, now):
            return
        if worker.state is State.DRAINING:
            assert worker.draining_since is not None
            late = now - worker.draining_since > self.app.graceful_timeout
            if not worker.holding or late:
                self._stop(worker, "drained" if not late else "graceful_timeout passed while draining")

    def _abort_reload(self, failed: Worker) -> None:
        self.generation = failed.generation - 1
        tail = "; ".join(failed.tail[-3:])
        self.reload_note = f"reload aborted: replacement {failed.name} failed to start ({tail}); old workers kept"
        # The note is one line for status; the log gets the worker's error itself (an R parse error's
        # "unexpected ..." line comes before the 3 lines the note keeps).
        block = "".join(f"\n    {line}" for line in error_lines(failed.tail))
        warn(f"corral: {self.reload_note}{block}")

    def _next_start(self, index: int) -> float:
        return self._backoff_until.get(index, 0.0)

    def base_ports_for(self, index: int) -> int | None:
        """Slot `index`'s port: base_port + index when free, else a fresh one (None: no port left)."""
        if self.unix:
            return 0  # a unix worker takes no port
        preferred = self.base_port + index
        if preferred > PORT_MAX:  # scaled past the end of the port range: nothing above it either
            return None
        if self.fixed_ports:
            return preferred  # named in the front end's config: retry it (with backoff) rather than move
        # A slot added by scale/autoscale may land on a port someone else holds: probe it too.
        if preferred not in self._ports_in_use() and port_free(self.app.worker_host, preferred):
            return preferred
        return self._fresh_port()

    def _fresh_port(self) -> int | None:
        """A port for a replacement: above the range, outside every live worker's, free right now. None when
        every one up to 65535 is taken: that spawn then fails and backs off like a crash."""
        if self.unix:
            return 0
        used = self._ports_in_use()
        for port in range(self.base_port + self.desired, PORT_MAX + 1):
            if port not in used and port_free(self.app.worker_host, port):
                return port
        return None

    def _ports_in_use(self) -> set[int]:
        return {w.port for w in self.all_workers() if w.state is not State.STOPPED}

    # --- process life --------------------------------------------------------------------------
    def _spawn(self, index: int, port: int | None) -> Worker:
        """Start one worker. Never raises: whatever stops a worker from starting (fork's EAGAIN, EMFILE,
        a command gone since the last start, no free port) is a failed start, backed off like a crash."""
        app = self.app
        worker = Worker(app.name, index, connect_host(app), port or 0, app.max_inflight, self.generation)
        worker.born = self.clock()
        if app.max_requests:
            worker.max_requests = app.max_requests + random.randint(0, app.max_requests_jitter)
        try:
            if port is None:
                raise launch.LaunchError(f"no free port from {self.base_port + self.desired} to {PORT_MAX}")
            if self.unix:
                worker.socket = sockdir.instance().socket_for(app.name, index, worker.generation)
            self._start_process(worker)
        except Exception as exc:
            self._spawn_failed(worker, exc)
            return worker
        self.pool.join(worker)
        self._emit(worker, State.STARTING, f"pid {worker.pid} {_where(worker)} gen {worker.generation}")
        return worker

    def _start_process(self, worker: Worker) -> None:
        """The process, its output relay, its exit watch and its readiness probe."""
        argv, cwd = launch.worker_argv(self.app, worker.port, worker.index, worker.socket)
        env = launch.worker_env(self.app, worker.port, worker.index, worker.socket)
        parent, scheduling = os.getpid(), self.app.worker_scheduling
        guardian = deathpipe.instance().ensure() if paths().death_pipe else -1  # no worker outlives corral
        proc = worker.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: stop and kill reach the whole tree
            preexec_fn=lambda: prepare_child(parent, scheduling, guardian),
        )
        if guardian >= 0:
            deathpipe.instance().started(proc.pid)
        WorkerOutput.attach(self.loop, worker, self.log_dir)
        try:
            self._watch_exit(worker)
        except Exception:  # no descriptor left for its pidfd (OSError): a process nobody watches must not live on
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if guardian >= 0:
                deathpipe.instance().reaped(proc.pid)
            raise
        self.loop.create_task(self._await_ready(worker))

    def _spawn_failed(self, worker: Worker, exc: Exception) -> None:
        detail = describe_error(exc)
        worker.tail.append(f"cannot start worker: {detail}")
        worker.stop_reason = "spawn failed"
        self._after_exit(worker, f"cannot start: {detail}")

    async def _await_ready(self, worker: Worker) -> None:
        path = self.app.health_path
        delay = 0.05
        while worker.state is State.STARTING:
            ok, _ = await health.probe(worker.host, worker.port, path, timeout=max(1.0, delay * 4), unix=worker.socket)
            if worker.state is not State.STARTING:
                return
            if ok:
                self._became_ready(worker)
                return
            await asyncio.sleep(delay)  # a poll: only the worker's process knows when it listens
            # Requests wait for a start from zero: every 50 ms, not up to 500, is what they pay for the poll.
            delay = min(delay * 1.5, COLD_POLL if self.cold is not None else 0.5)

    def _became_ready(self, worker: Worker) -> None:
        worker.ready_at = self.clock()
        self.ever_ready = True
        took = worker.ready_at - worker.born
        self._emit(worker, State.READY, f"pid {worker.pid} {_where(worker)} ready in {took:.2f}s")
        if self.cold is not None:
            self._cold_done(worker)
        self.pool.set_state(worker, State.READY)
        self.wake()

    def _watch_exit(self, worker: Worker) -> None:
        assert worker.proc is not None
        pid = worker.proc.pid

        def exited(code: int) -> None:
            if paths().death_pipe:
                deathpipe.instance().reaped(pid)
            worker.exit_cause = exit_cause(code, worker.sent_signal)  # before the pool hears of the exit
            self._after_exit(worker, describe_exit(code))

        exits.watcher(self.loop).watch(worker.proc, exited)  # pidfd, or SIGCHLD (corral.portable)

    def _after_exit(self, worker: Worker, how: str) -> None:
        if worker.socket is not None:
            with contextlib.suppress(OSError):
                os.unlink(worker.socket)  # its server is gone; a replacement gets a path of its own
        was = worker.state
        never_ready = worker.ready_at is None
        worker.state = State.STOPPED
        self.pool.set_state(worker, State.STOPPED)
        self.pool.forget(worker)
        self.pool.worker_exited(worker)  # requests lost with it: to another worker, or 502 (exit_cause)
        delay = self._killed.pop(worker, None)  # killed as failed: counted and backed off at the kill
        if delay is not None and not self.stopping and self.slots.get(worker.index) is worker:
            self._emit(worker, State.STOPPED, f"{how} ({worker.stop_reason}); restarting in {delay:.1f}s")
        elif was is State.STOPPING or self.stopping:
            self._emit(worker, State.STOPPED, f"{how} ({worker.stop_reason or 'stopped'})")
        else:
            self._schedule_restart(worker, how, never_ready)
        self.wake()

    def _schedule_restart(self, worker: Worker, how: str, never_ready: bool) -> None:
        """A worker exited by itself (or never started): a failure, restarted with backoff."""
        reason = worker.stop_reason or ("exited before ready" if never_ready else "exited")
        delay = self._record_failure(worker, reason, self.clock())
        worker.failed += worker.inflight
        self._emit(worker, State.STOPPED, f"{how}; {reason}; restarting in {delay:.1f}s")
        if never_ready and worker.tail and not self.ever_ready:
            self.last_tail = list(worker.tail)

    def _record_failure(self, worker: Worker, reason: str, now: float) -> float:
        """One failure of slot `worker.index`: a crash, a failed start, or a kill or replacement corral
        decided (hung, failed probes, not ready in time, over max_memory). Counted by its reason and
        for the slot, counted towards crash_limit, and the slot's next start backed off (0.1 s doubling
        to 15 s, reset once the worker had been healthy BACKOFF_RESET). Returns that backoff."""
        index = worker.index
        healthy_for = now - worker.ready_at if worker.ready_at else 0.0
        if healthy_for >= BACKOFF_RESET:
            self.failures[index] = 0
        n = self.failures.get(index, 0) + 1
        self.failures[index] = n
        delay = min(BACKOFF_START * 2 ** (n - 1), BACKOFF_MAX)
        self._backoff_until[index] = now + delay
        self._count_restart(reason)
        self.index_restarts[index] = self.index_restarts.get(index, 0) + 1
        self.exits.append(now)
        self.crash_worker, self.crash_seen = worker, now
        if self.cold is not None and worker.ready_at is None:
            self._cold_failed(delay, reason)
        return delay

    def _count_restart(self, reason: str) -> None:
        """corral_worker_restarts_total{reason}: the reason without its details in parentheses, and
        without numbers that change from one restart to the next (a memory size)."""
        label = reason.split(" (")[0]
        if label.endswith("over max_memory"):
            label = "over max_memory"
        self.restarts[label] = self.restarts.get(label, 0) + 1

    def _check_fatal(self) -> None:
        # An app that cannot start at all (syntax error, missing package) must not loop silently.
        if self.ever_ready or self.fatal or self.desired == 0:
            return
        if len(self.failures) >= self.desired and all(self.failures.get(i, 0) >= 1 for i in range(self.desired)):
            now = self.clock()
            if self._last_lines_pending(now) or self._kills_pending(now):
                return
            last = self.crash_worker
            tail = (list(last.tail) if last is not None else []) or self.last_tail or ["(the worker printed nothing)"]
            late = last is not None and (last.stop_reason or "").startswith("not ready after startup_timeout")
            how = f" (the last was killed: {last.stop_reason})" if late and last is not None else ""
            self.fatal = (
                f"app '{self.app.name}' cannot start: every worker exited before it was ready{how}.\n"
                "Last lines the worker printed:\n" + "\n".join(f"    {line}" for line in tail[-15:])
            )
            self.changes.notify()

    # --- crash loops: K unplanned exits within T seconds (circus's flapping, pm2's min_uptime) ----------
    def _check_crash_loop(self, now: float) -> None:
        """Mark the app crash-looping once K exits fall within T seconds; clear it once T seconds pass
        without one. Backoff is not changed: restarts go on either way."""
        k, t = self.crash_limit
        while self.exits and now - self.exits[0] > t:
            self.exits.popleft()
        if self.crash_looping_since is None:
            if len(self.exits) >= k and not self._last_lines_pending(now):
                self.crash_looping_since = now
                self._report_crash_loop()
        elif not self.exits:
            self.crash_looping_since = None
            say(f"corral: app {self.app.name} is no longer crash-looping: no worker exit in the last {t:g}s")

    def _last_lines_pending(self, now: float) -> bool:
        """The last worker to exit may still have lines in its pipes: a report about it waits (briefly)."""
        last = self.crash_worker
        return last is not None and last.pipes_open > 0 and now - self.crash_seen < OUTPUT_GRACE

    def _kills_pending(self, now: float) -> bool:
        """A worker killed as failed has not been seen to exit: corral stops on a cannot-start report at once,
        so the report waits (briefly) for those exits, each a failed start logged as such."""
        return bool(self._killed) and now - self.crash_seen < OUTPUT_GRACE

    def _report_crash_loop(self) -> None:
        k, t = self.crash_limit
        span = self.exits[-1] - self.exits[0]
        lines = self.crash_lines() or ["(the worker printed nothing)"]
        warn(
            f"corral: app {self.app.name} is crash-looping: {len(self.exits)} worker exits in {span:.0f}s "
            f"(crash_limit {k}/{t:g}s); restarts go on with backoff. Last lines of {self.crash_worker_name()}:\n"
            + "\n".join(f"    {line}" for line in lines),
            app=self.app.name,
        )

    def crash_lines(self) -> list[str]:
        """The last lines the worker that exited last printed (read late: its pipes drain after its exit)."""
        return list(self.crash_worker.tail[-CRASH_LINES:]) if self.crash_worker is not None else []

    def crash_worker_name(self) -> str:
        return self.crash_worker.name if self.crash_worker is not None else self.app.name

    def _retire(self, worker: Worker, why: str) -> None:
        worker.stop_reason = why
        worker.draining_since = self.clock()
        self.pool.set_state(worker, State.DRAINING)
        self.pool.scheduler.remove_worker(worker)
        self._emit(worker, State.DRAINING, why)
        self.retiring.append(worker)

    def _stop(self, worker: Worker, why: str, kill: bool = False) -> None:
        if worker.state in (State.STOPPING, State.STOPPED):
            return
        worker.stop_reason = why
        self.pool.set_state(worker, State.STOPPING)
        self.pool.scheduler.remove_worker(worker)
        self._emit(worker, State.STOPPING, why)
        sig = signal.SIGKILL if kill else signal.SIGTERM
        self._signal(worker, sig)
        if not kill:
            self.loop.call_later(self.app.kill_timeout, self._signal, worker, signal.SIGKILL)

    def _signal(self, worker: Worker, sig: int) -> None:
        if worker.proc is None or worker.proc.returncode is not None:
            return
        worker.sent_signal = sig  # its exit is corral's doing: never a kill from outside (exit_cause)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.proc.pid, sig)

    def _check_memory(self) -> None:
        limit = (self.app.max_memory or 0) * 1024 * 1024
        for worker in list(self.slots.values()):
            if worker.state is State.READY and worker.retire_reason is None:
                rss = tree_rss(worker.pid)
                if rss > limit:
                    mb = rss / 1048576
                    worker.retire_reason = f"memory {mb:.0f}MB over max_memory ({self.app.max_memory:g}MB)"
                    # A failure, though replaced gently (its successor first): a leak that refills at
                    # once backs off and shows as a crash loop rather than churning processes.
                    self._record_failure(worker, worker.retire_reason, self.clock())

    def _emit(self, worker: Worker, state: State, reason: str) -> None:
        event(worker, state.value, reason)

    # --- shutdown ------------------------------------------------------------------------------
    async def shutdown(self, deadline: float) -> None:
        """Drain what the workers hold until `deadline`, SIGTERM, then SIGKILL after kill_timeout.

        `deadline` is the one corral's stop began with (the proxy drained against it already): a stop
        takes at most graceful_timeout + kill_timeout, never two graceful_timeouts.
        """
        self.stopping = True
        if self.floor == 0:
            self.pool.hold_for_start(False)  # no start comes now: what waits is bounded by queue_timeout again
        workers = [w for w in self.all_workers() if w.state is not State.STOPPED]
        for w in workers:
            if w.state is State.READY:
                w.draining_since = self.clock()
                self.pool.set_state(w, State.DRAINING)
                self.pool.scheduler.remove_worker(w)
        self.pool.on_settle = self.changes.notify  # in-flight requests and sessions end in the data path
        await self.changes.until(lambda: not any(w.holding for w in workers), deadline, self.clock)
        for w in workers:
            if w.state is not State.STOPPED:
                self._stop(w, "corral is stopping")
        gone = self.clock() + self.app.kill_timeout + 1.0
        # Every exit goes through _after_exit, whose wake() notifies.
        await self.changes.until(lambda: all(w.state is State.STOPPED for w in workers), gone, self.clock)


def _where(worker: Worker) -> str:
    return f"socket {worker.socket}" if worker.socket is not None else f"port {worker.port}"
