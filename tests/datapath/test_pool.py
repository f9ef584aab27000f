"""Pool in-process: dispatch, connection reuse, probes, unreachable workers, EMFILE, state changes.

The fakes (FakeLoop, FakeTransport, FakeClient, Rig) and the `settled` invariants come from
tests/support/exchange_rig.py. Connections open when the test runs the loop's tasks (`rig.loop.run()`), so a test can
act while one is still being opened; timers (sit-out, probe grace) fire when it calls `rig.loop.fire()`.
"""

from __future__ import annotations

import errno
import time

import pytest
from support.exchange_rig import FakeClient, Rig, get, ok, reused, settled

from corral.datapath.costs import LONG
from corral.datapath.pool import PROBE_GRACE
from corral.datapath.scheduler import QUEUED
from corral.datapath.worker import State

pytestmark = pytest.mark.unit  # in-process: no child process, no listener (tests/conftest.py)


def refused() -> OSError:
    return ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")


def emfile() -> OSError:
    return OSError(errno.EMFILE, "Too many open files")


def answer(ex, body: bytes = b"hello") -> None:
    conn = ex.upstream
    assert conn is not None, "the exchange holds no worker connection"
    conn.data_received(ok(body))
    ex.client.rig.loop.run()  # a request the release dispatched may need a connection opened


# --- dispatch and connection reuse --------------------------------------------------------------------
def test_one_worker_serves_the_queue_in_order_on_one_connection():
    rig = Rig()
    exs = [rig.request(get(f"/{i}")) for i in range(4)]
    assert [ex.sched_state == QUEUED for ex in exs] == [False, True, True, True]
    conn = exs[0].upstream
    for i, ex in enumerate(exs):
        assert ex.upstream is conn, "the worker's one connection carries every request"
        answer(ex, str(i).encode())
        assert ex.client.response().body == str(i).encode()
    sent = conn.transport.data
    at = [sent.find(f"GET /{i} ".encode()) for i in range(4)]
    assert -1 not in at and at == sorted(at)
    assert len(rig.loop.upstreams) == 1 and reused(rig, conn)
    settled(rig)


def test_requests_spread_over_workers_one_connection_each():
    rig = Rig(workers=3)
    exs = [rig.request() for _ in range(3)]
    assert {ex.upstream.worker.index for ex in exs} == {0, 1, 2}
    for ex in exs:
        answer(ex)
    again = [rig.request() for _ in range(3)]
    assert len(rig.loop.upstreams) == 3  # every worker's connection was reused
    for ex in again:
        answer(ex)
    settled(rig)


def test_max_inflight_bounds_the_connections_per_worker():
    rig = Rig(max_inflight=2)
    a, b, c = rig.request(), rig.request(), rig.request()
    w = rig.workers[0]
    assert w.inflight == 2 and c.sched_state == QUEUED
    assert len(rig.connections(w)) == 2
    answer(b)
    assert c.upstream is not None and c.upstream.worker is w
    answer(a)
    answer(c)
    assert len(rig.loop.upstreams) == 2
    settled(rig)


def test_no_ready_worker_queues_until_one_is():
    rig = Rig(dispatch="cost")
    w = rig.workers[0]
    rig.pool.set_state(w, State.STARTING)
    ex = rig.request()
    assert ex.sched_state == QUEUED and not ex.ended
    rig.pool.set_state(w, State.READY)
    rig.loop.run()
    answer(ex)
    assert ex.client.response().status == 200
    settled(rig)


def test_cost_dispatch_learns_and_keeps_the_scheduler_consistent():
    rig = Rig(workers=2, dispatch="cost", long_routes=["/slow"])
    slow = rig.request(get("/slow"))
    fast = rig.request(get("/fast"))
    assert slow.cls == LONG and rig.pool.scheduler.long_inflight == 1
    assert slow.upstream is not None and fast.upstream is not None
    answer(fast)
    answer(slow)
    assert rig.pool.costs.table()
    settled(rig)


# --- probes --------------------------------------------------------------------------------------------
def test_a_due_probe_goes_before_the_next_request():
    rig = Rig()
    w = rig.workers[0]
    first = rig.request()
    second = rig.request()
    w.probe_due = True  # HealthChecker found the busy worker due
    conn = first.upstream
    answer(first)
    assert rig.probes == [(w, 0)], "the probe starts once the worker holds nothing"
    assert second.sched_state == QUEUED and w.inflight == 0
    assert reused(rig, conn)  # (HealthChecker closes idle connections itself)
    rig.probe_done(w)
    assert second.upstream is conn
    answer(second)
    settled(rig)


def test_a_due_probe_starts_even_with_an_empty_queue():
    rig = Rig()
    w = rig.workers[0]
    ex = rig.request()
    w.probe_due = True
    answer(ex)
    assert rig.probes == [(w, 0)]
    rig.probe_done(w)
    settled(rig)


