"""Every way an exchange ends, in-process: no sockets, no processes, no clock to wait on.

The real Pool, Exchange, UpstreamConnection and request/response edge run on the fakes of
tests/support/exchange_rig.py: the test plays the worker by calling the upstream protocol's callbacks, and
after each ending `settled()` checks the invariants (one slot release per dispatch, one observation, one
keep/close, nothing written after the end, no connection beyond max_inflight).
"""

from __future__ import annotations

import pytest
from support.exchange_rig import Conn, FakeClient, Response, Rig, conn_settled, get, ok, post, reused, settled

from corral import edge
from corral.datapath.exchange import SPILL_READ, Exchange
from corral.datapath.interfaces import PAUSE_BUFFER, PAUSE_UPSTREAM
from corral.datapath.outcomes import CLIENT_CLOSED
from corral.datapath.scheduler import QUEUED
from corral.datapath.worker import State

pytestmark = pytest.mark.unit  # in-process: no child process, no listener (tests/conftest.py)


def cut(rig: Rig, ex: Exchange, status: int) -> None:
    """A response that started and could not finish: it must look truncated (the client connection closes)."""
    assert ex.status == status
    assert ex.client.keep(ex) is False
    settled(rig)


# --- responses that end normally -------------------------------------------------------------------
@pytest.mark.parametrize("split", [None, 1, 7])
def test_length_response_is_relayed_and_the_connection_reused(split):
    rig = Rig()
    ex, conn = rig.dispatched(get("/a"))
    assert conn.transport.data.startswith(b"GET /a HTTP/1.1\r\n")
    raw = ok(b"hello", headers="X-App: 1\r\n")
    pieces = [raw] if split is None else [raw[i : i + split] for i in range(0, len(raw), split)]
    for piece in pieces:
        conn.data_received(piece)
    resp = ex.client.response()
    assert (resp.status, resp.body, resp.headers[b"x-app"]) == (200, b"hello", b"1")
    assert resp.headers[b"x-request-id"] == ex.request_id
    assert ex.client.keep() is True
    assert ex.status == 200 and ex.bytes_out == 5
    assert reused(rig, conn)
    assert rig.workers[0].served == 1 and rig.pool.served == 1
    settled(rig)

    ex2 = rig.request(get("/b"))  # the next request rides the same connection
    assert ex2.upstream is conn and len(rig.loop.upstreams) == 1
    conn.data_received(ok(b"again"))
    assert ex2.client.response().body == b"again"
    settled(rig)


def test_response_head_waits_for_the_first_body_bytes():
    # One write, not two, and no head sent before the worker committed to a body: an error page may still replace it.
    rig = Rig()
    ex, conn = rig.dispatched()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert ex.client.out == b"" and not ex.head_sent
    conn.data_received(b"hello")
    assert ex.client.response().body == b"hello"
    settled(rig)


def test_body_bytes_of_an_unfinished_response_go_out_at_the_end_of_each_read():
    # Held only within one read: a streamed response is never delayed to its end.
    rig = Rig()
    ex, conn = rig.dispatched()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    assert ex.client.out.endswith(b"\r\n\r\nhello") and ex.head_sent
    conn.data_received(b"world")
    assert ex.client.response().body == b"helloworld"
    settled(rig)


