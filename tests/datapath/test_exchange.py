"""Every way an exchange ends, in-process: no sockets, no processes, no clock to wait on.

The real Pool, Exchange, UpstreamConnection and request/response edge run against fake transports. A
FakeClient (the exchange's `Client`, fed raw request bytes through the real request edge) or the real
ClientConnection on a fake transport stands for the client; the test plays the worker by calling the
upstream protocol's callbacks (`data_received`, `eof_received`, `connection_lost`, `pause_writing`). A
FakeLoop gives Pool its `call_later` and `create_task`: connections are opened when the test runs the
loop's tasks, timers fire when the test fires them.

After each ending `settled()` checks the invariants: the worker's slot was released exactly once per
dispatch (worker.inflight back to 0, scheduler and pool.inflight empty), the exchange was observed
exactly once, the client was told keep/close exactly once, nothing was written to it afterwards, and
no worker holds more connections than its max_inflight, each of them idle and reusable.

test_pool.py imports the fakes from here.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from corral import edge
from corral.config import AppConfig, ServerConfig
from corral.datapath.client import ClientConnection, Proxy
from corral.datapath.exchange import CLIENT_CLOSED, PAUSE_BUFFER, PAUSE_UPSTREAM, SPILL_READ, Exchange
from corral.datapath.pool import Pool, UpstreamConnection
from corral.datapath.scheduler import QUEUED
from corral.datapath.worker import State, Worker


# --- fakes ------------------------------------------------------------------------------------------
class FakeTransport:
    """An asyncio transport that records what it was asked to do.

    Writes are kept; after close() they are kept apart in `late` (a real transport drops them). With
    write buffer limits set (ClientConnection sets them), it plays asyncio's flow control: past `high`
    buffered bytes it calls the protocol's pause_writing, and `take()` (the peer reads everything) calls
    resume_writing. connection_lost is never called by the transport itself: `lose()` does what the loop
    does soon after close(), or when the peer goes away.
    """

    def __init__(
        self, protocol: object = None, peer: tuple[str, int] = ("127.0.0.1", 40000), kernel: int = 256 * 1024
    ) -> None:
        self.protocol = protocol
        self.peer = peer
        self.kernel = kernel  # bytes the peer's socket takes before the transport has to buffer them
        self.in_kernel = 0
        self.chunks: list[bytes] = []
        self.late: list[bytes] = []
        self.reading = True
        self.closed = False
        self.lost = False
        self.high: int | None = None
        self.buffered = 0
        self.writing_paused = False

    # the asyncio.Transport surface
    def write(self, data: bytes) -> None:
        if self.closed:
            self.late.append(bytes(data))
            return
        self.chunks.append(bytes(data))
        to_kernel = 0 if self.buffered else min(len(data), self.kernel - self.in_kernel)
        self.in_kernel += to_kernel
        self.buffered += len(data) - to_kernel
        self._maybe_pause()

    def _maybe_pause(self) -> None:
        if self.high is not None and not self.writing_paused and self.buffered > self.high:
            self.writing_paused = True
            self.protocol.pause_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default  # no "socket": no setsockopt on a fake

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high
        self._maybe_pause()

    # the test's side
    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def take(self) -> bytes:
        """The peer reads everything written so far; the buffer empties (resume_writing if it was paused)."""
        data = self.data
        self.chunks.clear()
        self.buffered = self.in_kernel = 0
        if self.writing_paused:
            self.writing_paused = False
            self.protocol.resume_writing()
        return data

    def lose(self, exc: Exception | None = None) -> None:
        self.closed = True
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(exc)


class Timer:
    def __init__(self, delay: float, callback, args: tuple) -> None:
        self.delay = delay
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """What Pool uses of an event loop. Tasks run when the test calls run(); timers when it calls fire().

    create_connection succeeds at once with a FakeTransport, or raises the next error planned for that
    port in `errors`.
    """

    def __init__(self) -> None:
        self.timers: list[Timer] = []
        self.tasks: list = []
        self.errors: dict[int, list[OSError]] = {}
        self.upstreams: list[UpstreamConnection] = []

    def call_later(self, delay: float, callback, *args) -> Timer:
        timer = Timer(delay, callback, args)
        self.timers.append(timer)
        return timer

    def create_task(self, coro):
        self.tasks.append(coro)
        return coro

    async def create_connection(self, factory, host: str, port: int):
        planned = self.errors.get(port)
        if planned:
            raise planned.pop(0)
        protocol = factory()
        transport = FakeTransport(protocol, peer=(host, port))
        protocol.connection_made(transport)
        self.upstreams.append(protocol)
        return transport, protocol

    def run(self) -> None:
        """Run every pending task to its end: nothing here ever makes one wait."""
        while self.tasks:
            coro = self.tasks.pop(0)
            try:
                coro.send(None)
            except StopIteration:
                continue
            raise AssertionError("a pool task waited on something the fake loop does not provide")

    def fire(self) -> int:
        """Fire every pending timer (and those they set, once); returns how many fired."""
        due, self.timers = [t for t in self.timers if not t.cancelled], []
        for timer in due:
            timer.callback(*timer.args)
        return len(due)


class FakeClient:
    """An exchange.Client fed raw request bytes through the real request edge (one exchange at a time).

    `stall`: every write fills the client's buffer (writing_paused turns True), until `drain()`.
    """

    def __init__(self, rig: Rig, spill_limit: int | None = None) -> None:
        self.rig = rig
        self.peer = b"127.0.0.1"
        self.trusted = False
        self.closing = False
        self.reader = edge.RequestReader(self, edge.EdgeLimits())
        self.spill_limit = rig.app.response_buffer_file if spill_limit is None else spill_limit
        self.out = bytearray()
        self.late: list[bytes] = []
        self.blocked = False
        self.stall = False
        self.paused = 0
        self.done: list[tuple[Exchange, bool]] = []
        self.exchanges: list[Exchange] = []
        self.parsing: Exchange | None = None
        self.written = 0

    def send(self, raw: bytes) -> Exchange:
        self.reader.feed(raw)
        return self.exchanges[-1]

    # edge.RequestHandler
    def on_request(self, head: edge.RequestHead) -> None:
        app = self.rig.app
        memory = app.request_buffer if app.request_buffering and head.has_body else None
        ex = Exchange(self, head, self.rig.pool, b"", self.spill_limit, memory)
        self.exchanges.append(ex)
        self.rig.exchanges.append(ex)
        self.parsing = ex
        ex.begin()  # what ClientConnection.start does

    def on_request_body(self, data: bytes) -> None:
        assert self.parsing is not None
        self.parsing.request_body(data)

    def on_request_end(self) -> None:
        ex, self.parsing = self.parsing, None
        assert ex is not None
        ex.request_end()

    # exchange.Client
    def write(self, data: bytes) -> None:
        if len(self.done) == len(self.exchanges):
            self.late.append(data)  # every exchange of this client has ended: nothing may follow
            return
        self.out += data
        self.written += len(data)
        if self.stall:
            self.blocked = True

    def writing_paused(self) -> bool:
        return self.blocked

    def taken(self) -> int:
        return self.written  # what was written is what the client has; a test that stalls it holds the rest back

    def wait_flushed(self) -> bool:
        return True

    def pause(self, why: int) -> None:
        self.paused |= why

    def resume(self, why: int) -> None:
        self.paused &= ~why

    def exchange_done(self, ex: Exchange, keep_alive: bool) -> None:
        self.done.append((ex, keep_alive))

    # the test's side
    def drain(self) -> None:
        """The client read what it was sent: the exchange is told, as ClientConnection.resume_writing does."""
        self.blocked = False
        ex = self.exchanges[-1]
        if not ex.ended:
            ex.client_writable()

    def keep(self, ex: Exchange | None = None) -> bool:
        ex = ex or self.exchanges[-1]
        told = [keep for e, keep in self.done if e is ex]
        assert len(told) == 1, f"the client was told {len(told)} times that the exchange ended"
        return told[0]

    def response(self) -> Response:
        return Response.parse(bytes(self.out))


class Rig:
    """One app's Pool with `workers` READY fake workers, a FakeLoop and recording hooks."""

    def __init__(self, workers: int = 1, max_inflight: int = 1, **app: object) -> None:
        app.setdefault("dispatch", "fifo")
        self.app = AppConfig(workers=workers, max_inflight=max_inflight, **app)
        self.loop = FakeLoop()
        self.pool = pool = Pool(self.app, self.loop)
        self.exchanges: list[Exchange] = []
        self.observed: list[Exchange] = []
        self.hung: list[Worker] = []
        self.unreachable: list[Worker] = []
        self.probes: list[tuple[Worker, int]] = []  # (worker, its inflight when the probe started)
        self.connects: Counter[int] = Counter()  # per exchange id: dispatches
        self.frees: Counter[int] = Counter()  # per exchange id: slot releases
        pool.on_observe = self.observed.append
        pool.on_hung = self._hung
        pool.on_probe_due = self._probe_due
        mark = pool.on_unreachable

        def unreachable(worker: Worker, why: str) -> None:
            self.unreachable.append(worker)
            mark(worker, why)

        pool.on_unreachable = unreachable
        connect, free = pool.connect, pool._free_slot

        def counted_connect(ex: Exchange, worker: Worker) -> None:
            self.connects[id(ex)] += 1
            connect(ex, worker)

        def counted_free(ex: Exchange, worker: Worker, served: bool) -> None:
            self.frees[id(ex)] += 1
            free(ex, worker, served)

        pool.connect = counted_connect
        pool._free_slot = counted_free
        self.workers = [Worker("app", i, "127.0.0.1", 9000 + i, max_inflight) for i in range(workers)]
        for w in self.workers:
            pool.join(w)
            pool.set_state(w, State.READY)

    def _hung(self, worker: Worker, why: str) -> None:  # what Supervisor.kill_hung does
        self.hung.append(worker)
        self.pool.set_state(worker, State.UNHEALTHY)

    def _probe_due(self, worker: Worker) -> None:  # what HealthChecker.start_probe does
        self.probes.append((worker, worker.inflight))
        worker.probe_due = False
        worker.probing = True

    def probe_done(self, worker: Worker) -> None:  # what HealthChecker._check does once it has an answer
        worker.probing = False
        worker.last_probe = time.monotonic()
        self.pool.pump()
        self.loop.run()

    def request(self, raw: bytes = b"", client: FakeClient | None = None, run: bool = True, **kw: object) -> Exchange:
        client = client or FakeClient(self, **kw)
        ex = client.send(raw or get())
        if run:
            self.loop.run()
        return ex

    def dispatched(self, raw: bytes = b"", **kw: object) -> tuple[Exchange, UpstreamConnection]:
        """A request that reached a worker: its exchange and the worker connection carrying it."""
        ex = self.request(raw, **kw)
        assert ex.upstream is not None, "the request did not reach a worker"
        return ex, ex.upstream

    def connections(self, worker: Worker) -> list[UpstreamConnection]:
        """The worker's connections that are still open."""
        return [c for c in self.loop.upstreams if c.worker is worker and not c.transport.closed]

    def expire(self, after: float) -> None:
        """Run the pool's clocks as if `after` seconds had passed."""
        self.pool.expire(time.monotonic() + after)
        self.loop.run()