def test_no_probe_while_the_worker_still_holds_a_request():
    rig = Rig(max_inflight=2)
    w = rig.workers[0]
    a, b = rig.request(), rig.request()
    w.probe_due = True
    answer(a)
    assert rig.probes == []
    answer(b)
    assert rig.probes == [(w, 0)]
    rig.probe_done(w)
    settled(rig)


def test_a_probe_gives_way_to_a_request_after_the_grace():
    rig = Rig()
    w = rig.workers[0]
    w.probing = True
    w.probe_started = time.monotonic()
    ex = rig.request()
    assert ex.sched_state == QUEUED
    [timer] = [t for t in rig.loop.timers if not t.cancelled]
    assert timer.delay == PROBE_GRACE
    rig.loop.fire()
    rig.loop.run()
    assert not w.probing and ex.upstream is not None
    answer(ex)
    settled(rig)


# --- workers that cannot be reached --------------------------------------------------------------------
def test_connect_failure_retries_on_another_worker_at_once():
    rig = Rig(workers=2)
    rig.loop.errors[9000] = [refused()]
    ex = rig.request()
    w0, w1 = rig.workers
    assert ex.upstream is not None and ex.upstream.worker is w1
    assert rig.unreachable == [w0] and w0.state is State.UNHEALTHY
    assert rig.pool.retried == 1 and w0.inflight == 0 and w0.failed == 0
    assert rig.connects[id(ex)] == 2 and rig.frees[id(ex)] == 1
    answer(ex)
    settled(rig)


def test_connect_failure_requeues_at_the_front():
    rig = Rig(workers=2)
    w0, w1 = rig.workers
    holder = rig.request(get("/holder"))
    assert holder.upstream is not None and holder.upstream.worker is w0
    rig.loop.errors[9001] = [refused()]
    retried = rig.request(get("/retried"), run=False)  # to w1, still connecting
    later = rig.request(get("/later"), run=False)  # arrives after it: queued
    assert later.sched_state == QUEUED
    rig.loop.run()  # w1 refuses
    assert w1.state is State.UNHEALTHY and retried.sched_state == QUEUED
    answer(holder)  # w0 frees: the request that was refused goes first
    assert retried.upstream is not None and retried.upstream.worker is w0
    assert later.sched_state == QUEUED
    answer(retried)
    answer(later)
    assert later.client.response().status == 200
    settled(rig)


def test_emfile_on_connect_answers_503_and_never_marks_the_worker(capsys):
    rig = Rig()
    w = rig.workers[0]
    rig.loop.errors[9000] = [emfile(), emfile()]
    first, second = rig.request(), rig.request()
    for ex in (first, second):
        resp = ex.client.response()
        assert resp.status == 503 and resp.headers[b"retry-after"] == b"1"
    assert w.state is State.READY and w.failed == 0 and not w.sitting_out
    assert rig.unreachable == [] and rig.pool.retried == 0
    assert capsys.readouterr().out.count("out of file descriptors") == 1  # once per interval, not per request
    third = rig.request()  # descriptors are back
    answer(third)
    settled(rig)


def test_connection_opened_after_the_client_left_is_kept_for_the_next_request():
    rig = Rig()
    ex = rig.request(run=False)
    ex.client_left()
    assert rig.workers[0].inflight == 0
    rig.loop.run()
    [conn] = rig.loop.upstreams
    assert reused(rig, conn) and conn.transport.data == b""
    nxt = rig.request()
    assert nxt.upstream is conn
    answer(nxt)
    settled(rig)


def test_connection_opened_after_a_request_timeout_is_closed():
    rig = Rig()
    ex = rig.request(run=False)
    rig.pool.expire(time.monotonic() + rig.app.request_timeout + 1)
    assert ex.client.response().status == 504
    rig.loop.run()
    [conn] = rig.loop.upstreams
    assert conn.transport.closed  # its worker is out of rotation
    settled(rig)


def test_connect_refused_after_the_client_left_releases_the_slot_once():
    """BUG: a connect that fails after its exchange ended frees the worker's slot a second time.

    The client leaves while the connection is being opened: end() releases the slot. The connect then
    fails and Pool._unreached calls _free_slot again: worker.inflight goes to -1, and the worker takes
    max_inflight + 1 requests from then on.
    """
    rig = Rig()
    w = rig.workers[0]
    rig.loop.errors[9000] = [refused()]
    ex = rig.request(run=False)
    ex.client_left()
    assert w.inflight == 0
    rig.loop.run()
    assert w.inflight == 0, f"slot released twice: inflight {w.inflight}"
    settled(rig)


def test_emfile_after_a_request_timeout_writes_nothing_more():
    """BUG (same root): the request timed out while connecting (504 written, exchange ended); the connect
    then fails with EMFILE and _unreached frees the slot again and writes a 503 after the 504, on a
    keep-alive client connection: the client would read it as the answer to its next request."""
    rig = Rig()
    w = rig.workers[0]
    rig.loop.errors[9000] = [emfile()]
    client = FakeClient(rig)
    ex = rig.request(client=client, run=False)
    rig.pool.expire(time.monotonic() + rig.app.request_timeout + 1)
    assert client.response().status == 504 and client.keep() is True
    rig.loop.run()
    assert client.late == [], f"written after the exchange ended: {client.late!r}"
    assert w.inflight == 0, f"slot released twice: inflight {w.inflight}"
    assert ex.status == 504
    settled(rig)


