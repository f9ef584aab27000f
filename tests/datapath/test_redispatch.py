"""A request whose worker connection breaks under it, on the in-process rig (tests/support/exchange_rig.py): it
waits for the supervisor's word on how the worker ended, then goes once to another worker (killed from
outside) or gets 502 (died on its own, or closed the connection and lives on). The system tests, with real
SIGKILLs, are in test_retry.py."""

from __future__ import annotations

import pytest
from support.exchange_rig import Rig, get, ok, post, settled

from corral.datapath.worker import DIED, KILLED, STOPPED, State, Worker

pytestmark = pytest.mark.unit


class Proc:
    """A live process, as far as `worker.proc.poll()` can tell: the rig's workers are supervised ones."""

    pid = 4242

    def poll(self) -> None:
        return None


def supervised(rig: Rig) -> Rig:
    for w in rig.workers:
        w.proc = Proc()  # type: ignore[assignment]
    return rig


def exits(rig: Rig, worker: Worker, cause: str) -> None:
    """What Supervisor._after_exit does once it has reaped the worker."""
    worker.exit_cause = cause
    rig.pool.set_state(worker, State.STOPPED)
    rig.pool.forget(worker)
    rig.pool.worker_exited(worker)
    rig.loop.run()


def test_killed_from_outside_the_request_goes_to_another_worker_and_is_counted_once():
    rig = supervised(Rig(workers=2))
    ex, conn = rig.dispatched(get("/x"))
    first = conn.worker
    conn.transport.lose()
    assert not ex.ended and ex.worker is None and first.awaiting == [ex]  # waiting for the verdict
    exits(rig, first, KILLED)
    second = ex.upstream
    assert second is not None and second.worker is not first
    second.data_received(ok(b"again"))
    r = ex.client.response()
    assert r.status == 200 and r.body == b"again"
    assert ex.redispatched and rig.pool.redispatched == 1 and rig.pool.failed == 0
    assert first.failed == 0  # a kill from outside is not the worker's failure
    settled(rig)
    assert rig.connects[id(ex)] == 2 and len(rig.observed) == 1


def test_the_verdict_known_before_the_socket_closes_is_used_at_once():
    rig = supervised(Rig(workers=2))
    ex, conn = rig.dispatched(get("/x"))
    conn.worker.exit_cause = KILLED  # reaped first: the socket's close comes after
    conn.transport.lose()
    rig.loop.run()
    assert ex.upstream is not None and ex.upstream.worker is not conn.worker


@pytest.mark.parametrize("cause", [DIED, STOPPED])
def test_a_worker_that_died_on_its_own_or_was_stopped_by_corral_costs_a_502(cause):
    rig = supervised(Rig(workers=2))
    ex, conn = rig.dispatched(get("/x"))
    conn.transport.lose()
    exits(rig, conn.worker, cause)
    assert ex.client.response().status == 502 and rig.pool.failed == 1 and conn.worker.failed == 1
    assert rig.connects[id(ex)] == 1
    settled(rig)


def test_a_worker_that_closes_the_connection_and_lives_on_costs_a_502_once_the_wait_is_over():
    rig = supervised(Rig(workers=2))
    ex, conn = rig.dispatched(get("/x"))
    conn.transport.lose()
    assert not ex.ended
    rig.loop.fire()  # EXIT_WAIT passes with no exit (and the sit-out ends)
    assert ex.client.response().status == 502 and conn.worker.failed == 1 and rig.connects[id(ex)] == 1
    exits(rig, conn.worker, KILLED)  # a late verdict changes nothing
    settled(rig)


def test_a_post_is_not_sent_again_but_one_with_idempotency_key_is():
    rig = supervised(Rig(workers=2))
    ex, conn = rig.dispatched(post(b"data"))
    conn.transport.lose()
    assert ex.client.response().status == 502  # at once: no verdict can make it safe
    keyed, conn2 = rig.dispatched(post(b"data", headers="Idempotency-Key: 7\r\n"))
    conn2.transport.lose()
    exits(rig, conn2.worker, KILLED)
    rig.loop.fire()  # the first worker's sit-out (it dropped the first POST) ends
    rig.loop.run()
    assert keyed.upstream is not None and keyed.upstream.worker is conn.worker
    keyed.upstream.data_received(ok())
    assert keyed.client.response().status == 200
    settled(rig)