def settled(rig: Rig, *exchanges: Exchange) -> None:
    """The invariants once every exchange has ended."""
    pool = rig.pool
    for ex in exchanges or rig.exchanges:
        assert ex.ended
        assert rig.observed.count(ex) == 1, "observed exactly once"
        client = ex.client
        assert isinstance(client, FakeClient)
        client.keep(ex)  # told exactly once
        assert not client.late, f"bytes written after the exchange ended: {client.late!r}"
        assert ex.worker is None and ex.upstream is None
        assert rig.frees[id(ex)] == rig.connects[id(ex)], "one slot release per dispatch"
        assert ex.spill is None
    assert not pool.inflight
    assert pool.scheduler.depth == 0
    assert pool.scheduler.long_inflight == 0
    for w in rig.workers:
        assert w.inflight == 0, w
        open_ = rig.connections(w)
        assert len(open_) <= w.max_inflight, f"{w.name} holds {len(open_)} connections"
        for conn in open_:
            assert conn in w.idle, "an open connection nobody will use"
        for conn in w.idle:
            assert not conn.closed and conn.exchange is None and conn.transport.reading
    for conn in rig.loop.upstreams:
        assert not conn.transport.late, "bytes written to a closed worker connection"


def reused(rig: Rig, conn: UpstreamConnection) -> bool:
    """The connection went back to its worker's idle list, open."""
    return conn in conn.worker.idle and not conn.transport.closed


