"""Autoscaling, in process and fast: the policy (`decide`, `Policy`), its ceiling, and what it observes of a
fleet through one snapshot. The end-to-end runs under load live in test_reload_scale.py."""

from __future__ import annotations

import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral import config
from corral.config import AppConfig
from corral.datapath.costs import RouteCosts
from corral.datapath.quarantine import Quarantine
from corral.datapath.worker import State, Worker
from corral.ops import snapshot
from corral.ops.autoscale import Autoscaler, Observation, Policy, decide, observation

pytestmark = pytest.mark.unit  # in-process: no child process, no listener (tests/conftest.py)

POLICY = Policy(min_workers=2, max_workers=6, scale_up_wait=1.0, idle_timeout=10.0)


def obs(now: float, desired: int, busy: int = 0, depth: int = 0, wait: float = 0.0, starting: int = 0) -> Observation:
    return Observation(now=now, desired=desired, starting=starting, busy=busy, depth=depth, oldest_wait=wait)


# --- the ceiling -------------------------------------------------------------------------------------
@pytest.fixture
def ceiling_of(monkeypatch):
    """Stand in for config.worker_ceiling with a fixed value."""

    def install(n: int) -> None:
        monkeypatch.setattr(config, "worker_ceiling", lambda app, nofile=None: n)

    return install


def test_ceiling_is_max_workers_when_set_else_from_cpus():
    assert snapshot.ceiling(AppConfig(max_workers=7)) == 7
    assert snapshot.ceiling(AppConfig()) >= min(max(4 * (os.cpu_count() or 1), 16), 64)


def test_ceiling_is_config_worker_ceiling_when_there(ceiling_of):
    ceiling_of(5)
    assert snapshot.ceiling(AppConfig(workers=100)) == 5


def test_policy_never_reaches_above_the_ceiling(ceiling_of):
    ceiling_of(5)
    assert Policy.of(AppConfig(min_workers=1, workers=100), cpus=64).max_workers == 5
    p = Policy.of(AppConfig(min_workers=8), cpus=64)
    assert (p.min_workers, p.max_workers) == (5, 5)  # a min above the ceiling is lowered to it, not the reverse
    assert Policy.of(AppConfig(min_workers=1, max_workers=3), cpus=64).max_workers == 3
    assert Policy.of(AppConfig(min_workers=1), cpus=2).max_workers == 2  # the CPU count, below the ceiling


def test_policy_of_is_unchanged_below_the_ceiling(ceiling_of):
    ceiling_of(1000)
    assert Policy.of(AppConfig(min_workers=3, max_workers=2), cpus=4) == Policy(3, 3, 1.0, 60.0)
    assert Policy.of(AppConfig(max_workers=4, workers=2), cpus=8) == Policy(1, 4, 1.0, 60.0)


# --- decide ------------------------------------------------------------------------------------------
def test_scale_up_waits_for_scale_up_wait_then_at_most_doubles():
    d = decide(POLICY, obs(0, 2, busy=2, depth=9, wait=0.9), None)
    assert d.target == 2 and d.reason is None
    d = decide(POLICY, obs(1, 2, busy=2, depth=9, wait=1.0), d.memory)
    assert d.target == 4 and "9 waiting" in (d.reason or "")


def test_scale_up_is_sized_by_max_inflight():
    many = Observation(now=0, desired=2, starting=0, busy=2, depth=2, oldest_wait=5.0, max_inflight=4)
    assert decide(POLICY, many, None).target == 3  # two queued fit one more worker holding four


def test_no_scale_up_while_a_worker_is_starting():
    assert decide(POLICY, obs(0, 3, busy=3, depth=9, wait=5.0, starting=1), None).target == 3


def test_a_manual_count_outside_the_bounds_is_brought_back():
    d = decide(POLICY, obs(0, 40), None)
    assert d.target == 6 and "outside min_workers..max_workers (2..6)" in (d.reason or "")
    assert decide(POLICY, obs(0, 1), None).target == 2


