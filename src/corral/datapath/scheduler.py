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

Fair queueing (`fair = True`; fairness.py) changes only what waits inside each lane: FIFO per client key,
keys in deficit round robin by predicted cost, instead of one FIFO. It adds two rules:
  * a key may have at most `max_per_key` requests waiting (beyond: QueueFull with status 429);
  * the reserve for other clients: while other keys arrive at RESERVE_MIN_SHORTS per RESERVE_IDLE or
    more, one key may hold at most `capacity - reserve` slots, so a client that sends now and then finds
    a worker free instead of waiting for one of the busy client's requests to end.
Requests pinned to a worker (stickiness, sessions) keep their pin and wait in `held` as before.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable
from typing import Protocol

from .costs import LONG, SHORT
from .fairness import FairLane, KeyCounter
from .worker import Worker

QUEUED, DISPATCHED, CANCELLED, EXPIRED = 1, 2, 3, 4
RESERVE_IDLE = 5.0  # window (s) over which short traffic is judged
RESERVE_MIN_SHORTS = 5  # short requests needed within RESERVE_IDLE to keep the reserve (~1/s)
RETRY_AFTER_MAX = 3600  # seconds: a longer Retry-After tells a client nothing more
MIN_QUANTUM = 0.001  # seconds: the fair lanes' quantum never drops below it (the mean can be ~0 at start)
USAGE_WINDOW = 60.0  # seconds: worker time per key is shown over the last one to two of these


class Job(Protocol):
    """What the scheduler needs of a request; the proxy's Exchange provides it."""

    queued_at: float
    sched_state: int
    cls: int  # costs.SHORT or costs.LONG
    cost: float  # predicted service seconds (0 when unknown)
    session: bool  # a WebSocket upgrade: needs a worker below its max_sessions
    pin: object  # None, or the Worker / worker index a sticky request must wait for
    fair_key: Hashable  # the client it counts against (fair queueing only; read by nothing else)


class QueueFull(Exception):
    """Refused at once: 503 when the queue is full (or the wait would be too long), 429 when the client's own
    share of the queue is."""

    def __init__(self, retry_after: int, reason: str = "queue full", status: int = 503) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.reason = reason
        self.status = status


class FifoLane(deque):  # type: ignore[type-arg]
    """One class lane in arrival order: the queue without fair queueing. A deque, with the methods the
    scheduler asks of a lane (FairLane's), so the unfair path costs what it did."""

    __slots__ = ()
    push = deque.append
    push_front = deque.appendleft

    def ahead(self, job: Job) -> bool:
        """Whether a live job waits in this lane (the new one goes behind it)."""
        while self and self[0].sched_state != QUEUED:
            self.popleft()
        return bool(self)

    def head(self, now: float, may_take: object = None) -> Job | None:
        while self and self[0].sched_state != QUEUED:
            self.popleft()
        return self[0] if self else None

    def pop_head(self, job: Job) -> None:
        self.popleft()

    def expire(self, limit: float) -> list[Job]:
        """Live jobs queued at or before `limit` (FIFO order is deadline order)."""
        out: list[Job] = []
        while self and (self[0].sched_state != QUEUED or self[0].queued_at <= limit):
            job = self.popleft()
            if job.sched_state == QUEUED:
                out.append(job)
        return out

    def oldest(self) -> float | None:
        while self and self[0].sched_state != QUEUED:
            self.popleft()
        return self[0].queued_at if self else None


