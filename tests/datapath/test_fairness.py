"""Fair queueing in the scheduler and its helpers, without sockets or sleeps: clients take turns by cost, FIFO
within one client; a client's share of the queue answers 429; the reserve for other clients; memory follows
what is queued; keys as status shows them."""

from __future__ import annotations

import itertools

import pytest

from corral import config as C
from corral.datapath.costs import LONG, SHORT
from corral.datapath.fairness import OTHERS, FairLane, KeyCounter, header_key, ip_key, origin, shown
from corral.datapath.scheduler import (
    CANCELLED,
    QUEUED,
    RESERVE_IDLE,
    RESERVE_MIN_SHORTS,
    QueueFull,
    Scheduler,
)
from corral.datapath.worker import State, Worker

pytestmark = pytest.mark.unit  # in-process: no child process, no listener (tests/conftest.py)


class J:
    def __init__(self, key: object, name: str = "", cls: int = SHORT, cost: float = 0.0) -> None:
        self.fair_key = key
        self.name = name or f"{key}"
        self.cls = cls
        self.cost = cost
        self.queued_at = 0.0
        self.sched_state = 0
        self.session = False
        self.pin: object = None

    def __repr__(self) -> str:
        return self.name


def sched(n: int, fair: bool = True, **kw) -> tuple[Scheduler, list[Worker]]:
    s = Scheduler(kw.pop("max_queue", 1000), kw.pop("queue_timeout", 30.0), fair=fair, **kw)
    ws = []
    for i in range(n):
        w = Worker("t", i, "127.0.0.1", 9000 + i, 1)
        w.state = State.READY
        s.add_worker(w)
        ws.append(w)
    return s, ws


def drain(s: Scheduler, ws: list[Worker], now: float = 1.0, cost_of=lambda job: 0.05) -> list[J]:
    """Release and pump until nothing waits: the order in which queued jobs reached a worker."""
    order: list[J] = []
    running = {w: None for w in ws}
    t = now
    while s.depth:
        for w in ws:
            if w.inflight:
                job = running[w]
                s.release(w, t, cost_of(job) if job is not None else 0.05, SHORT, getattr(job, "fair_key", None))
        for job, w in s.pump(t):
            order.append(job)
            running[w] = job
        t += 0.1
    return order


# --- turns ----------------------------------------------------------------------------------------
def test_a_polite_client_goes_before_the_busy_clients_later_requests():
    """The issue's case: one client queues many requests, another sends one; the one is next, not last."""
    s, ws = sched(1)
    s.submit(J("busy", "busy0"), 0)  # takes the worker
    heavy = [J("busy", f"busy{i}") for i in range(1, 20)]
    for i, job in enumerate(heavy):
        assert s.submit(job, 0.01 * i) is None
    polite = J("polite")
    assert s.submit(polite, 0.5) is None
    order = drain(s, ws)
    assert order.index(polite) <= 1  # at most the busy client's first turn (one quantum) goes before it
    assert [j for j in order if j is not polite] == heavy  # FIFO within the busy client


def test_without_fair_queueing_the_polite_client_waits_behind_everything():
    """The control: one FIFO (fair_key none), as before."""
    s, ws = sched(1, fair=False)
    s.submit(J(None, "busy0"), 0)
    heavy = [J(None, f"busy{i}") for i in range(1, 20)]
    for job in heavy:
        s.submit(job, 0)
    polite = J(None, "polite")
    s.submit(polite, 0.5)
    assert drain(s, ws)[-1] is polite


