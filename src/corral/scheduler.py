"""The central queue: which request goes to which worker, and when. Pure logic, no sockets, no clock.

One scheduler per app. A worker never holds more than its `max_inflight`; everything beyond waits
in ONE FIFO queue and goes to the first worker that frees up (HAProxy's `maxconn` + queue model,
not nginx's per-worker backlog). Callers pass `now`, so every decision is reproducible in tests.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

from .worker import Worker

QUEUED, DISPATCHED, CANCELLED, EXPIRED = 1, 2, 3, 4


class Job(Protocol):
    """What the scheduler needs of a request; the proxy's Exchange provides it."""

    queued_at: float
    sched_state: int


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("queue full")
        self.retry_after = retry_after


class Scheduler:
    __slots__ = (
        "depth",
        "dispatched",
        "max_queue",
        "queue",
        "queue_timeout",
        "rejected",
        "service_ewma",
        "timed_out",
        "workers",
    )

    def __init__(self, max_queue: int, queue_timeout: float) -> None:
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.workers: list[Worker] = []
        self.queue: deque[Job] = deque()  # may hold cancelled jobs; `depth` counts the live ones
        self.depth = 0
        self.rejected = 0
        self.timed_out = 0
        self.dispatched = 0
        self.service_ewma = 0.05  # seconds; only used to word Retry-After

    # --- workers ------------------------------------------------------------------------
    def add_worker(self, worker: Worker) -> None:
        if worker not in self.workers:
            self.workers.append(worker)

    def remove_worker(self, worker: Worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)

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

    # --- requests -----------------------------------------------------------------------
    def submit(self, job: Job, now: float) -> Worker | None:
        """Assign a worker at once, or queue the job (returns None), or raise QueueFull."""
        if not self.depth:
            worker = self.pick()
            if worker is not None:
                self._assign(job, worker, now)
                return worker
        if self.depth >= self.max_queue:
            self.rejected += 1
            raise QueueFull(self.retry_after())
        job.queued_at = now
        job.sched_state = QUEUED
        self.queue.append(job)
        self.depth += 1
        return None

    def requeue_front(self, job: Job, now: float) -> Worker | None:
        """A job whose worker could not be reached goes first in line, not last."""
        worker = self.pick()
        if worker is not None:
            self._assign(job, worker, now)
            return worker
        job.sched_state = QUEUED
        self.queue.appendleft(job)
        self.depth += 1
        return None

    def _assign(self, job: Job, worker: Worker, now: float) -> None:
        job.sched_state = DISPATCHED
        worker.inflight += 1
        worker.last_used = now
        self.dispatched += 1

    def release(self, worker: Worker, now: float, service_time: float | None = None) -> None:
        worker.inflight -= 1
        worker.last_used = now
        if service_time is not None:
            self.service_ewma += 0.1 * (service_time - self.service_ewma)

    def pump(self, now: float) -> list[tuple[Job, Worker]]:
        """Hand queued jobs to workers with room, oldest first."""
        out: list[tuple[Job, Worker]] = []
        queue = self.queue
        while self.depth:
            worker = self.pick()
            if worker is None:
                break
            job = queue.popleft()
            if job.sched_state != QUEUED:
                continue
            self.depth -= 1
            self._assign(job, worker, now)
            out.append((job, worker))
        self._trim()
        return out

    def cancel(self, job: Job) -> None:
        """The client left while queued: the job is dropped lazily, in O(1)."""
        if job.sched_state == QUEUED:
            job.sched_state = CANCELLED
            self.depth -= 1

    def expire(self, now: float) -> list[Job]:
        """Jobs that waited longer than queue_timeout, oldest first (FIFO order is deadline order)."""
        out: list[Job] = []
        queue = self.queue
        limit = now - self.queue_timeout
        while queue and (queue[0].sched_state != QUEUED or queue[0].queued_at <= limit):
            job = queue.popleft()
            if job.sched_state == QUEUED:
                job.sched_state = EXPIRED
                self.depth -= 1
                self.timed_out += 1
                out.append(job)
        return out

    def _trim(self) -> None:
        queue = self.queue
        while queue and queue[0].sched_state != QUEUED:
            queue.popleft()

    def oldest_wait(self, now: float) -> float:
        self._trim()
        return now - self.queue[0].queued_at if self.queue else 0.0

    def retry_after(self) -> int:
        """Seconds until a retried request would likely be served: the queue's drain time."""
        slots = max(1, self.capacity())
        return max(1, math.ceil((self.depth + 1) * self.service_ewma / slots))
