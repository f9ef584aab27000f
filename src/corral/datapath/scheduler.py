"""The central queue: which request goes to which worker, and when. Pure logic, no sockets, no clock.

One scheduler per app. A worker never holds more than its `max_inflight`; everything beyond waits
at the proxy and goes to the first worker that frees up (HAProxy's `maxconn` + queue model, not
nginx's per-worker backlog). Callers pass `now`, so every decision is reproducible in tests.

Cost-aware dispatch (the default; `dispatch = "fifo"` turns it off) adds three rules, using each
request's class and predicted cost from costs.py:
  * long requests may hold at most `capacity - reserve` slots, so `reserve` workers stay free for
    short ones; the reserve is soft: it is released when no short request was seen for RESERVE_IDLE
    seconds, so a long-only load loses no capacity;
  * in the queue, short requests go ahead of long ones, but a long request's place is its arrival
    time plus `long_bias` seconds (ageing), so no long request starves;
  * a request whose predicted wait already exceeds the queue timeout is refused at once (admission
    control) with a Retry-After computed from the prediction. With no worker ready (at start, or
    after the only one crashed) there is nothing to predict from: the request waits, as under fifo.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Protocol

from .costs import LONG, SHORT
from .worker import Worker

QUEUED, DISPATCHED, CANCELLED, EXPIRED = 1, 2, 3, 4
RESERVE_IDLE = 5.0  # window (s) over which short traffic is judged
RESERVE_MIN_SHORTS = 5  # short requests needed within RESERVE_IDLE to keep the reserve (~1/s)
RETRY_AFTER_MAX = 3600  # seconds: a longer Retry-After tells a client nothing more


class Job(Protocol):
    """What the scheduler needs of a request; the proxy's Exchange provides it."""

    queued_at: float
    sched_state: int
    cls: int  # costs.SHORT or costs.LONG
    cost: float  # predicted service seconds (0 when unknown)
    session: bool  # a WebSocket upgrade: needs a worker below its max_sessions
    pin: object  # None, or the Worker / worker index a sticky request must wait for


class QueueFull(Exception):
    def __init__(self, retry_after: int, reason: str = "queue full") -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.reason = reason