def test_a_connection_opened_for_a_gone_client_is_not_a_second_one():
    """BUG: a worker can be left with more connections than max_inflight.

    The first request's client leaves while its connection is being opened; the slot is freed and the
    queued request is dispatched to the same worker, with no idle connection yet, so a second one is
    opened. The first connection then completes and is kept idle. A server that serves one connection
    at a time (tests/support/stub_worker.py, many dev servers) may be blocked reading the idle one while the
    request waits on the other, until request_timeout.
    """
    rig = Rig()
    w = rig.workers[0]
    first = rig.request(get("/first"), run=False)
    second = rig.request(get("/second"), run=False)
    assert second.sched_state == QUEUED
    first.client_left()
    rig.loop.run()
    assert second.upstream is not None
    assert len(rig.connections(w)) <= w.max_inflight, f"{len(rig.connections(w))} connections to a 1-slot worker"
    answer(second)
    settled(rig)


# --- workers that fail or leave rotation -----------------------------------------------------------------
def test_a_worker_that_drops_a_request_sits_out_a_moment():
    rig = Rig(workers=2)
    w0, w1 = rig.workers
    dropped = rig.request()
    assert dropped.upstream is not None and dropped.upstream.worker is w0
    dropped.upstream.transport.lose()
    assert dropped.client.response().status == 502
    assert w0.sitting_out and w0.state is State.READY
    nxt = rig.request()
    assert nxt.upstream is not None and nxt.upstream.worker is w1  # passed over while it sits out
    waiting = rig.request()
    assert waiting.sched_state == QUEUED
    assert rig.loop.fire() == 1  # the sit-out ends and the queue moves
    rig.loop.run()
    assert not w0.sitting_out
    assert waiting.upstream is not None and waiting.upstream.worker is w0
    answer(nxt)
    answer(waiting)
    settled(rig)


def test_an_external_worker_that_drops_a_request_is_out_until_a_probe_answers():
    rig = Rig(workers=2)
    w0 = rig.workers[0]
    w0.external = True
    ex = rig.request()
    assert ex.upstream is not None and ex.upstream.worker is w0
    ex.upstream.transport.lose()
    assert rig.unreachable == [w0] and w0.state is State.UNHEALTHY
    assert ex.client.response().status == 502
    settled(rig)


def test_a_hung_worker_is_out_before_its_slot_is_freed():
    rig = Rig(workers=2)
    w0, w1 = rig.workers
    hung = rig.request()
    busy = rig.request()
    waiting = rig.request()
    assert hung.upstream.worker is w0 and busy.upstream.worker is w1
    hung.dispatched_at -= rig.app.request_timeout + 1  # only this one is past its deadline
    hung.body_done_at -= rig.app.request_timeout + 1
    rig.expire(0)
    assert rig.hung == [w0] and w0.state is State.UNHEALTHY
    assert hung.client.response().status == 504
    assert waiting.sched_state == QUEUED, "the freed slot went straight back to the hung worker"
    answer(busy)
    assert waiting.upstream is not None and waiting.upstream.worker is w1
    answer(waiting)
    settled(rig)


def test_a_draining_worker_finishes_and_keeps_its_connection_until_stopped():
    rig = Rig(workers=2)
    w0, w1 = rig.workers
    ex = rig.request()
    conn = ex.upstream
    assert conn is not None and conn.worker is w0
    rig.pool.set_state(w0, State.DRAINING)
    nxt = rig.request()
    assert nxt.upstream is not None and nxt.upstream.worker is w1  # no new work for a draining worker
    answer(ex)
    assert ex.client.response().status == 200
    assert reused(rig, conn)
    rig.pool.set_state(w0, State.STOPPING)
    assert conn.transport.closed and conn not in w0.idle
    answer(nxt)
    settled(rig)


def test_a_connection_finishing_on_an_unhealthy_worker_is_closed():
    rig = Rig()
    w = rig.workers[0]
    ex, conn = rig.dispatched()
    w.state = State.UNHEALTHY  # as a failed probe would leave it, the request still running
    rig.pool.scheduler.remove_worker(w)
    answer(ex)
    assert ex.client.response().status == 200
    assert conn.transport.closed and w.idle == []
    settled(rig)


def test_unhealthy_closes_idle_connections_and_forget_drops_the_worker():
    rig = Rig(workers=2)
    w0 = rig.workers[0]
    ex = rig.request()
    conn = ex.upstream
    answer(ex)
    assert reused(rig, conn)
    rig.pool.set_state(w0, State.UNHEALTHY)
    assert conn.transport.closed and w0.idle == []
    rig.pool.forget(w0)
    assert w0 not in rig.pool.workers and w0 not in rig.pool.scheduler.workers
    nxt = rig.request()
    assert nxt.upstream is not None and nxt.upstream.worker is rig.workers[1]
    answer(nxt)
    settled(rig)