def test_clients_take_turns_weighted_by_the_cost_of_their_requests():
    """Both backlogged: a client of 10 ms requests gets about as much worker time as one of 100 ms requests,
    so ten times as many requests."""
    s, ws = sched(1)
    s.submit(J("warm"), 0)
    dear = [J("dear", f"d{i}", cost=0.1) for i in range(60)]
    cheap = [J("cheap", f"c{i}", cost=0.01) for i in range(300)]
    for a, b in itertools.zip_longest(dear, cheap):
        for job in (a, b):
            if job is not None:
                s.submit(job, 0)
    order = drain(s, ws, cost_of=lambda job: getattr(job, "cost", 0.05) or 0.05)
    first = order[:110]
    time_dear = sum(j.cost for j in first if j.fair_key == "dear")
    time_cheap = sum(j.cost for j in first if j.fair_key == "cheap")
    assert 0.7 < time_dear / time_cheap < 1.4, (time_dear, time_cheap)
    assert [j for j in order if j.fair_key == "dear"] == dear and [j for j in order if j.fair_key == "cheap"] == cheap


def test_unknown_costs_take_turns_one_request_each():
    """No learned cost (a cold route, or dispatch fifo): each request counts as one average request, and keys
    that were idle are served in the order they arrived."""
    s, ws = sched(1)
    s.submit(J("warm"), 0)
    for key in "abc":
        for i in range(3):
            s.submit(J(key, f"{key}{i}"), 0)
    names = [j.name for j in drain(s, ws)]
    assert names == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]


def test_a_single_client_is_served_in_arrival_order():
    s, ws = sched(2)
    jobs = [J("only", f"j{i}") for i in range(12)]
    for i, job in enumerate(jobs):
        s.submit(job, i * 0.01)
    assert drain(s, ws) == jobs[2:]


def test_a_dear_request_among_cheap_ones_is_served_within_its_turns():
    """A 30 s job among 1 ms ones: its key earns its turn in a few ring laps at most (the lane jumps ahead
    over the rounds nobody could spend), and no key loops forever."""
    lane = FairLane(QUEUED, quantum=0.001)
    dear = J("dear", cost=30.0)
    dear.sched_state = QUEUED
    lane.push(dear)
    cheap = []
    for i in range(5):
        job = J("cheap", f"c{i}", cost=0.001)
        job.sched_state = QUEUED
        lane.push(job)
        cheap.append(job)
    served = []
    while lane:
        job = lane.head(0.0)
        assert job is not None
        lane.pop_head(job)
        job.sched_state = 0
        served.append(job)
    assert set(served) == {dear, *cheap} and served.index(dear) < len(served)


def test_cancelled_jobs_are_skipped_and_their_keys_dropped():
    s, ws = sched(1)
    s.submit(J("a", "a0"), 0)
    gone = J("b", "gone")
    s.submit(gone, 0)
    kept = J("a", "a1")
    s.submit(kept, 0)
    s.cancel(gone)
    assert gone.sched_state == CANCELLED and s.key_queued == {"a": 1}
    s.release(ws[0], 1, 0.05, SHORT, "a")
    assert s.pump(1) == [(kept, ws[0])]
    s.release(ws[0], 2, 0.05, SHORT, "a")
    assert s.depth == 0 and not s.queues[SHORT] and not s.key_queued and not s.key_inflight


# --- limits ---------------------------------------------------------------------------------------
def test_a_clients_share_of_the_queue_answers_429_and_max_queue_still_503():
    s, _ = sched(1, max_queue=5, max_per_key=3)
    s.submit(J("busy"), 0)
    for _ in range(3):
        s.submit(J("busy"), 0)
    with pytest.raises(QueueFull) as exc:
        s.submit(J("busy"), 0)
    assert exc.value.status == 429 and exc.value.retry_after >= 1 and s.rejected_key == 1
    s.submit(J("other"), 0)
    s.submit(J("third"), 0)
    with pytest.raises(QueueFull) as exc:
        s.submit(J("fourth"), 0)
    assert exc.value.status == 503 and s.rejected == 1