def test_worker_connection_close_header_means_no_reuse_but_the_client_stays():
    rig = Rig()
    ex, conn = rig.dispatched()
    conn.data_received(ok(b"bye", headers="Connection: close\r\n"))
    assert ex.client.response().body == b"bye"
    assert ex.client.keep() is True
    assert conn.transport.closed and not reused(rig, conn)
    settled(rig)


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_chunked_response(version):
    rig = Rig()
    headers = "Connection: keep-alive\r\n" if version == "1.0" else ""
    ex, conn = rig.dispatched(get(version=version, headers=headers))
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    conn.data_received(b"6\r\n world\r\n0\r\n\r\n")
    client = ex.client
    resp = client.response()
    assert resp.body == b"hello world"
    assert reused(rig, conn)  # the worker's framing was exact
    if version == "1.1":
        assert resp.headers[b"transfer-encoding"] == b"chunked"
        assert client.keep() is True
    else:
        # An HTTP/1.0 client knows no chunks: the body is delimited by closing its connection.
        assert b"transfer-encoding" not in resp.headers and resp.raw_body == b"hello world"
        assert resp.headers[b"connection"] == b"close"
        assert client.keep() is False
    settled(rig)


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_close_delimited_response_ends_at_eof(version):
    rig = Rig()
    ex, conn = rig.dispatched(get(version=version))
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\nsome ")
    conn.data_received(b"bytes")
    assert not ex.ended
    assert conn.eof_received() is False  # asyncio then closes the transport
    assert ex.ended and ex.status == 200
    conn.transport.lose()
    resp = ex.client.response()
    assert resp.body == b"some bytes"
    assert conn.transport.closed and not reused(rig, conn)
    # HTTP/1.1 clients get it chunked and keep their connection; HTTP/1.0 ones get the close.
    assert ex.client.keep() is (version == "1.1")
    assert rig.workers[0].failed == 0
    settled(rig)


def test_head_answer_is_the_head_alone_and_the_connection_not_reused():
    # Its declared body may still arrive, late (httpuv writes head and body apart): never reuse.
    rig = Rig()
    ex, conn = rig.dispatched(get(method="HEAD"))
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert ex.ended
    resp = ex.client.response()
    assert resp.headers[b"content-length"] == b"5" and resp.raw_body == b""
    assert ex.client.keep() is True
    assert conn.transport.closed and not reused(rig, conn)
    settled(rig)


def test_head_answer_declaring_no_body_keeps_the_connection():
    rig = Rig()
    ex, conn = rig.dispatched(get(method="HEAD"))
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert ex.ended and ex.client.keep() is True
    assert reused(rig, conn)
    settled(rig)


def test_head_answer_with_a_body_is_surplus(capsys):
    rig = Rig()
    ex, conn = rig.dispatched(get(method="HEAD"))
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    resp = ex.client.response()
    assert resp.raw_body == b""
    assert ex.client.keep() is True
    assert conn.transport.closed and not reused(rig, conn)
    assert edge.SURPLUS in capsys.readouterr().out
    settled(rig)


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
@pytest.mark.parametrize("surplus", [False, True])
def test_bodyless_status(status, surplus, capsys):
    rig = Rig()
    ex, conn = rig.dispatched()
    extra = "Content-Length: 5\r\n" if surplus else ""
    conn.data_received(f"HTTP/1.1 {status}\r\n{extra}\r\n".encode() + (b"hello" if surplus else b""))
    assert ex.ended
    resp = ex.client.response()
    assert resp.status == int(status[:3]) and resp.raw_body == b""
    assert ex.client.keep() is True
    assert reused(rig, conn) is not surplus
    assert (edge.SURPLUS in capsys.readouterr().out) is surplus
    settled(rig)


def test_surplus_after_a_length_body_never_reaches_the_next_request(capsys):
    rig = Rig()
    first = rig.request(get("/first"))
    second = rig.request(get("/second"))  # queued behind it, for the same worker
    assert second.sched_state == QUEUED
    conn = first.upstream
    assert conn is not None
    forged = ok(b"forged")
    conn.data_received(ok(b"hello") + forged)
    assert first.client.response().body == b"hello"
    assert first.client.keep() is True
    assert conn.transport.closed and not reused(rig, conn)
    assert edge.SURPLUS in capsys.readouterr().out
    rig.loop.run()
    # The queued request went out on a new connection and has seen nothing yet.
    assert second.upstream is not None and second.upstream is not conn
    assert b"/second" not in conn.transport.data
    assert second.client.out == b""
    second.upstream.data_received(ok(b"mine"))
    assert second.client.response().body == b"mine"
    settled(rig)


def test_bytes_on_an_idle_connection_close_it(capsys):
    rig = Rig()
    _, conn = rig.dispatched()
    conn.data_received(ok())
    assert reused(rig, conn)
    conn.data_received(ok(b"unasked"))
    assert conn.transport.closed and conn not in rig.workers[0].idle
    assert edge.SURPLUS in capsys.readouterr().out
    conn.transport.lose()
    w = rig.workers[0]
    assert w.state is State.READY and w.failed == 0  # the worker is not blamed, nobody was answered with them
    nxt = rig.request()
    assert nxt.upstream is not None and nxt.upstream is not conn
    nxt.upstream.data_received(ok(b"fresh"))
    assert nxt.client.response().body == b"fresh"
    settled(rig)


