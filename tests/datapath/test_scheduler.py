"""The scheduler and the route-cost learner, without sockets or sleeps: time is an argument."""

from __future__ import annotations

import pytest

from corral.datapath.costs import LONG, MAX_ROUTES, SHORT, RouteCosts, route_key
from corral.datapath.scheduler import CANCELLED, DISPATCHED, EXPIRED, QUEUED, RESERVE_MIN_SHORTS, QueueFull, Scheduler
from corral.datapath.worker import State, Worker

pytestmark = pytest.mark.unit  # in-process: no child process, no listener (tests/conftest.py)


class J:
    def __init__(self, name: str, cls: int = SHORT, cost: float = 0.0) -> None:
        self.name = name
        self.cls = cls
        self.cost = cost
        self.queued_at = 0.0
        self.sched_state = 0
        self.session = False
        self.pin: object = None

    def __repr__(self) -> str:
        return self.name


def fleet(n: int, max_inflight: int = 1) -> list[Worker]:
    ws = []
    for i in range(n):
        w = Worker("t", i, "127.0.0.1", 9000 + i, max_inflight)
        w.state = State.READY
        ws.append(w)
    return ws


def sched(n: int, **kw) -> tuple[Scheduler, list[Worker]]:
    s = Scheduler(kw.pop("max_queue", 100), kw.pop("queue_timeout", 30.0), **kw)
    ws = fleet(n, kw.pop("max_inflight", 1) if "max_inflight" in kw else 1)
    for w in ws:
        s.add_worker(w)
    return s, ws


# --- FIFO core ----------------------------------------------------------------------------------
def test_one_per_worker_then_central_fifo():
    s, ws = sched(2)
    a, b, c, d = J("a"), J("b"), J("c"), J("d")
    assert s.submit(a, 0) is ws[0]
    assert s.submit(b, 0) is ws[1]
    assert s.submit(c, 1) is None and s.submit(d, 2) is None
    assert s.depth == 2
    s.release(ws[1], 3)
    assert s.pump(3) == [(c, ws[1])]  # first queued goes to the first worker that frees up
    s.release(ws[0], 4)
    assert s.pump(4) == [(d, ws[0])]
    assert s.depth == 0 and all(w.inflight == 1 for w in ws)


def test_max_inflight_is_never_exceeded_and_least_loaded_wins():
    s = Scheduler(100, 30)
    ws = fleet(2, max_inflight=2)
    for w in ws:
        s.add_worker(w)
    got = [s.submit(J(str(i)), i) for i in range(5)]
    assert got[:4] == [ws[0], ws[1], ws[0], ws[1]] and got[4] is None
    assert max(w.inflight for w in ws) == 2


def test_queue_full_raises_with_retry_after():
    s, _ws = sched(1, max_queue=1)
    s.submit(J("busy"), 0)
    s.submit(J("waits"), 0)
    with pytest.raises(QueueFull) as exc:
        s.submit(J("refused"), 0)
    assert exc.value.retry_after >= 1 and s.rejected == 1


def test_expire_and_cancel():
    s, ws = sched(1, queue_timeout=5)
    s.submit(J("busy"), 0)
    gone, old, young = J("gone"), J("old"), J("young")
    s.submit(gone, 0)
    s.submit(old, 1)
    s.submit(young, 4)
    s.cancel(gone)
    assert gone.sched_state == CANCELLED and s.depth == 2
    assert s.expire(6.5) == [old] and old.sched_state == EXPIRED
    assert s.timed_out == 1 and young.sched_state == QUEUED
    s.release(ws[0], 7)
    assert s.pump(7) == [(young, ws[0])]  # the cancelled one never reached a worker


def test_requeue_front_goes_first():
    s, ws = sched(1)
    s.submit(J("busy"), 0)
    first, retried = J("first"), J("retried")
    s.submit(first, 1)
    s.release(ws[0], 2)
    assert s.requeue_front(retried, 2) is ws[0]  # a free worker: straight there
    s.release(ws[0], 3)
    ws[0].state = State.UNHEALTHY
    again = J("again")
    assert s.requeue_front(again, 3) is None
    ws[0].state = State.READY
    assert [j for j, _ in s.pump(4)] == [again]