class Scheduler:
    def __init__(
        self,
        max_queue: int,
        queue_timeout: float,
        reserve: int = 0,
        long_bias: float = 5.0,
        cost_aware: bool = False,
        fair: bool = False,
        max_per_key: int | None = None,
    ) -> None:
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.reserve = reserve
        self.long_bias = long_bias
        self.cost_aware = cost_aware
        self.workers: list[Worker] = []
        # Per class lane: FIFO, or FIFO per client key in turns (fair). They may hold cancelled jobs (dropped
        # lazily); `depth` counts the live ones.
        self.fair = fair
        self.queues: tuple[FifoLane, FifoLane] | tuple[FairLane, FairLane] = (
            (FairLane(QUEUED), FairLane(QUEUED)) if fair else (FifoLane(), FifoLane())
        )
        # Fair queueing's accounting, per key; a key leaves each dict when its count drops to 0.
        self.max_per_key = max_per_key if fair else None
        self.key_queued: dict[Hashable, int] = {}
        self.key_inflight: dict[Hashable, int] = {}
        self.arrivals = KeyCounter(RESERVE_IDLE)  # who has been sending: the reserve for other clients
        # Two keys or more sent within the window: False spares a client alone (the common case) the
        # reserve's lookups on every dispatch. Set when a key arrives, cleared by expire() once they go.
        self.several_keys = False
        self.usage = KeyCounter(USAGE_WINDOW)  # worker seconds per key: the heaviest, for status
        self.rejected_key = 0  # 429: a key's share of the queue was full
        # Jobs only some workers may take (sticky, or sessions): they wait here in arrival order, so a
        # request waiting for one busy worker never holds up the requests any worker could serve.
        self.held = FifoLane()
        self.depth = 0
        self.queued_cost = [0.0, 0.0]  # predicted seconds of the live queued jobs, per class
        self.long_inflight = 0
        # The reserve costs long requests a whole worker: keep it only while short requests are
        # frequent enough to use it (bench/schedsim.py: a 0.2/s trickle cost a long load 13 %).
        self.recent_shorts: deque[float] = deque(maxlen=RESERVE_MIN_SHORTS)
        self.rejected = 0
        self.timed_out = 0
        self.refused_early = 0  # admission control
        # queue_timeout counts from here for the jobs queued before it: while a worker starts from zero (the
        # pool sets it to inf), what waits for it is bounded by that start, and its queue_timeout runs from
        # the moment the worker is ready (a start may take longer than queue_timeout).
        self.wait_from = -math.inf
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
        if self.fair and not self.may_take(job.fair_key, now):
            return None
        return self.pick()

    def may_take(self, key: Hashable, now: float) -> bool:
        """The reserve for other clients: while other keys keep arriving (RESERVE_MIN_SHORTS within
        RESERVE_IDLE or more), one key holds at most `capacity - reserve` slots. Like the reserve for short
        requests, it lapses when the others stop, so a client alone loses no capacity."""
        if not self.several_keys:
            return True
        held = self.key_inflight.get(key, 0)
        if not held or not self.reserve:
            return True
        if self.arrivals.others(key, now) < RESERVE_MIN_SHORTS:
            return True  # nobody else around (checked first: it costs a few lookups, capacity() a loop)
        return held < max(1, self.capacity() - self.reserve)

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
        if self.fair and self.arrivals.add(job.fair_key, 1.0, now):
            self.several_keys = self.arrivals.several(now)
        # Behind what waits in its lane (fair: what its own key has waiting there), and a long job behind
        # the short ones; else it may take a free worker at once.
        lane = short_q if job.cls == SHORT else long_q
        if self._constrained(job) or (not lane.ahead(job) and (job.cls == SHORT or not short_q.ahead(job))):
            worker = self._place(job, now)
            if worker is not None:
                self._assign(job, worker, now)
                return worker
        if self.max_per_key is not None:
            self._check_key_share(job)
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

    def _check_key_share(self, job: Job) -> None:
        """A key's share of the queue: beyond max_per_key waiting, 429 with the time its own line would take to
        drain at its fair share of the workers."""
        waiting = self.key_queued.get(job.fair_key, 0)
        if waiting < self.max_per_key:  # type: ignore[operator]
            return
        self.rejected_key += 1
        share = max(1, self.capacity()) / max(1, len(self.key_queued))
        wait = waiting * (job.cost or self.service_ewma) / share
        raise QueueFull(_whole_seconds(wait), "too many requests from this client are waiting", status=429)

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
        if self._constrained(job):
            if front:
                self.held.appendleft(job)
            else:
                self.held.append(job)
        elif front:
            self.queues[job.cls].push_front(job)
        else:
            self.queues[job.cls].push(job)
        self.depth += 1
        self.queued_cost[job.cls] += job.cost
        if self.fair:
            key = job.fair_key
            self.key_queued[key] = self.key_queued.get(key, 0) + 1

    def _leave_queue(self, job: Job, state: int) -> None:
        job.sched_state = state
        self.depth -= 1
        self.queued_cost[job.cls] -= job.cost
        if self.fair:
            _count_down(self.key_queued, job.fair_key)

    def _assign(self, job: Job, worker: Worker, now: float) -> None:
        job.sched_state = DISPATCHED
        worker.inflight += 1
        worker.last_used = now
        worker.busy_until = max(worker.busy_until, now) + job.cost
        if job.session:
            worker.sessions += 1  # taken from dispatch on: the pool gives it back if the upgrade fails
        if job.cls == LONG:
            self.long_inflight += 1
        if self.fair:
            key = job.fair_key
            self.key_inflight[key] = self.key_inflight.get(key, 0) + 1

    def release(
        self,
        worker: Worker,
        now: float,
        service_time: float | None = None,
        cls: int = SHORT,
        key: Hashable = None,
    ) -> None:
        worker.inflight -= 1
        worker.last_used = now
        if worker.inflight == 0:
            worker.busy_until = now
        if cls == LONG:
            self.long_inflight -= 1
        if service_time is not None:
            self.service_ewma += 0.1 * (service_time - self.service_ewma)
        if self.fair:
            _count_down(self.key_inflight, key)
            if service_time is not None:
                self.usage.add(key, service_time, now)
                quantum = max(MIN_QUANTUM, self.service_ewma)  # a turn: about one average request
                for lane in self.queues:
                    lane.quantum = quantum  # type: ignore[union-attr]

    def pump(self, now: float) -> list[tuple[Job, Worker]]:
        """Hand queued jobs to workers with room: by place (arrival, plus long_bias for long jobs)."""
        out: list[tuple[Job, Worker]] = []
        if self.held:
            self._pump_held(now, out)
        while self.depth:
            placed = False
            for job in self._heads(now):
                worker = self._place(job, now)
                if worker is not None:
                    self.queues[job.cls].pop_head(job)
                    self._leave_queue(job, DISPATCHED)
                    self._assign(job, worker, now)
                    out.append((job, worker))
                    placed = True
                    break
            if not placed:
                break
        return out

    def _pump_held(self, now: float, out: list[tuple[Job, Worker]]) -> None:
        keep = FifoLane()
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

    def _heads(self, now: float) -> list[Job]:
        heads = []
        may_take = self.may_take if self.fair else None
        for q in self.queues:
            job = q.head(now, may_take)
            if job is not None:
                heads.append(job)
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
        if self.several_keys:
            self.several_keys = self.arrivals.several(now)
        if limit < self.wait_from:
            return out  # each job counts as queued at wait_from at the earliest: none has waited long enough
        for q in (*self.queues, self.held):
            for job in q.expire(limit):
                self._leave_queue(job, EXPIRED)
                self.timed_out += 1
                out.append(job)
        return out

    def flush(self) -> list[Job]:
        """Every waiting job, out of the queue (the caller answers them): a start from zero has failed."""
        out: list[Job] = []
        for q in (*self.queues, self.held):
            for job in q.expire(math.inf):
                self._leave_queue(job, EXPIRED)
                out.append(job)
        return out

    @staticmethod
    def _trim(q: deque[Job]) -> None:
        """Drop the dead jobs at a lane's front (bench/schedsim.py's policy variants use it)."""
        while q and q[0].sched_state != QUEUED:
            q.popleft()

    def oldest_wait(self, now: float) -> float:
        waits = [now - t for q in (*self.queues, self.held) if (t := q.oldest()) is not None]
        return max(waits, default=0.0)

    def heaviest(self, n: int, now: float) -> list[tuple[Hashable, float, int, int]]:
        """Fair queueing's busiest keys: (key, share of the worker time of the last USAGE_WINDOW or two,
        requests waiting, requests on workers), heaviest first: those using the most, then those waiting the
        most."""
        total = self.usage.total(now)
        keys = [k for k, _ in self.usage.top(n, now)]
        keys += [k for k, _ in sorted(self.key_queued.items(), key=lambda kv: -kv[1])[:n] if k not in keys]
        rows = [
            (k, self.usage.of(k, now) / total if total else 0.0, self.key_queued.get(k, 0), self.key_inflight.get(k, 0))
            for k in keys
        ]
        rows.sort(key=lambda r: (-r[1], -r[2]))
        return rows[:n]

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
        if self.fair:
            # Turns: ahead of it are its own client's waiting requests and, from each other waiting client,
            # about as much (no more than the whole queue): a client behind a busy one is not refused for
            # the busy one's backlog.
            waiting = self.key_queued.get(job.fair_key, 0)
            clients = len(self.key_queued) + (waiting == 0)
            queued = min(queued, waiting * (job.cost or self.service_ewma) * clients)
        busy = sorted(max(0.0, w.busy_until - now) for w in self.workers if w.routable)
        # the job starts when the slots free up after the work ahead: approximate as fluid
        running = sum(busy[:slots]) if busy else 0.0
        return (queued + running) / slots

    def retry_after(self) -> int:
        """Seconds until a retried request would likely be served: the queue's drain time."""
        slots = max(1, self.capacity())
        return _whole_seconds((self.depth + 1) * self.service_ewma / slots)


def _count_down(counts: dict[Hashable, int], key: Hashable) -> None:
    """One fewer for `key`; a key at 0 leaves, so memory follows what is queued or running."""
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


def _whole_seconds(seconds: float) -> int:
    """A Retry-After value: whole seconds, at least 1, and finite whatever the estimate was (inf, nan)."""
    if not seconds < RETRY_AFTER_MAX:
        return RETRY_AFTER_MAX
    return max(1, math.ceil(seconds))