def test_eof_on_an_idle_connection_drops_it():
    rig = Rig()
    _, conn = rig.dispatched()
    conn.data_received(ok())
    assert conn.eof_received() is False
    conn.transport.lose()
    assert conn not in rig.workers[0].idle and conn.closed
    assert rig.workers[0].failed == 0
    settled(rig)


# --- the worker fails ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sent",
    [b"", b"HTTP/1.1 200 OK\r\nContent-Le", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"],
    ids=["nothing", "mid-head", "head-only"],
)
@pytest.mark.parametrize("eof_first", [False, True])
def test_worker_closes_before_any_body_byte_gets_a_502_page(sent, eof_first):
    rig = Rig()
    ex, conn = rig.dispatched()
    if sent:
        conn.data_received(sent)
    if eof_first:
        assert conn.eof_received() is False
    conn.transport.lose()
    resp = ex.client.response()
    assert resp.status == 502 and ex.status == 502
    assert ex.client.keep() is True  # a whole answer was written
    w = rig.workers[0]
    assert w.failed == 1 and rig.pool.failed == 1
    assert w.sitting_out  # a supervised worker that dropped a request sits out a moment
    settled(rig)


@pytest.mark.parametrize("chunked", [False, True])
def test_worker_closes_mid_body_cuts_the_response(chunked):
    rig = Rig()
    ex, conn = rig.dispatched()
    if chunked:
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n")
    else:
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
    assert conn.eof_received() is False  # a truncation, not an end
    conn.transport.lose()
    out = bytes(ex.client.out)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"hel" in out and b"HTTP/1.1 502" not in out
    if chunked:
        assert not out.endswith(edge.LAST_CHUNK)  # it must not look complete
    assert rig.workers[0].failed == 1
    cut(rig, ex, 502)


def test_malformed_response_is_a_502_and_the_connection_closed():
    rig = Rig()
    ex, conn = rig.dispatched()
    conn.data_received(b"this is not http\r\n\r\n")
    assert ex.client.response().status == 502
    assert conn.transport.closed
    conn.transport.lose()
    assert rig.workers[0].failed == 1
    settled(rig)


def test_request_timeout_before_the_head_is_a_504_page():
    rig = Rig()
    ex, conn = rig.dispatched()
    rig.expire(rig.app.request_timeout + 1)
    w = rig.workers[0]
    assert rig.hung == [w] and w.state is State.UNHEALTHY  # out of rotation before its slot was freed
    assert ex.client.response().status == 504
    assert ex.status == 504 and ex.client.keep() is True
    assert conn.transport.closed
    assert w.failed == 1 and rig.pool.failed == 1
    conn.transport.lose()
    settled(rig)


def test_request_timeout_after_the_head_alone_is_still_a_504_page():
    # The head is held until the first body bytes, so nothing has reached the client yet.
    rig = Rig()
    ex, conn = rig.dispatched()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    rig.expire(rig.app.request_timeout + 1)
    assert ex.client.response().status == 504
    assert ex.client.keep() is True
    settled(rig)


def test_request_timeout_mid_body_cuts_the_response():
    rig = Rig()
    ex, conn = rig.dispatched()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
    rig.expire(rig.app.request_timeout + 1)
    out = bytes(ex.client.out)
    assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"he") and b"HTTP/1.1 504" not in out
    assert conn.transport.closed
    cut(rig, ex, 504)


# --- the client leaves -----------------------------------------------------------------------------
def test_client_leaves_while_queued_never_reaches_a_worker():
    rig = Rig()
    first = rig.request(get("/first"))
    waiting = rig.request(get("/waiting"))
    assert waiting.sched_state == QUEUED and rig.pool.scheduler.depth == 1
    waiting.client_left()
    assert waiting.ended and waiting.status == CLIENT_CLOSED
    assert rig.pool.scheduler.depth == 0
    conn = first.upstream
    assert conn is not None
    conn.data_received(ok())
    assert rig.connects[id(waiting)] == 0
    assert b"/waiting" not in conn.transport.data
    assert waiting.client.keep() is False
    assert waiting.client.out == b""
    settled(rig)