# --- bytes -------------------------------------------------------------------------------------------
def get(path: str = "/x", method: str = "GET", version: str = "1.1", headers: str = "") -> bytes:
    return f"{method} {path} HTTP/{version}\r\nHost: t\r\n{headers}\r\n".encode()


def post(body: bytes, path: str = "/up", headers: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


def ok(body: bytes = b"hello", status: str = "200 OK", headers: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


class Response:
    """A response as the client received it."""

    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes, raw_body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.raw_body = raw_body

    @classmethod
    def parse(cls, data: bytes) -> Response:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"no complete response head in {data[:200]!r}"
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        body = dechunk(rest) if headers.get(b"transfer-encoding") == b"chunked" else rest
        return cls(status, headers, body, rest)


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            assert data == b"\r\n", "a chunked body must end with the last chunk, and nothing after it"
            return bytes(out)
        out += data[:size]
        assert data[size : size + 2] == b"\r\n"
        data = data[size + 2 :]
    raise AssertionError("chunked body without its last chunk")


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
    assert w.quarantined  # a supervised worker that dropped a request sits out a moment
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
    assert w.failed == 0 and not w.quarantined and w.state is State.READY  # not the worker's fault
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
class Conn:
    """A real ClientConnection on a FakeTransport, in front of a Rig's pool."""

    def __init__(self, rig: Rig, server: ServerConfig | None = None) -> None:
        self.rig = rig
        self.proxy = Proxy(rig.loop, server or ServerConfig(), [rig.pool])
        self.conn = ClientConnection(self.proxy)
        self.transport = FakeTransport(self.conn)
        self.conn.connection_made(self.transport)
        self.told: list[tuple[Exchange, bool]] = []
        done = self.conn.exchange_done

        def exchange_done(ex: Exchange, keep_alive: bool) -> None:
            self.told.append((ex, keep_alive))
            done(ex, keep_alive)

        self.conn.exchange_done = exchange_done

    def send(self, raw: bytes) -> None:
        self.conn.data_received(raw)
        self.rig.loop.run()

    @property
    def current(self) -> Exchange:
        assert self.conn.current is not None
        return self.conn.current

    def upstream(self) -> UpstreamConnection:
        conn = self.current.upstream
        assert conn is not None
        return conn

    def responses(self) -> list[Response]:
        data, out = self.transport.take(), []
        while data:
            head, _, rest = data.partition(b"\r\n\r\n")
            length = int(Response.parse(head + b"\r\n\r\n").headers.get(b"content-length", b"0"))
            out.append(Response.parse(head + b"\r\n\r\n" + rest[:length]))
            data = rest[length:]
        return out


def conn_settled(c: Conn) -> None:
    rig = c.rig
    for ex, _ in c.told:
        assert rig.observed.count(ex) == 1
    assert len({id(ex) for ex, _ in c.told}) == len(c.told), "one end per exchange"
    assert not c.transport.late
    assert not rig.pool.inflight and rig.pool.scheduler.depth == 0
    assert all(w.inflight == 0 for w in rig.workers)


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