def test_unroutable_and_probing_workers_are_passed_over():
    s, ws = sched(3)
    ws[0].state = State.DRAINING
    ws[1].probing = True
    assert s.submit(J("a"), 0) is ws[2]
    assert s.submit(J("b"), 0) is None


# --- cost-aware dispatch ------------------------------------------------------------------------
def test_long_requests_leave_the_reserve_to_short_ones():
    s, _ws = sched(4, reserve=1, cost_aware=True)
    for i in range(RESERVE_MIN_SHORTS):  # short traffic is around
        s.submit(J(f"s{i}", SHORT, 0.005), i * 0.01)
        s.release(s.workers[0], i * 0.01 + 0.005)
    longs = [J(f"L{i}", LONG, 2.0) for i in range(4)]
    placed = [s.submit(j, 0.0) for j in longs]
    assert placed[3] is None and all(placed[:3])  # the 4th long waits: one worker is reserved
    short = J("s", SHORT, 0.005)
    assert s.submit(short, 0.1) is not None  # served at once on the reserve


def test_short_requests_go_ahead_of_queued_long_ones():
    s, ws = sched(2, reserve=0, cost_aware=True)
    s.submit(J("L0", LONG, 2), 0)
    s.submit(J("L1", LONG, 2), 0)
    waiting_long = J("L2", LONG, 2)
    s.submit(waiting_long, 0.5)
    short = J("s", SHORT, 0.01)
    s.submit(short, 1.0)
    s.release(ws[0], 2.0, cls=LONG)
    assert [j for j, _ in s.pump(2.0)] == [short]


def test_ageing_lets_a_long_request_pass_short_ones_eventually():
    s, ws = sched(1, reserve=0, cost_aware=True, long_bias=3.0)
    s.submit(J("busy", SHORT, 0.01), 0)
    old_long = J("L", LONG, 2)
    s.submit(old_long, 0.0)
    s.submit(J("s1", SHORT, 0.01), 1.0)  # arrived within the bias: goes first
    s.release(ws[0], 1.1)
    assert [j.name for j, _ in s.pump(1.1)] == ["s1"]
    s.submit(J("s2", SHORT, 0.01), 4.0)  # arrived after L's place (0 + 3): L goes first
    s.release(ws[0], 4.1)
    assert [j for j, _ in s.pump(4.1)] == [old_long]


def test_no_starvation_under_a_stream_of_short_requests():
    s, ws = sched(2, reserve=1, cost_aware=True, long_bias=1.0)
    long_job = J("L", LONG, 2)
    t = 0.0
    s.submit(J("s-first", SHORT, 0.1), t)
    s.submit(J("s-second", SHORT, 0.1), t)
    s.submit(long_job, t)
    for step in range(100):  # a short arrives and one finishes every 0.1 s
        t += 0.1
        s.submit(J(f"s{step}", SHORT, 0.1), t)
        busy = next(w for w in ws if w.inflight)
        s.release(busy, t)
        s.pump(t)
        if long_job.sched_state == DISPATCHED:
            break
    assert long_job.sched_state == DISPATCHED and t <= 1.5


def test_reserve_is_lent_out_when_no_short_requests_come():
    s, ws = sched(2, reserve=1, cost_aware=True)
    for i in range(RESERVE_MIN_SHORTS):
        s.submit(J(f"s{i}", SHORT, 0.01), i * 0.1)
        s.release(ws[0], i * 0.1 + 0.01)
    assert s.submit(J("L0", LONG, 2), 1.0) is not None
    assert s.submit(J("L1", LONG, 2), 1.0) is None  # shorts were seen lately: the reserve holds
    assert s.pump(10.0)  # long after the last short: the reserve is lent
    assert sum(w.inflight for w in ws) == 2


def test_a_trickle_of_short_requests_does_not_hold_the_reserve():
    s, ws = sched(3, reserve=1, cost_aware=True)
    t = 0.0
    for i in range(RESERVE_MIN_SHORTS - 1):  # a short every 1.2 s: under the ~1/s that keeps the reserve
        s.submit(J(f"s{i}", SHORT, 0.01), t)
        s.release(ws[0], t + 0.01)
        t += 1.2
    longs = [s.submit(J(f"L{i}", LONG, 2), t) for i in range(3)]
    assert all(longs)  # every worker: a long load keeps its capacity
    s.release(longs[0], t + 0.1, cls=LONG)
    assert s.submit(J("s-fifth", SHORT, 0.01), t + 0.1) is longs[0]  # 5 shorts within 5 s: the reserve is back
    s.release(longs[0], t + 0.11)
    assert s.submit(J("L3", LONG, 2), t + 0.11) is None  # so this long leaves the idle worker to short ones
    assert sum(w.inflight == 0 for w in ws) == 1