def test_scale_down_keeps_levels_needed_within_idle_timeout():
    d = decide(POLICY, obs(0, 5, busy=5), None)
    d = decide(POLICY, obs(8, 5, busy=3), d.memory)
    assert d.target == 5
    d = decide(POLICY, obs(10, 5, busy=3), d.memory)
    assert d.target == 3 and "2 worker(s) unused" in (d.reason or "")
    d = decide(POLICY, obs(25, 3), d.memory)
    assert d.target == 2  # min_workers


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(0, 30),  # time since the previous look
            st.integers(0, 50),  # queue depth
            st.floats(0, 20),  # oldest wait
            st.integers(0, 10),  # busy
            st.integers(0, 2),  # starting
            st.one_of(st.none(), st.integers(1, 100)),  # someone ran `corral scale N`
        ),
        max_size=40,
    )
)
def test_decide_stays_within_bounds_and_at_most_doubles(steps):
    now, desired, memory = 0.0, 2, None
    for dt, depth, wait, busy, starting, manual in steps:
        now += dt
        desired = manual or desired
        d = decide(POLICY, obs(now, desired, min(busy, desired), depth, wait, starting), memory)
        assert POLICY.min_workers <= d.target <= POLICY.max_workers
        if POLICY.min_workers <= desired <= POLICY.max_workers:
            assert d.target <= 2 * desired
        desired, memory = d.target, d.memory


# --- what the autoscaler observes, through a snapshot -----------------------------------------------
def worker(index: int, state: State, generation: int = 0, inflight: int = 0) -> Worker:
    w = Worker("api", index, "127.0.0.1", 9000 + index + 10 * generation, max_inflight=1, generation=generation)
    w.state, w.inflight = state, inflight
    return w


def fake_pool(workers: list[Worker], depth: int = 0, oldest: float = 0.0, max_inflight: int = 1):
    sched = SimpleNamespace(
        depth=depth,
        max_queue=1000,
        rejected=0,
        timed_out=0,
        refused_early=0,
        long_inflight=0,
        oldest_wait=lambda now: oldest,
        fair=False,
    )
    app = AppConfig(name="api", max_inflight=max_inflight)
    return SimpleNamespace(
        name="api",
        route="/",
        app=app,
        workers=workers,
        scheduler=sched,
        cost_aware=True,
        served=0,
        failed=0,
        outcomes={"served": 0, "failed": 0, "refused": 0, "abandoned": 0},
        cuts={},
        retried=0,
        redispatched=0,
        quarantine=Quarantine(300.0),
        sessions_opened=0,
        sessions_rejected=0,
        inflight=set(),
        costs=RouteCosts(1.0),
    )


def fake_supervisor(app: AppConfig, slots: dict[int, Worker], successors=None, desired: int | None = None):
    return SimpleNamespace(
        app=app,
        desired=len(slots) if desired is None else desired,
        generation=max([w.generation for w in [*slots.values(), *(successors or {}).values()]], default=0),
        reload_note=None,
        slots=slots,
        successors=successors or {},
        restarts={"exited": 2},
        index_restarts={1: 2},
        stopping=False,
        floor=1,  # not an app that scales to zero
        unproven=False,
        scale=lambda n: None,
    )


def test_observation_counts_only_workers_in_service_during_a_reload():
    old0 = worker(0, State.READY, inflight=1)  # in service, busy
    new0 = worker(0, State.STARTING, generation=1)  # its successor, not ready yet
    one = worker(1, State.READY)
    gone = worker(2, State.DRAINING, inflight=1)  # scaled down, finishing its request
    pool = fake_pool([new0, one, gone, old0], depth=3, oldest=2.5)
    sup = fake_supervisor(pool.app, {0: old0, 1: one}, {0: new0}, desired=2)
    app = snapshot.take_app(pool, sup, None, now=100.0, routes=0)
    assert [(w.index, w.generation, w.role) for w in app.workers] == [
        (0, 0, "serving"),
        (0, 1, "successor"),
        (1, 0, "serving"),
        (2, 0, "retiring"),
    ]
    assert (app.ready, app.busy, app.starting, app.reloading) == (2, 1, 1, True)
    assert app.states() == {"busy": 1, "starting": 1, "ready": 1, "draining": 1}
    assert app.restarts_total == 2 and app.workers[2].restarts == 2 and app.ceiling == snapshot.ceiling(pool.app)
    assert observation(app, 100.0) == Observation(100.0, 2, 1, 1, 3, 2.5, 1)


def test_snapshot_of_external_upstreams_has_no_supervisor():
    a, b = worker(0, State.READY), worker(1, State.STOPPED)
    app = snapshot.take_app(fake_pool([b, a]), None, None, now=0.0)
    assert [w.role for w in app.workers] == ["serving", "serving"]
    assert (app.supervised, app.desired, app.ready, app.ceiling, app.autoscale) == (False, 2, 1, None, None)


