"""Autoscaling between --min-workers and --max-workers.

The policy is one pure function, `decide(policy, observation, memory)`: no clock, no I/O, so every
decision can be replayed in a unit test. `Autoscaler` is the small loop that samples a pool and
its supervisor every TICK seconds, asks `decide`, and calls `Supervisor.scale` when the answer
differs. Scaling down uses the supervisor's drain (finish what the worker holds, then stop), so
autoscaling never fails a request.

Up: when the oldest queued request has waited `scale_up_wait`, add workers, at most doubling and
no more than the queue needs, and only when no worker is still starting (the capacity asked for
last time has not arrived yet).
Down: `memory.last_needed[k]` is the last time at least k workers were busy at once (a queue
means all were). Levels not needed for `idle_timeout` are surplus: drop to the highest level
still needed, never below min_workers.
Never above `ceiling(app)`, the bound `corral scale` and /scale obey too.
Zero (min_workers 0): the last worker goes like any surplus one, after `idle_timeout` without a request
or a session. At zero, a queued request is demand: one worker at once (a cold start), however many wait;
more come by the rule above once it serves. The pool signals that demand (`Autoscaler.demand`, so the
start does not wait for the next tick); it starts nothing itself. While the app has not shown it can start
(no worker ready yet, or its last start failed) it keeps one worker going: it is never left at zero with
a start that fails, where /readyz would call it ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..logs import say
from . import snapshot
from .snapshot import ceiling

if TYPE_CHECKING:
    from ..config import AppConfig
    from ..datapath.pool import Pool
    from ..supervision.supervisor import Supervisor
    from .snapshot import AppSnap

TICK = 0.1


@dataclass(frozen=True)
class Policy:
    min_workers: int
    max_workers: int
    scale_up_wait: float
    idle_timeout: float

    @classmethod
    def of(cls, app: AppConfig, cpus: int) -> Policy:
        lo = app.min_workers if app.min_workers is not None else 1  # 0: scale to zero
        hi = min(max(lo, app.max_workers or app.workers or cpus), ceiling(app))
        return cls(min(lo, hi), hi, app.scale_up_wait, app.idle_timeout)

    def clamp(self, n: int) -> int:
        return max(self.min_workers, min(self.max_workers, n))


@dataclass(frozen=True)
class Observation:
    now: float
    desired: int  # the supervisor's current target
    starting: int  # workers spawned and not ready yet
    busy: int  # ready workers holding at least one request
    depth: int  # requests waiting in the queue
    oldest_wait: float  # seconds the oldest of them has waited
    max_inflight: int = 1
    unproven: bool = False  # no worker ready yet, or the last start failed: keep one going (never zero)


@dataclass(frozen=True)
class Memory:
    target: int  # what the autoscaler last asked for (a different desired means someone scaled by hand)
    last_needed: tuple[float, ...]  # [k] = last time at least k workers were busy; [0] unused


@dataclass(frozen=True)
class Decision:
    target: int
    reason: str | None
    memory: Memory


def _fresh(now: float, upto: int, size: int, old: tuple[float, ...] | None = None) -> tuple[float, ...]:
    """last_needed with levels 1..upto marked needed now (kept from `old` above that)."""
    base = list(old) if old is not None else [-math.inf] * (size + 1)
    base += [-math.inf] * (size + 1 - len(base))
    for k in range(1, min(upto, size) + 1):
        base[k] = now
    return tuple(base)


def observation(app: AppSnap, now: float) -> Observation:
    return Observation(
        now=now,
        desired=app.desired,
        starting=app.starting,
        busy=app.busy,
        depth=app.queue.depth,
        oldest_wait=app.queue.oldest_wait,
        max_inflight=app.max_inflight,
        unproven=app.unproven,
    )


def decide(policy: Policy, obs: Observation, memory: Memory | None) -> Decision:
    now, desired = obs.now, obs.desired
    size = max(policy.max_workers, desired)
    if memory is None or memory.target != desired:
        # First look, or scaled by hand: the current size counts as needed from now on.
        memory = Memory(desired, _fresh(now, desired, size, memory.last_needed if memory else None))
    if not policy.min_workers <= desired <= policy.max_workers:
        target = policy.clamp(desired)
        why = f"outside min_workers..max_workers ({policy.min_workers}..{policy.max_workers})"
        return Decision(target, why, Memory(target, _fresh(now, target, size)))
    in_use = desired if obs.depth else obs.busy
    memory = replace(memory, last_needed=_fresh(now, in_use, size, memory.last_needed))
    if desired == 0 and obs.depth:
        # Scaled to zero and a request waits: one worker now (a cold start), not one per request.
        why = f"cold start: {obs.depth} request{'s' * (obs.depth != 1)} waiting"
        return Decision(1, why, Memory(1, _fresh(now, 1, size, memory.last_needed)))
    if obs.depth and obs.oldest_wait >= policy.scale_up_wait and desired < policy.max_workers and not obs.starting:
        wanted = math.ceil(obs.depth / max(1, obs.max_inflight))
        target = desired + min(policy.max_workers - desired, max(1, min(wanted, desired)))
        why = (
            f"oldest queued request waited {obs.oldest_wait:.1f}s (scale_up_wait {policy.scale_up_wait:g}s), "
            f"{obs.depth} waiting"
        )
        return Decision(target, why, Memory(target, _fresh(now, target, size, memory.last_needed)))
    needed = [k for k in range(1, desired + 1) if now - memory.last_needed[k] < policy.idle_timeout]
    # Zero waits for a start under way (a cold start whose client left): it ends, then idles like any worker.
    floor = max(policy.min_workers, 1 if obs.unproven or obs.starting else 0)
    target = max(floor, max(needed, default=0))
    if target < desired:
        why = f"{desired - target} worker(s) unused for idle_timeout ({policy.idle_timeout:g}s)"
        if target == 0:
            why += ": scaling to zero"
        return Decision(target, why, Memory(target, memory.last_needed))
    return Decision(desired, None, memory)


class Autoscaler:
    """Samples one app every TICK seconds and applies `decide` through its supervisor."""

    def __init__(self, app: AppConfig, pool: Pool, supervisor: Supervisor, policy: Policy) -> None:
        self.app = app
        self.pool = pool
        self.supervisor = supervisor
        self.policy = policy
        self.memory: Memory | None = None
        self.last_reason: str | None = None
        self._wake = asyncio.Event()

    def demand(self) -> None:
        """The pool's signal: a request waits and no worker is in rotation. The next step comes at once."""
        self._wake.set()

    def observe(self, now: float) -> Observation:
        return observation(snapshot.take_app(self.pool, self.supervisor, self, now, routes=0), now)

    def step(self, now: float) -> Decision:
        decision = decide(self.policy, self.observe(now), self.memory)
        self.memory = decision.memory
        sup = self.supervisor
        if decision.target != sup.desired and not sup.stopping:
            self.last_reason = decision.reason
            say(f"corral: autoscale {self.app.name}: {sup.desired} -> {decision.target} workers ({decision.reason})")
            sup.scale(decision.target)
        return decision

    async def run(self) -> None:
        while not self.supervisor.stopping:
            self.step(time.monotonic())  # the scheduler's clock: queued_at is time.monotonic()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK)