def test_client_leaves_before_the_response():
    """The worker is still computing: its slot stays taken until it is done, or a client that leaves could
    pile work on a worker past max_inflight. Its answer is read and dropped, and its connection reused."""
    rig = Rig()
    ex, conn = rig.dispatched()
    waiting = rig.request()
    ex.client_left()
    assert ex.status == CLIENT_CLOSED and ex.client.keep() is False and ex.ended
    w = rig.workers[0]
    assert w.inflight == 1 and not conn.transport.closed and rig.observed == []
    assert waiting.upstream is None, "a second request went to a worker still computing the first"
    conn.data_received(ok(b"nobody reads this"))
    assert ex.client.out == b"" and rig.observed == [ex] and ex.outcome == "abandoned" and ex.status == 499
    assert w.failed == 0 and not w.sitting_out and w.state is State.READY  # not the worker's fault
    assert waiting.upstream is conn  # the worker is free now, and its connection was kept
    waiting.upstream.data_received(ok())
    settled(rig)


def test_client_leaves_mid_response():
    rig = Rig()
    ex, conn = rig.dispatched()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")
    ex.client_left()
    assert ex.status == CLIENT_CLOSED and ex.cut == "client closed"
    assert not conn.transport.closed and rig.workers[0].inflight == 1  # the worker finishes its answer
    conn.data_received(b"x" * 96)
    assert reused(rig, conn) and ex.bytes_out == 4
    assert rig.workers[0].failed == 0
    cut(rig, ex, CLIENT_CLOSED)


def test_client_leaves_and_the_worker_then_fails():
    rig = Rig()
    ex, conn = rig.dispatched()
    ex.client_left()
    conn.transport.lose()
    assert ex.outcome == "abandoned" and rig.observed == [ex] and ex.client.out == b""
    assert rig.workers[0].failed == 1  # its own count; the client had left, so the exchange is not a 502
    settled(rig)


def test_client_leaves_and_the_worker_hangs():
    rig = Rig()
    ex, _ = rig.dispatched()
    ex.client_left()
    rig.expire(rig.app.request_timeout + 1)
    assert rig.hung == [rig.workers[0]] and rig.observed == [ex] and ex.client.out == b""
    settled(rig)


def test_client_left_twice_is_one_end():
    rig = Rig()
    ex, conn = rig.dispatched()
    ex.client_left()
    ex.client_left()
    ex.end()
    conn.data_received(ok())
    settled(rig)


# --- response buffering: memory, then a file, then back-pressure ----------------------------------
def test_spill_to_file_frees_the_worker_and_drains_in_order():
    rig = Rig()
    client = FakeClient(rig)
    ex, conn = rig.dispatched(client=client)
    client.blocked = True  # the client's transport is over its high-water mark
    body = bytes(range(256)) * 4096 * 3  # 3 MiB, several spill reads
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 65536):
        conn.data_received(body[i : i + 65536])
    # The whole response is ours: the worker is free, its connection reused, while the client still reads.
    assert ex.response_complete and ex.spill is not None and not ex.ended
    assert rig.workers[0].inflight == 0 and not rig.pool.inflight and reused(rig, conn)
    assert client.out == b"" and rig.observed == [] and client.done == []
    spill = ex.spill
    client.stall = True  # each write fills the client's buffer again
    drains = 0
    while not ex.ended:
        client.drain()
        drains += 1
    assert drains >= len(body) // SPILL_READ
    assert spill.file.closed
    resp = client.response()
    assert resp.body == body  # every byte, in order
    assert client.keep() is True
    settled(rig)


def test_spill_past_its_limit_pauses_the_worker_until_the_client_reads():
    rig = Rig()
    client = FakeClient(rig, spill_limit=10)
    ex, conn = rig.dispatched(client=client)
    client.blocked = True
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n" + b"a" * 12)
    assert not conn.transport.reading
    assert rig.workers[0].inflight == 1  # the response is not whole: the worker is still held
    client.drain()  # takes the spill, then the worker is read again
    assert conn.transport.reading and ex.spill is None
    conn.data_received(b"b" * 18)
    assert client.response().body == b"a" * 12 + b"b" * 18
    assert client.keep() is True and reused(rig, conn)
    settled(rig)