def test_autoscaler_step_scales_within_its_policy():
    workers = {i: worker(i, State.READY, inflight=1) for i in range(2)}
    pool = fake_pool(list(workers.values()), depth=50, oldest=9.0)
    sup = fake_supervisor(pool.app, workers)
    asked: list[int] = []
    sup.scale = asked.append
    scaler = Autoscaler(pool.app, pool, sup, Policy(1, 3, 1.0, 10.0))
    d = scaler.step(now=10.0)
    assert d.target == 3 and asked == [3] and "50 waiting" in (scaler.last_reason or "")
    snap = snapshot.take_app(pool, sup, scaler, now=10.0)
    assert snap.autoscale == snapshot.AutoscaleSnap(1, 3, 1.0, 10.0, scaler.last_reason)


# --- scale to zero (issue 23, part 3) ------------------------------------------------------------------
ZERO = Policy(min_workers=0, max_workers=4, scale_up_wait=1.0, idle_timeout=10.0)


def test_policy_of_keeps_min_workers_0():
    assert Policy.of(AppConfig(min_workers=0, max_workers=3), cpus=8).min_workers == 0
    assert Policy.of(AppConfig(max_workers=3), cpus=8).min_workers == 1  # autoscaled without a min: 1, as before


def test_the_last_worker_goes_after_idle_timeout_with_min_workers_0():
    d = decide(ZERO, obs(0, 1, busy=1), None)
    d = decide(ZERO, obs(9.9, 1), d.memory)
    assert d.target == 1
    d = decide(ZERO, obs(10, 1), d.memory)
    assert d.target == 0 and (d.reason or "").endswith("scaling to zero")
    assert decide(ZERO, obs(100, 0), d.memory).target == 0  # at zero with nothing waiting: stays there


def test_a_session_or_a_queued_request_keeps_the_last_worker():
    d = decide(ZERO, obs(0, 1, busy=1), None)
    for t in range(1, 60):  # a WebSocket session counts in busy (snapshot.AppSnap.busy): it is use
        d = decide(ZERO, obs(t, 1, busy=1), d.memory)
        assert d.target == 1
    d = decide(ZERO, obs(80, 1, depth=1), d.memory)  # a queued request (the worker is starting, say)
    assert decide(ZERO, obs(89, 1), d.memory).target == 1


def test_a_request_at_zero_starts_one_worker_at_once_however_many_wait():
    d = decide(ZERO, obs(0, 0), None)
    for depth in (1, 40):
        got = decide(ZERO, obs(0.001, 0, depth=depth, wait=0.0), d.memory)
        assert got.target == 1 and (got.reason or "").startswith("cold start:")
    # Once it serves, more come by the usual rule only (scale_up_wait), not one per waiting request.
    d = decide(ZERO, obs(0.001, 0, depth=40), d.memory)
    assert decide(ZERO, obs(0.5, 1, depth=40, starting=1, wait=0.5), d.memory).target == 1
    assert decide(ZERO, obs(3, 1, busy=1, depth=39, wait=2.0), d.memory).target == 2


def test_an_app_that_has_not_shown_it_can_start_is_never_left_at_zero():
    unproven = Observation(now=100, desired=1, starting=0, busy=0, depth=0, oldest_wait=0, unproven=True)
    d = decide(ZERO, unproven, None)
    d = decide(ZERO, replace(unproven, now=1000), d.memory)
    assert d.target == 1  # still trying to start (backoff): /readyz must not call it idle
    assert decide(ZERO, replace(unproven, now=1001, unproven=False, starting=1), d.memory).target == 1  # one starting
    d = decide(ZERO, replace(unproven, now=1001, unproven=False), d.memory)
    assert d.target == 0


def test_snapshot_of_an_app_that_scales_to_zero():
    pool = fake_pool([])
    pool.start_refused = 2
    sup = fake_supervisor(pool.app, {}, desired=0)
    sup.floor, sup.zero_state, sup.idle_since, sup.zero_since, sup.cold = 0, "idle (scaled to zero)", 40.0, 39.0, None
    sup.cold_starts, sup.cold_start_failures, sup.last_cold_start, sup.unproven = 3, 1, 2.5, False
    z = snapshot.take_app(pool, sup, None, now=100.0).zero
    assert z == snapshot.ZeroSnap("idle (scaled to zero)", 60.0, 3, 1, 2.5, 2) and z.idle
    assert not replace(z, state="start failed").idle and replace(z, state="cold start").idle
    assert snapshot.take_app(pool, fake_supervisor(pool.app, {}), None, now=0.0).zero is None  # min_workers >= 1
