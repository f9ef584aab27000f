"""The in-process exchange rig: the real data path on fake transports, with no sockets and no clock to wait on.

The real Pool, Exchange, UpstreamConnection and request/response edge run against fake transports. A
FakeClient (the exchange's `Client`, fed raw request bytes through the real request edge) or the real
ClientConnection on a fake transport (`Conn`) stands for the client; the test plays the worker by calling the
upstream protocol's callbacks (`data_received`, `eof_received`, `connection_lost`, `pause_writing`). A
FakeLoop gives Pool its `call_later` and `create_task`: connections are opened when the test runs the
loop's tasks, timers fire when the test fires them.

After each ending `settled()` checks the invariants: the worker's slot was released exactly once per
dispatch (worker.inflight back to 0, scheduler and pool.inflight empty), the exchange was observed
exactly once, the client was told keep/close exactly once, nothing was written to it afterwards, and
no worker holds more connections than its max_inflight, each of them idle and reusable.

tests/datapath/test_exchange.py, test_delivery.py, test_pool.py and bench/hotpath.py run on it.
"""

from __future__ import annotations

import socket
import time
from collections import Counter

from corral import edge
from corral.config import AppConfig, ServerConfig
from corral.datapath.client import ClientConnection, Proxy
from corral.datapath.exchange import Exchange
from corral.datapath.pool import Pool
from corral.datapath.upstream import UpstreamConnection
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
        # With Rig(sockets=True): a real socket pair, ours and the worker's end, so that the worker's closing
        # of its end is what the kernel says it is (UpstreamConnection peeks at ours before a request goes out).
        self.sock: socket.socket | None = None
        self.worker_end: socket.socket | None = None

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
        if self.sock is not None:
            self.sock.close()

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "socket":
            return self.sock if self.sock is not None else default  # no socket: no setsockopt, no peek on a fake
        return self.peer if name == "peername" else default

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
    port in `errors`. With `sockets`, each transport carries a real socket pair (FakeTransport.sock and
    worker_end); `closed_first` counts, per port, the next connections whose worker closes its end as soon as
    it accepts them, before our request could arrive (a worker whose idle timer runs from accept, while
    corral's loop is busy elsewhere).
    """

    def __init__(self) -> None:
        self.timers: list[Timer] = []
        self.tasks: list = []
        self.errors: dict[int, list[OSError]] = {}
        self.upstreams: list[UpstreamConnection] = []
        self.sockets = False
        self.closed_first: Counter[int] = Counter()

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
        if self.sockets:
            transport.sock, transport.worker_end = socket.socketpair()
            if self.closed_first[port] > 0:
                self.closed_first[port] -= 1
                transport.worker_end.close()
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
    """An interfaces.Client fed raw request bytes through the real request edge (one exchange at a time).

    `stall`: every write fills the client's buffer (writing_paused turns True), until `drain()`.
    """

    def __init__(self, rig: Rig, spill_limit: int | None = None) -> None:
        self.rig = rig
        self.peer = b"127.0.0.1"
        self.proto = b"http"
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

    # interfaces.Client
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

    def queued(self) -> None:
        pass

    def drop_departed(self) -> None:
        pass  # the rig's clients leave only when a test says so, and are seen to at once

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

    def __init__(self, workers: int = 1, max_inflight: int = 1, sockets: bool = False, **app: object) -> None:
        app.setdefault("dispatch", "fifo")
        self.app = AppConfig(workers=workers, max_inflight=max_inflight, **app)
        self.loop = FakeLoop()
        self.loop.sockets = sockets
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