def test_spill_limit_zero_is_back_pressure_on_the_worker():
    rig = Rig()
    client = FakeClient(rig, spill_limit=0)
    ex, conn = rig.dispatched(client=client)
    client.stall = True
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    assert ex.spill is None and client.blocked
    assert not conn.transport.reading  # paused until the client reads
    assert not ex.ended and rig.workers[0].inflight == 1
    client.stall = False
    client.drain()
    assert conn.transport.reading
    conn.data_received(b"def")
    assert client.response().body == b"abcdef"
    assert client.keep() is True and reused(rig, conn)
    settled(rig)


def test_client_leaves_mid_spill_after_the_response_was_whole():
    rig = Rig()
    client = FakeClient(rig)
    ex, conn = rig.dispatched(client=client)
    client.blocked = True
    conn.data_received(ok(b"x" * 1000))
    spill = ex.spill
    assert spill is not None and ex.response_complete and reused(rig, conn)
    ex.client_left()
    assert spill.file.closed
    assert ex.status == 200  # the worker's answer was whole; the client did not take it all
    assert client.keep() is False
    assert reused(rig, conn)  # the worker's connection is not the client's business
    settled(rig)


def test_client_leaves_mid_spill_while_the_worker_is_paused():
    rig = Rig()
    client = FakeClient(rig, spill_limit=10)
    ex, conn = rig.dispatched(client=client)
    client.blocked = True
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 20)
    spill = ex.spill
    assert spill is not None and not conn.transport.reading
    ex.client_left()
    assert spill.file.closed and conn.transport.reading  # the worker finishes its answer, into nothing
    conn.data_received(b"a" * 80)
    assert reused(rig, conn) and ex.bytes_out == 0
    cut(rig, ex, CLIENT_CLOSED)


# --- the request body ------------------------------------------------------------------------------
@pytest.mark.parametrize("chunked", [False, True])
def test_worker_answers_before_the_request_body_is_complete(chunked):
    rig = Rig(request_buffering=False)
    client = FakeClient(rig)
    if chunked:
        head = b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        rest = b"4\r\ndefg\r\n0\r\n\r\n"
    else:
        head = b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 7\r\n\r\nabc"
        rest = b"defg"
    ex, conn = rig.dispatched(head, client=client)
    assert not ex.request_done
    conn.data_received(ok(b"early", status="413 Content Too Large"))
    assert client.response().status == 413
    assert client.keep() is False  # the rest of the body is still coming: the client connection closes
    assert conn.transport.closed and not reused(rig, conn)
    sent = conn.transport.data
    client.reader.feed(rest)  # the rest arrives and is dropped
    assert conn.transport.data == sent and not conn.transport.late
    conn.transport.lose()
    settled(rig)


def test_request_body_buffered_while_queued_is_flushed_on_dispatch():
    rig = Rig(request_buffering=False)
    first = rig.request()
    client = FakeClient(rig)
    body = b"z" * (300 * 1024)  # past the queued-body limit: the client is paused
    ex = rig.request(post(body), client=client)
    assert ex.sched_state == QUEUED and client.paused & PAUSE_BUFFER
    assert first.upstream is not None
    conn = first.upstream
    conn.data_received(ok())
    assert ex.upstream is conn
    assert conn.transport.data.endswith(body)
    assert not client.paused & PAUSE_BUFFER
    conn.data_received(ok(b"got it"))
    assert client.response().body == b"got it" and client.keep() is True
    settled(rig)


def test_expect_100_continue_is_answered_once_the_worker_is_ours():
    rig = Rig(request_buffering=False)
    first = rig.request()
    client = FakeClient(rig)
    ex = rig.request(
        b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n", client=client
    )
    assert client.out == b""  # queued: no promise yet
    assert first.upstream is not None
    conn = first.upstream
    conn.data_received(ok())
    assert client.out == edge.CONTINUE
    client.reader.feed(b"abc")
    assert conn.transport.data.endswith(b"abc")
    conn.data_received(ok(b"done"))
    assert Response.parse(bytes(client.out[len(edge.CONTINUE) :])).body == b"done"
    assert ex.ended
    settled(rig)