class Scheduler:
    def __init__(
        self,
        max_queue: int,
        queue_timeout: float,
        reserve: int = 0,
        long_bias: float = 5.0,
        cost_aware: bool = False,
    ) -> None:
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.reserve = reserve
        self.long_bias = long_bias
        self.cost_aware = cost_aware
        self.workers: list[Worker] = []
        # Per class FIFO; may hold cancelled jobs (dropped lazily). `depth` counts the live ones.
        self.queues: tuple[deque[Job], deque[Job]] = (deque(), deque())
        # Jobs only some workers may take (sticky, or sessions): they wait here in arrival order, so a
        # request waiting for one busy worker never holds up the requests any worker could serve.
        self.held: deque[Job] = deque()
        self.depth = 0
        self.queued_cost = [0.0, 0.0]  # predicted seconds of the live queued jobs, per class
        self.long_inflight = 0
        # The reserve costs long requests a whole worker: keep it only while short requests are
        # frequent enough to use it (bench/schedsim.py: a 0.2/s trickle cost a long load 13 %).
        self.recent_shorts: deque[float] = deque(maxlen=RESERVE_MIN_SHORTS)
        self.rejected = 0
        self.timed_out = 0
        self.refused_early = 0  # admission control
        self.service_ewma = 0.05  # seconds; words Retry-After when nothing better is known

    # --- workers ------------------------------------------------------------------------
    def add_worker(self, worker: Worker) -> None:
        if worker not in self.workers:
            self.workers.append(worker)

    def remove_worker(self, worker: Worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)

    def unpin(self, gone: Callable[[object], bool]) -> None:
        """Waiting jobs pinned to a worker that is gone may go to any worker."""
        for job in self.held:
            if job.sched_state == QUEUED and job.pin is not None and gone(job.pin):
                job.pin = None

    def pick(self) -> Worker | None:
        """The least-loaded worker with room; among equals, the one idle longest (even spread)."""
        best: Worker | None = None
        for w in self.workers:
            if w.has_room and (
                best is None
                or w.inflight < best.inflight
                or (w.inflight == best.inflight and w.last_used < best.last_used)
            ):
                best = w
        return best

    def capacity(self) -> int:
        return sum(w.max_inflight for w in self.workers if w.routable)

    def long_limit(self, now: float) -> int:
        """Slots long requests may hold: all but the reserve, while short requests are around."""
        cap = self.capacity()
        recent = self.recent_shorts
        if not self.cost_aware or len(recent) < RESERVE_MIN_SHORTS or now - recent[0] > RESERVE_IDLE:
            return cap
        return max(1, cap - self.reserve)

    def _place(self, job: Job, now: float) -> Worker | None:
        if job.cls == LONG and self.long_inflight >= self.long_limit(now):
            return None
        if job.pin is not None or job.session:
            return self._pick_for(job)
        return self.pick()

    def _pick_for(self, job: Job) -> Worker | None:
        """pick(), among the workers this job may go to; sessions spread by open sessions first."""
        pin, session = job.pin, job.session
        if isinstance(pin, Worker):
            # Pinned to one process: that one or none. A draining one (it has left self.workers) takes the
            # requests of the sessions it holds (pool._pin pins nothing else to it), never a new session.
            if session:
                return pin if pin.has_room and pin.sessions < pin.max_sessions else None
            return pin if pin.has_room_pinned else None
        best: Worker | None = None
        for w in self.workers:
            if not w.has_room or (session and w.sessions >= w.max_sessions):
                continue
            if pin is not None and pin is not w and pin != w.index:
                continue
            if best is None or (w.sessions, w.inflight, w.last_used) < (best.sessions, best.inflight, best.last_used):
                best = w
        return best

    @staticmethod
    def _constrained(job: Job) -> bool:
        return job.pin is not None or job.session

    # --- requests -----------------------------------------------------------------------
    def submit(self, job: Job, now: float) -> Worker | None:
        """Assign a worker at once, or queue the job (returns None), or raise QueueFull."""
        job.queued_at = now
        short_q, long_q = self.queues
        if job.cls == SHORT:
            self.recent_shorts.append(now)
        ahead = short_q if job.cls == SHORT else long_q
        if self._constrained(job) or (not self._live(ahead) and (job.cls == SHORT or not self._live(short_q))):
            worker = self._place(job, now)
            if worker is not None:
                self._assign(job, worker, now)
                return worker
        if self.depth >= self.max_queue:
            self.rejected += 1
            raise QueueFull(self.retry_after(), "all workers busy and the queue is full")
        if self.cost_aware and self.capacity() and not self._constrained(job):
            wait = self.predicted_wait(job, now)
            if wait > self.queue_timeout:
                self.refused_early += 1
                raise QueueFull(_whole_seconds(wait), "predicted wait exceeds the queue timeout")
        self._enqueue(job, front=False)
        return None

    def requeue_front(self, job: Job, now: float) -> Worker | None:
        """A job whose worker could not be reached goes first in line, not last."""
        worker = self._place(job, now)
        if worker is not None:
            self._assign(job, worker, now)
            return worker
        self._enqueue(job, front=True)
        return None

    def _enqueue(self, job: Job, front: bool) -> None:
        job.sched_state = QUEUED
        q = self.held if self._constrained(job) else self.queues[job.cls]
        if front:
            q.appendleft(job)
        else:
            q.append(job)
        self.depth += 1
        self.queued_cost[job.cls] += job.cost

    def _leave_queue(self, job: Job, state: int) -> None:
        job.sched_state = state
        self.depth -= 1
        self.queued_cost[job.cls] -= job.cost

    def _assign(self, job: Job, worker: Worker, now: float) -> None:
        job.sched_state = DISPATCHED
        worker.inflight += 1
        worker.last_used = now
        worker.busy_until = max(worker.busy_until, now) + job.cost
        if job.session:
            worker.sessions += 1  # taken from dispatch on: the pool gives it back if the upgrade fails
        if job.cls == LONG:
            self.long_inflight += 1

    def release(self, worker: Worker, now: float, service_time: float | None = None, cls: int = SHORT) -> None:
        worker.inflight -= 1
        worker.last_used = now
        if worker.inflight == 0:
            worker.busy_until = now
        if cls == LONG:
            self.long_inflight -= 1
        if service_time is not None:
            self.service_ewma += 0.1 * (service_time - self.service_ewma)

    def pump(self, now: float) -> list[tuple[Job, Worker]]:
        """Hand queued jobs to workers with room: by place (arrival, plus long_bias for long jobs)."""
        out: list[tuple[Job, Worker]] = []
        if self.held:
            self._pump_held(now, out)
        while self.depth:
            placed = False
            for job in self._heads():
                worker = self._place(job, now)
                if worker is not None:
                    self.queues[job.cls].popleft()
                    self._leave_queue(job, DISPATCHED)
                    self._assign(job, worker, now)
                    out.append((job, worker))
                    placed = True
                    break
            if not placed:
                break
        return out

    def _pump_held(self, now: float, out: list[tuple[Job, Worker]]) -> None:
        keep: deque[Job] = deque()
        for job in self.held:
            if job.sched_state != QUEUED:
                continue
            worker = self._place(job, now)  # a job unpinned while it waited may go to any worker now
            if worker is None:
                keep.append(job)
                continue
            self._leave_queue(job, DISPATCHED)
            self._assign(job, worker, now)
            out.append((job, worker))
        self.held = keep

    def _heads(self) -> list[Job]:
        heads = []
        for q in self.queues:
            self._trim(q)
            if q:
                heads.append(q[0])
        if len(heads) == 2 and heads[1].queued_at + self.long_bias < heads[0].queued_at:
            heads.reverse()  # the long job has waited long enough to go first
        return heads

    def cancel(self, job: Job) -> None:
        """The client left while queued: the job is dropped lazily, in O(1)."""
        if job.sched_state == QUEUED:
            self._leave_queue(job, CANCELLED)

    def expire(self, now: float) -> list[Job]:
        """Jobs that waited longer than queue_timeout (per class, FIFO order is deadline order)."""
        out: list[Job] = []
        limit = now - self.queue_timeout
        for q in (*self.queues, self.held):
            while q and (q[0].sched_state != QUEUED or q[0].queued_at <= limit):
                job = q.popleft()
                if job.sched_state == QUEUED:
                    self._leave_queue(job, EXPIRED)
                    self.timed_out += 1
                    out.append(job)
        return out

    @staticmethod
    def _trim(q: deque[Job]) -> None:
        while q and q[0].sched_state != QUEUED:
            q.popleft()

    def _live(self, q: deque[Job]) -> bool:
        self._trim(q)
        return bool(q)

    def oldest_wait(self, now: float) -> float:
        waits = [now - q[0].queued_at for q in (*self.queues, self.held) if self._live(q)]
        return max(waits, default=0.0)

    # --- predictions --------------------------------------------------------------------
    def predicted_wait(self, job: Job, now: float) -> float:
        """Seconds until `job` would start: the known work ahead of it spread over the slots it may use."""
        # O(workers), not O(queue): submit runs this for every request that has to wait.
        if job.cls == LONG:
            slots = self.long_limit(now)
            queued = self.queued_cost[SHORT] + self.queued_cost[LONG]
        else:
            slots = self.capacity()
            queued = self.queued_cost[SHORT]
        if slots <= 0:
            return math.inf
        busy = sorted(max(0.0, w.busy_until - now) for w in self.workers if w.routable)
        # the job starts when the slots free up after the work ahead: approximate as fluid
        running = sum(busy[:slots]) if busy else 0.0
        return (queued + running) / slots

    def retry_after(self) -> int:
        """Seconds until a retried request would likely be served: the queue's drain time."""
        slots = max(1, self.capacity())
        return _whole_seconds((self.depth + 1) * self.service_ewma / slots)


def _whole_seconds(seconds: float) -> int:
    """A Retry-After value: whole seconds, at least 1, and finite whatever the estimate was (inf, nan)."""
    if not seconds < RETRY_AFTER_MAX:
        return RETRY_AFTER_MAX
    return max(1, math.ceil(seconds))