def test_fifo_policy_ignores_classes():
    s, _ws = sched(2, reserve=1, cost_aware=False)
    assert s.submit(J("L0", LONG, 2), 0) and s.submit(J("L1", LONG, 2), 0)


def test_admission_control_refuses_at_once_with_a_predicted_retry_after():
    s, _ws = sched(2, reserve=0, cost_aware=True, queue_timeout=3.0)
    for i in range(2):
        s.submit(J(f"run{i}", LONG, 2.0), 0.0)
    for i in range(2):
        s.submit(J(f"q{i}", LONG, 2.0), 0.0)  # predicted start: 2 s, within the timeout
    with pytest.raises(QueueFull) as exc:
        s.submit(J("late", LONG, 2.0), 0.0)  # (2 + 2) running + (2 + 2) queued over 2 slots = 4 s > 3 s
    assert exc.value.retry_after == 4 and s.refused_early == 1


def test_with_no_worker_ready_requests_queue_instead_of_being_refused_on_a_prediction():
    # #13: zero capacity made the predicted wait infinite, and math.ceil(inf) killed the connection
    s = Scheduler(100, 30.0, reserve=1, cost_aware=True)
    starting = fleet(1)[0]
    starting.state = State.STARTING
    s.add_worker(starting)
    jobs = [J("short", SHORT, 0.1), J("long", LONG, 50.0), J("unknown")]
    assert [s.submit(j, 0.0) for j in jobs] == [None, None, None]
    assert s.depth == 3 and s.refused_early == 0
    assert 1 <= s.retry_after() < 3600
    starting.state = State.READY
    assert s.pump(1.0) == [(jobs[0], starting)]  # they waited; the first worker up takes the first
    assert sorted(j.name for j in s.expire(31.0)) == ["long", "unknown"]  # still bounded by queue_timeout


def test_with_no_worker_ready_the_queue_is_still_bounded_by_max_queue():
    s = Scheduler(2, 30.0, cost_aware=True)
    s.submit(J("a"), 0.0)
    s.submit(J("b"), 0.0)
    with pytest.raises(QueueFull) as exc:
        s.submit(J("c"), 0.0)
    assert exc.value.reason == "all workers busy and the queue is full" and exc.value.retry_after >= 1


def test_retry_after_is_finite_whatever_the_estimates():
    s, _ws = sched(1, cost_aware=True, queue_timeout=1.0)
    s.service_ewma = float("inf")
    assert s.retry_after() == 3600
    s.service_ewma = float("nan")
    assert s.retry_after() == 3600
    s.submit(J("run", LONG, 1e308), 0.0)
    with pytest.raises(QueueFull) as exc:
        s.submit(J("late", LONG, 1e308), 0.0)  # a prediction past any useful Retry-After
    assert exc.value.retry_after == 3600


# --- the learner --------------------------------------------------------------------------------
def test_route_keys_collapse_ids():
    assert route_key(b"GET", b"/users/42/orders?x=1") == "GET /users/:id/orders"
    assert route_key(b"GET", b"/item/3f2a9c1e-0b1d-4c3e-9f00-1a2b3c4d5e6f") == "GET /item/:id"
    assert route_key(b"POST", b"/fit") == "POST /fit"
    assert route_key(b"GET", b"/") == "GET /"


def test_learner_classifies_and_relearns():
    c = RouteCosts(long_threshold=0.5)
    for _ in range(3):
        c.observe("GET /fit", 2.0)
        c.observe("GET /fast", 0.003)
    assert c.classify("GET /fit")[0] == LONG and c.classify("GET /fast")[0] == SHORT
    assert c.classify("GET /new") == (SHORT, 0.0)  # unknown: short, no cost yet
    for _ in range(20):
        c.observe("GET /fit", 0.01)  # it got fast: re-learned
    assert c.classify("GET /fit")[0] == SHORT
    row = next(r for r in c.table() if r["route"] == "GET /fast")
    assert row["count"] == 3 and row["class"] == "short" and row["p99_s"] == pytest.approx(0.003)