# --- corral's own answers ----------------------------------------------------------------------------
def test_queue_timeout_is_a_503_and_never_reaches_a_worker():
    rig = Rig(queue_timeout=5.0)
    first = rig.request()
    waiting = rig.request()
    assert waiting.sched_state == QUEUED
    rig.expire(6.0)
    resp = waiting.client.response()
    assert resp.status == 503 and resp.headers[b"retry-after"].isdigit()
    assert waiting.client.keep() is True
    assert rig.connects[id(waiting)] == 0 and rig.pool.scheduler.timed_out == 1
    assert not first.ended  # the one on the worker has its own deadline
    assert first.upstream is not None
    first.upstream.data_received(ok())
    settled(rig)


@pytest.mark.parametrize("max_queue", [0, 1])
def test_queue_full_is_a_503_at_once(max_queue):
    rig = Rig(max_queue=max_queue)
    first = rig.request()
    waiting = [rig.request() for _ in range(max_queue)]
    refused = rig.request()
    assert refused.ended
    resp = refused.client.response()
    assert resp.status == 503 and b"retry-after" in resp.headers
    # Refused while its head is parsed, before its end: closing is allowed, but what is said must be done.
    keep = refused.client.keep()
    assert (resp.headers.get(b"connection") == b"close") is (not keep)
    assert rig.connects[id(refused)] == 0 and rig.pool.scheduler.rejected == 1
    conn = first.upstream
    assert conn is not None
    conn.data_received(ok())
    for ex in waiting:
        conn.data_received(ok())
        assert ex.client.response().status == 200
    settled(rig)


def test_keep_alive_follows_the_request_and_the_client():
    rig = Rig()
    close = rig.request(get(headers="Connection: close\r\n"))
    assert close.upstream is not None
    close.upstream.data_received(ok())
    assert close.client.keep() is False
    assert close.client.response().headers[b"connection"] == b"close"
    old = rig.request(get(version="1.0"))
    assert old.upstream is not None
    old.upstream.data_received(ok())
    assert old.client.keep() is False
    alive = rig.request(get(version="1.0", headers="Connection: keep-alive\r\n"))
    assert alive.upstream is not None
    alive.upstream.data_received(ok())
    assert alive.client.keep() is True
    assert alive.client.response().headers[b"connection"] == b"keep-alive"
    settled(rig)


# --- through the real ClientConnection ----------------------------------------------------------------
def test_client_connection_keep_alive_and_pipelining():
    rig = Rig()
    c = Conn(rig)
    c.send(get("/one") + get("/two"))  # pipelined: the second waits for the first's answer
    assert c.current.head.target == b"/one"
    assert not c.transport.reading
    up = c.upstream()
    up.data_received(ok(b"1"))
    assert c.current.head.target == b"/two" and c.current.upstream is up  # in order, same worker connection
    up.data_received(ok(b"2"))
    assert [r.body for r in c.responses()] == [b"1", b"2"]
    assert c.conn.current is None and not c.transport.closed and c.transport.reading
    assert [keep for _, keep in c.told] == [True, True]
    conn_settled(c)


def test_client_connection_closes_after_a_cut_response():
    rig = Rig()
    c = Conn(rig)
    c.send(get())
    up = c.upstream()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
    up.transport.lose()
    assert c.transport.closed
    assert c.told[0][0].status == 502 and c.told[0][1] is False
    conn_settled(c)


def test_client_connection_eof_mid_response_ends_the_exchange():
    rig = Rig()
    c = Conn(rig)
    c.send(get())
    up = c.upstream()
    ex = c.current
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
    assert c.conn.eof_received() is False
    assert ex.ended and ex.status == CLIENT_CLOSED and ex.cut == "client closed" and ex.bytes_out == 3
    c.transport.lose()
    up.data_received(b"defghi")  # the worker finishes; its connection is kept
    assert reused(rig, up)
    conn_settled(c)