def test_queue_timeout_expires_every_clients_old_requests():
    s, _ = sched(1, queue_timeout=5)
    s.submit(J("a"), 0)
    old_a, old_b, young = J("a", "old_a"), J("b", "old_b"), J("b", "young")
    s.submit(old_a, 1)
    s.submit(old_b, 2)
    s.submit(young, 8)
    assert s.oldest_wait(9) == 8
    assert sorted(s.expire(7.5), key=lambda j: j.name) == [old_a, old_b]
    assert s.key_queued == {"b": 1} and s.depth == 1 and s.oldest_wait(9) == 1


def test_admission_control_does_not_refuse_a_client_for_another_clients_backlog():
    """Cost-aware admission control predicts the wait from the work ahead: under fair queueing, a client's
    own backlog (and as much from each other one), not the busy client's whole queue."""
    s, _ = sched(2, cost_aware=True, queue_timeout=10)
    for i in range(2):
        s.submit(J("busy", f"run{i}", cost=1.0), 0)
    refused = 0
    for i in range(40):
        try:
            s.submit(J("busy", f"b{i}", cost=1.0), 0)
        except QueueFull as full:
            refused += 1
            assert full.status == 503
    assert refused and s.refused_early == refused  # the busy client's own wait is too long
    assert s.submit(J("polite", cost=0.01), 0) is None  # queued, not refused: its turn comes next


# --- the reserve for other clients -------------------------------------------------------------------
def test_while_others_keep_arriving_one_client_leaves_a_worker_free():
    s, ws = sched(4, reserve=1)
    for i in range(RESERVE_MIN_SHORTS):  # another client has been around
        s.submit(J("polite", f"p{i}"), 0.1 * i)
        s.release(s.workers[0] if s.workers[0].inflight else ws[0], 0.1 * i + 0.01, 0.01, SHORT, "polite")
    got = [s.submit(J("busy", f"b{i}"), 1.0) for i in range(8)]
    assert sum(w is not None for w in got) == 3  # capacity - reserve
    assert s.pump(1.0) == []  # the fourth worker stays free for the others
    polite = J("polite", "late")
    assert s.submit(polite, 1.1) is not None  # at once, not behind the busy client's five waiting
    # once the others go quiet, the busy client may take every worker again
    later = 1.1 + 2 * RESERVE_IDLE + 1
    s.release(next(w for w in ws if w.inflight), later, 0.01, SHORT, "polite")
    assert len(s.pump(later)) == 1 and all(w.inflight for w in ws)


def test_a_client_alone_keeps_every_worker():
    s, _ = sched(4, reserve=1)
    got = [s.submit(J("busy", f"b{i}"), 0.1 * i) for i in range(8)]
    assert sum(w is not None for w in got) == 4


# --- lanes and pins still hold ----------------------------------------------------------------------
def test_short_requests_still_go_before_long_ones_and_pins_are_kept():
    s, ws = sched(2, reserve=1, cost_aware=True)
    s.submit(J("a", "a-run"), 0)
    s.submit(J("b", "b-run"), 0)
    long_job = J("a", "long", cls=LONG, cost=2.0)
    short_job = J("b", "short", cost=0.01)
    pinned = J("c", "pinned")
    pinned.pin = ws[1]
    s.submit(long_job, 1)
    s.submit(short_job, 2)
    s.submit(pinned, 3)
    s.release(ws[0], 4, 0.05, SHORT, "a")
    assert s.pump(4) == [(short_job, ws[0])]  # short before long, whatever the key
    s.release(ws[1], 5, 0.05, SHORT, "b")
    assert s.pump(5) == [(pinned, ws[1])]  # the pinned one waits for its own worker, and gets it


# --- windows, keys, display ---------------------------------------------------------------------------
def test_key_counter_keeps_one_to_two_windows_and_a_bounded_number_of_keys():
    c = KeyCounter(5.0, max_keys=3)
    for key in "abcde":
        c.add(key, 1.0, 0.0)
    assert c.of("a", 1) == 1 and c.of(OTHERS, 1) == 2 and c.total(1) == 5 and c.others("a", 1) == 4
    c.add("a", 2.0, 6.0)  # a new window; the first is the previous one
    assert c.of("a", 6) == 3 and c.top(1, 6) == [("a", 3.0)]
    assert c.total(11.5) == 2.0  # the first window is gone
    assert c.total(30) == 0.0