def test_learner_memory_is_bounded():
    c = RouteCosts(0.5)
    for i in range(MAX_ROUTES * 3):
        c.observe(f"GET /p{'x' * (i % 7)}/{chr(97 + i % 26)}{i // 26}q", 0.01)
    assert len(c.routes) <= MAX_ROUTES + 1


def test_declared_route_classes_win():
    c = RouteCosts(0.5, long_routes=["POST /fit*"], short_routes=["/health"])
    assert c.classify("POST /fit/model")[0] == LONG
    for _ in range(5):
        c.observe("GET /health", 3.0)
    assert c.classify("GET /health")[0] == SHORT


def test_a_route_running_long_is_long_before_it_has_finished_once():
    c = RouteCosts(long_threshold=0.5)
    c.running_long("GET /fit", 0.2)
    assert c.classify("GET /fit")[0] == SHORT  # not past the threshold yet
    c.running_long("GET /fit", 0.6)
    assert c.classify("GET /fit")[0] == LONG  # cold start: no request of it has finished
    c.observe("GET /fit", 2.0)
    assert c.classify("GET /fit")[0] == LONG
    for _ in range(20):
        c.observe("GET /fit", 0.01)
    assert c.classify("GET /fit")[0] == SHORT  # and it is re-learned when it gets fast


def test_queued_work_is_accounted_through_every_way_out_of_the_queue():
    s, ws = sched(1, reserve=0, cost_aware=True, queue_timeout=30.0)
    s.submit(J("run", LONG, 2.0), 0.0)
    gone, old, served = J("gone", LONG, 2.0), J("old", SHORT, 0.5), J("served", LONG, 2.0)
    for j in (gone, old, served):
        s.submit(j, 0.0)
    assert s.queued_cost == [0.5, 4.0]
    s.cancel(gone)
    assert s.predicted_wait(J("probe", LONG, 1.0), 0.0) == pytest.approx(0.5 + 2.0 + 2.0)
    s.release(ws[0], 1.0, cls=LONG)
    assert [j for j, _ in s.pump(1.0)] == [old]
    s.release(ws[0], 1.5)
    assert [j for j, _ in s.pump(1.5)] == [served]
    assert s.queued_cost == [0.0, 0.0] and s.depth == 0


# --- a start from zero (issue 23, part 3) ---------------------------------------------------------
@pytest.mark.parametrize("fair", [False, True])
def test_jobs_waiting_for_a_start_from_zero_count_their_timeout_from_when_it_ends(fair):
    s = Scheduler(100, 5.0, fair=fair)  # no worker at all: scaled to zero
    jobs = [J(f"j{i}") for i in range(3)]
    for i, j in enumerate(jobs):
        j.fair_key = b"k%d" % (i % 2)
        assert s.submit(j, float(i)) is None
    s.wait_from = float("inf")  # the pool: a worker is starting for them
    assert s.expire(60.0) == [] and s.depth == 3  # a long start: not a queue timeout
    s.wait_from = 60.0  # the worker was ready at 60 s, with room for none of them (say)
    assert s.expire(64.9) == []
    late = J("late")
    late.fair_key = b"k0"
    s.submit(late, 62.0)
    assert sorted(j.name for j in s.expire(65.0)) == ["j0", "j1", "j2"]  # 5 s after the start, not after arrival
    assert [j.name for j in s.expire(67.0)] == ["late"] and s.depth == 0


@pytest.mark.parametrize("fair", [False, True])
def test_flush_hands_back_every_waiting_job_once(fair):
    s = Scheduler(100, 30.0, fair=fair)
    a, b, pinned, gone = J("a"), J("b", LONG), J("pinned"), J("gone")
    pinned.pin = 0  # a sticky one waits in `held`
    for j in (a, b, pinned, gone):
        j.fair_key = b"k"
        s.submit(j, 0.0)
    s.cancel(gone)
    out = s.flush()
    assert sorted(j.name for j in out) == ["a", "b", "pinned"] and all(j.sched_state == EXPIRED for j in out)
    assert s.depth == 0 and s.flush() == [] and s.timed_out == 0  # not a queue timeout