def test_client_connection_lost_while_queued_and_while_pipelined():
    rig = Rig()
    first = Conn(rig)
    first.send(get("/first"))
    second = Conn(rig)
    second.send(get("/queued") + get("/pipelined"))
    queued = second.current
    pipelined = second.conn.pipeline[0]
    assert queued.sched_state == QUEUED
    second.transport.lose()
    assert queued.ended and pipelined.ended and rig.pool.scheduler.depth == 0
    assert rig.observed.count(queued) == 1 and rig.observed.count(pipelined) == 1
    first.upstream().data_received(ok())
    assert rig.connects[id(queued)] == 0 and rig.connects[id(pipelined)] == 0
    conn_settled(first)
    conn_settled(second)


def test_client_connection_queue_full_answers_and_does_what_it_says():
    rig = Rig(max_queue=0)
    first = Conn(rig)
    first.send(get())
    refused = Conn(rig)
    refused.send(get())
    [resp] = refused.responses()
    assert resp.status == 503
    [(_, keep)] = refused.told
    assert (resp.headers.get(b"connection") == b"close") is (not keep) is refused.transport.closed
    first.upstream().data_received(ok())
    conn_settled(first)
    conn_settled(refused)


def test_client_connection_pause_writing_spills_and_resume_drains_in_order():
    rig = Rig(response_buffer=64 * 1024)
    c = Conn(rig)
    c.send(get())
    assert c.transport.high == 64 * 1024  # the client buffer is the app's response_buffer
    up = c.upstream()
    ex = c.current
    body = bytes(range(256)) * 2048  # 512 KiB
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 16384):
        up.data_received(body[i : i + 16384])
    assert c.transport.writing_paused and ex.spill is not None
    assert ex.response_complete and rig.workers[0].inflight == 0 and reused(rig, up)
    received = b""
    while c.transport.writing_paused or c.transport.chunks:
        received += c.transport.take()  # the client reads; resume_writing feeds it from the spill
    assert ex.ended and ex.spill is None
    assert Response.parse(received).body == body
    assert c.told == [(ex, True)] and not c.transport.closed
    conn_settled(c)


def test_client_connection_resumes_reading_after_the_worker_stopped_taking_its_body():
    """BUG: PAUSE_UPSTREAM outlives its exchange.

    The worker connection's buffer passed its high-water mark while the request body was forwarded
    (pause_writing: the client's reading paused with PAUSE_UPSTREAM). The worker answered without reading
    the rest (allowed), the response was whole and the request complete, so the exchange ended with
    keep-alive and the worker connection was reused; its resume_writing, if it ever comes, goes to the
    next exchange. Nothing resumes the client: its next request is never read, and check_timeouts skips
    paused connections, so the connection is held forever.
    """
    rig = Rig()
    c = Conn(rig)
    c.send(post(b"abcd"))
    up = c.upstream()
    up.pause_writing()
    assert not c.transport.reading
    up.data_received(ok(b"no thanks"))
    [resp] = c.responses()
    assert resp.status == 200 and c.told[0][1] is True and not c.transport.closed
    assert c.transport.reading, "keep-alive client connection left paused (PAUSE_UPSTREAM never resumed)"


def test_client_connection_resumes_reading_after_a_504_on_a_paused_upload():
    """BUG (same root): a request timeout while the upload was back-pressured answers 504 keep-alive and
    closes the worker connection, whose resume_writing never comes: the client connection stays paused."""
    rig = Rig()
    c = Conn(rig)
    c.send(post(b"abcd"))
    up = c.upstream()
    up.pause_writing()
    rig.expire(rig.app.request_timeout + 1)
    [resp] = c.responses()
    assert resp.status == 504 and c.told[0][1] is True and not c.transport.closed
    assert c.transport.reading, "keep-alive client connection left paused (PAUSE_UPSTREAM never resumed)"


def test_upstream_back_pressure_pauses_and_resumes_the_client():
    rig = Rig(request_buffering=False)
    client = FakeClient(rig)
    _, conn = rig.dispatched(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc", client=client)
    conn.pause_writing()
    assert client.paused & PAUSE_UPSTREAM
    conn.resume_writing()
    assert not client.paused & PAUSE_UPSTREAM
    client.reader.feed(b"defghij")
    conn.data_received(ok())
    settled(rig)