def test_origin_reads_forwarded_for_from_the_right():
    def trusted(ip: str) -> bool:
        return ip.startswith("10.")

    assert origin(b"6.6.6.6, 203.0.113.9, 10.0.0.2", trusted) == b"203.0.113.9"  # the left-most is the client's say
    assert origin(b"203.0.113.9", trusted) == b"203.0.113.9"
    assert origin(b"10.0.0.7, 10.0.0.2", trusted) == b"10.0.0.7"


def test_keys_of_addresses_and_headers():
    cache: dict[bytes, bytes] = {}
    assert ip_key(b"203.0.113.9", cache) == b"203.0.113.9"
    assert ip_key(b"2001:db8:1:2::5", cache) == ip_key(b"2001:db8:1:2:ffff::9", cache) == b"2001:db8:1:2::/64"
    assert ip_key(b"::ffff:203.0.113.9", cache) == b"203.0.113.9"
    assert header_key(b"alice") == b"=alice" and len(header_key(b"x" * 5000)) < 40


def test_status_never_shows_a_whole_address_or_value():
    for key in (b"203.0.113.57", ip_key(b"2001:db8:1:2::5", {}), header_key(b"secret-token-123"), header_key(b"bob")):
        text = shown(key)
        assert key.decode("latin-1").lstrip("=") not in text and "#" in text
    assert shown(b"203.0.113.57").startswith("203.0.113.")
    assert shown(b"203.0.113.57") != shown(b"203.0.113.58")  # the hash tells them apart


def test_heaviest_keys_and_their_share():
    s, ws = sched(2)
    s.submit(J("busy"), 0)
    s.submit(J("polite"), 0)
    s.release(ws[0], 1, 0.9, SHORT, "busy")
    s.release(ws[1], 1, 0.1, SHORT, "polite")
    for _ in range(3):
        s.submit(J("busy"), 1)
    rows = s.heaviest(5, 1)
    assert rows[0][0] == "busy" and rows[0][1] == pytest.approx(0.9) and rows[1] == ("polite", pytest.approx(0.1), 0, 0)


@pytest.mark.parametrize("fair", [True, False])
def test_a_pinned_request_waiting_past_the_queue_timeout_expires(fair):
    """The held line (pins, sessions) is rebuilt by every pump and still expires by queue_timeout."""
    s, ws = sched(2, fair=fair, queue_timeout=5)
    s.submit(J("a", "running"), 0)
    pinned = J("b", "pinned")
    pinned.pin = ws[0]
    assert s.submit(pinned, 1) is None
    s.pump(2)  # rebuilds the held line
    assert s.expire(7) == [pinned] and s.depth == 0


@pytest.mark.parametrize(
    ("fair_key", "cap", "expected"),
    [
        ("ip", None, None),
        ("header:X-Tenant-Id", 10, None),
        ("none", None, None),
        ("header:", None, "fair_key: must be ip, none or header:NAME"),
        ("header:two words", None, "fair_key: must be ip, none or header:NAME"),
        ("cookie", None, "fair_key: must be ip, none or header:NAME"),
        ("none", 10, "max_queue_per_client: needs fair_key ip or header:NAME"),
        ("ip", 2000, "max_queue_per_client: must be <= max_queue (2000 > 1000)"),
    ],
)
def test_the_two_knobs_are_checked(fair_key, cap, expected):
    app = C.AppConfig(command=["true"], fair_key=fair_key, max_queue_per_client=cap)
    found = [p for p in C.validate(C.Config(apps=[app])) if "fair_key" in p or "max_queue_per_client" in p]
    assert found == [] if expected is None else any(expected in p for p in found), found