def test_sent_once_more_at_most():
    rig = supervised(Rig(workers=3))
    ex, conn = rig.dispatched(get("/x"))
    conn.transport.lose()
    exits(rig, conn.worker, KILLED)
    again = ex.upstream
    assert again is not None
    again.transport.lose()  # its second worker goes too: no third try
    assert ex.client.response().status == 502 and rig.connects[id(ex)] == 2
    exits(rig, again.worker, KILLED)
    settled(rig)
    assert rig.pool.quarantine.entries  # and it is quarantined: it was on two workers that died


def test_a_route_with_retry_off_gets_502():
    rig = supervised(Rig(workers=2, no_retry_routes=["GET /report*"]))
    ex, conn = rig.dispatched(get("/report/7"))
    conn.transport.lose()
    assert ex.client.response().status == 502
    settled(rig)


def test_a_response_already_begun_is_never_sent_again():
    rig = supervised(Rig(workers=2))
    ex, conn = rig.dispatched(get("/x"))
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    conn.transport.lose()
    exits(rig, conn.worker, KILLED)
    assert ex.cut and rig.connects[id(ex)] == 1 and bytes(ex.client.out).endswith(b"abc")
    settled(rig)


def test_a_client_that_leaves_while_the_request_waits_for_the_verdict_ends_it_once():
    rig = supervised(Rig(workers=2))
    ex, conn = rig.dispatched(get("/x"))
    conn.transport.lose()
    ex.client_left()
    exits(rig, conn.worker, KILLED)
    assert ex.outcome == "abandoned" and rig.connects[id(ex)] == 1
    settled(rig)


def test_the_request_goes_first_in_line_and_keeps_its_queue_clock():
    rig = supervised(Rig(workers=2))
    ex, conn = rig.dispatched(get("/x"))
    _, busy_conn = rig.dispatched(get("/busy"))
    waiting = rig.request(get("/next"))  # queued: both workers are taken
    conn.transport.lose()
    arrived = ex.queued_at
    exits(rig, conn.worker, KILLED)  # the only other worker is busy: back in the queue, at its front
    busy_conn.data_received(ok())
    assert ex.upstream is not None and waiting.upstream is None  # it went before the one queued earlier
    assert ex.queued_at == arrived  # queue_timeout counts from its arrival still
    ex.upstream.data_received(ok())
    waiting.upstream.data_received(ok())
    settled(rig)


def test_an_unsupervised_worker_costs_a_502_at_once():
    rig = Rig(workers=2)  # no process: an --upstream worker, whose end corral cannot know
    ex, conn = rig.dispatched(get("/x"))
    conn.transport.lose()
    assert ex.client.response().status == 502
    settled(rig)


def test_a_kill_seen_first_as_a_stale_kept_alive_connection_still_goes_to_another_worker():
    # The worker's socket closed before its exit could be seen: to corral it looks like a kept-alive connection
    # the worker closed while idle, so the request goes again to the same worker, whose socket now refuses.
    rig = supervised(Rig(workers=2, dispatch="fifo"))
    _, conn = rig.dispatched(get("/warm"))
    conn.data_received(ok())
    worker = conn.worker
    rig.loop.errors[worker.port] = [ConnectionRefusedError(111, "Connection refused")]
    _, busy = rig.dispatched(get("/busy"))  # the other worker
    ex = rig.request(get("/x"))
    assert ex.upstream is conn  # the kept-alive connection
    conn.transport.lose()
    rig.loop.run()  # sent again to the same worker: refused
    assert not ex.ended and worker.awaiting == [ex]
    exits(rig, worker, KILLED)
    busy.data_received(ok())
    assert ex.upstream is not None and ex.upstream.worker is busy.worker
    ex.upstream.data_received(ok(b"elsewhere"))
    assert ex.client.response().body == b"elsewhere"
    settled(rig)
