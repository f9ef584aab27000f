"""The client half of the data path: public socket -> request edge -> pool -> and back.

Read top to bottom: Proxy accepts and routes; ClientConnection parses requests with the sans-I/O
edge and holds them in order (pipelining-safe: one exchange at a time per connection); Exchange is
one request's life (queued -> dispatched -> responding -> done) and the scheduler's job; the
upstream socket side lives in pool.py. Everything is callbacks on asyncio Protocols: no task per
request, no task per byte.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
import socket
import time
from collections import deque
from typing import TYPE_CHECKING

from . import edge
from .costs import SHORT
from .scheduler import QUEUED, QueueFull

if TYPE_CHECKING:
    from .config import ServerConfig
    from .pool import Pool, UpstreamConnection
    from .worker import Worker

# Reasons the client socket's reading is paused; reading resumes only when none is left.
PAUSE_PIPELINE, PAUSE_UPSTREAM, PAUSE_BUFFER = 1, 2, 4
BODY_BUFFER_LIMIT = 256 * 1024  # request body held while queued before reading is paused

_rid_prefix = os.urandom(4).hex().encode()
_rid_counter = itertools.count(1)


def new_request_id() -> bytes:
    return b"%s-%x" % (_rid_prefix, next(_rid_counter))


class Router:
    """Longest route prefix wins, on path-segment boundaries (/api never matches /apix)."""

    def __init__(self, pools: list[Pool]) -> None:
        self.pools = sorted(pools, key=lambda p: len(p.route), reverse=True)
        self._single = pools[0] if len(pools) == 1 and pools[0].route == "/" else None

    def match(self, target: bytes) -> tuple[Pool | None, bytes]:
        if self._single is not None:
            return self._single, b""
        path = target.split(b"?", 1)[0]
        for pool in self.pools:
            route = pool.route.encode()
            if route == b"/" or path == route or path.startswith(route + b"/"):
                return pool, (route if route != b"/" else b"")
        return None, b""


class Edge:
    """Settings the client connections share (limits, timeouts, trust), built once."""

    def __init__(self, server: ServerConfig) -> None:
        self.limits = edge.EdgeLimits(server.max_header_bytes, server.max_headers, server.max_body)
        self.header_timeout = server.header_timeout
        self.body_timeout = server.body_timeout
        self.keepalive_timeout = server.keepalive_timeout
        self.max_connections = server.max_connections
        self.trusted = [
            ipaddress.ip_network(c.strip(), strict=False) for c in server.trusted_proxies.split(",") if c.strip()
        ]

    def is_trusted(self, ip: str) -> bool:
        if not self.trusted:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted)


class Proxy:
    """The public listener: accepts, routes, and runs the coarse timers (queue, request, idle)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, server: ServerConfig, pools: list[Pool]) -> None:
        self.loop = loop
        self.edge = Edge(server)
        self.router = Router(pools)
        self.pools = pools
        self.connections: set[ClientConnection] = set()
        self.server: asyncio.AbstractServer | None = None
        self.refused = 0
        self._ticker: asyncio.TimerHandle | None = None
        self._tick_n = 0

    async def start(self, sock: socket.socket) -> None:
        self.server = await self.loop.create_server(lambda: ClientConnection(self), sock=sock, backlog=1024)
        self._ticker = self.loop.call_later(0.1, self._tick)

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    def close_idle_connections(self) -> None:
        for conn in list(self.connections):
            if conn.current is None:
                conn.close()

    def busy(self) -> bool:
        return any(p.inflight or p.scheduler.depth for p in self.pools)

    def _tick(self) -> None:
        # One timer for everything: per-request timers would cost a heap push per request.
        now = time.monotonic()
        for pool in self.pools:
            pool.expire(now)
        self._tick_n += 1
        if self._tick_n % 5 == 0:
            for conn in list(self.connections):
                conn.check_timeouts(now)
        self._ticker = self.loop.call_later(0.1, self._tick)


class ClientConnection(asyncio.Protocol):
    """One client socket: parses requests, runs them one at a time, writes responses in order."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.edge = proxy.edge
        self.reader = edge.RequestReader(self, proxy.edge.limits)
        self.transport: asyncio.Transport | None = None
        self.peer = b"127.0.0.1"
        self.trusted = False
        self.current: Exchange | None = None  # the exchange whose response is being produced
        self.parsing: Exchange | None = None  # the exchange whose request bytes are arriving
        self.pipeline: deque[Exchange] = deque()
        self.paused = 0
        self.closing = False
        self.last_active = time.monotonic()
        self.head_started = 0.0

    # --- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        proxy = self.proxy
        if len(proxy.connections) >= self.edge.max_connections:
            proxy.refused += 1
            transport.write(edge.error_response(503, "too many connections", close=True, retry_after=1))
            transport.close()
            self.closing = True
            return
        proxy.connections.add(self)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = str(peer[0]).encode()
            self.trusted = self.edge.is_trusted(str(peer[0]))
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.last_active = now
        if not self.reader.in_head and self.parsing is None:
            self.head_started = now
        try:
            self.reader.feed(data)
        except edge.EdgeError as exc:
            self.reject(exc.status, exc.reason)

    def eof_received(self) -> bool:
        # A client that half-closes has given up on anything not yet dispatched (as nginx assumes).
        self._abandon()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.proxy.connections.discard(self)
        self._abandon()

    def pause_writing(self) -> None:
        ex = self.current
        if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
            ex.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        ex = self.current
        if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
            ex.upstream.transport.resume_reading()

    # --- request edge callbacks -------------------------------------------------------------
    def on_request(self, head: edge.RequestHead) -> None:
        ex = Exchange(self, head)
        self.parsing = ex
        if self.current is None:
            self.current = ex
            self.start(ex)
        else:
            self.pipeline.append(ex)
            self.pause(PAUSE_PIPELINE)

    def on_request_body(self, data: bytes) -> None:
        ex = self.parsing
        if ex is None:
            return
        ex.body_last = time.monotonic()
        if ex.upstream is not None and ex is self.current:
            ex.upstream.write(edge.chunk(data) if ex.head.chunked else data)
            return
        if ex.closed:
            return  # answered already (e.g. 503): the rest of its body is read and dropped
        ex.body_buf.append(data)
        ex.body_buffered += len(data)
        if ex.body_buffered > BODY_BUFFER_LIMIT:
            self.pause(PAUSE_BUFFER)

    def on_request_end(self) -> None:
        ex = self.parsing
        self.parsing = None
        if ex is None:
            return
        ex.request_done = True
        if ex.upstream is not None and ex is self.current and ex.head.chunked:
            ex.upstream.write(edge.LAST_CHUNK)
        if ex.closed and ex is self.current:
            self.exchange_done(ex)

    # --- running exchanges -----------------------------------------------------------------
    def start(self, ex: Exchange) -> None:
        pool, prefix = self.proxy.router.match(ex.head.target)
        if pool is None:
            ex.respond_error(404, "no app serves this path", json=True)
            return
        ex.pool = pool
        if prefix and pool.strip_prefix:
            ex.prefix = prefix
            rest = ex.head.target[len(prefix) :]
            ex.head.target = rest if rest.startswith(b"/") else b"/" + rest
        try:
            pool.submit(ex)
        except QueueFull as full:
            ex.respond_error(503, full.reason, retry_after=full.retry_after)

    def exchange_done(self, ex: Exchange) -> None:
        """The response is fully written; move on to the next pipelined request, if any."""
        if ex is not self.current:
            return
        self.current = None
        self.last_active = time.monotonic()
        if not ex.keep_alive() or self.closing:
            self.close()
            return
        if self.pipeline:
            nxt = self.pipeline.popleft()
            self.current = nxt
            if not self.pipeline:
                self.resume(PAUSE_PIPELINE)
            self.start(nxt)
        self.resume(PAUSE_BUFFER)

    def reject(self, status: int, reason: str) -> None:
        """A request the edge refused: answer it (after any response owed first) and close."""
        self.pause(PAUSE_PIPELINE)
        self.closing = True
        ex = self.parsing
        self.parsing = None
        if self.current is None or ex is self.current:
            if self.current is not None and self.current.response_started:
                self.close()
                return
            cur, self.current = self.current, None
            self.write_raw(edge.error_response(status, reason, close=True))
            if cur is not None:
                cur.client_left()  # a worker holding half of this request must not wait for the rest
            self._abandon()
            self.close()
        # else: the response owed to earlier requests goes out first; close follows exchange_done

    def write_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause(self, why: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= why

    def resume(self, why: int) -> None:
        if not self.paused & why:
            return
        self.paused &= ~why
        if not self.paused and self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _abandon(self) -> None:
        """The client is gone: drop what was queued, let what a worker holds finish unseen."""
        for ex in [self.current, *self.pipeline]:
            if ex is not None:
                ex.client_left()
        self.pipeline.clear()

    def check_timeouts(self, now: float) -> None:
        ex = self.current
        parsing = self.parsing
        if self.paused or self.closing:
            # We stopped reading (queue full of body, pipelined request, slow worker): the client
            # cannot be late, so its clocks restart rather than run.
            self.head_started = now
            if parsing is not None:
                parsing.body_last = now
            return
        if self.reader.in_head:
            if ex is not None:
                self.head_started = now  # a pipelined head: its clock starts once our answer is out
            elif now - self.head_started > self.edge.header_timeout:
                self.reject(408, "request head not received in time")
        elif parsing is not None and not parsing.request_done:
            if now - parsing.body_last > self.edge.body_timeout:
                self.reject(408, "request body stalled")
        elif ex is None and now - self.last_active > self.edge.keepalive_timeout:
            self.close()


class Exchange:
    """One request from arrival to the last response byte. Also the scheduler's job."""

    __slots__ = (
        "body_buf",
        "body_buffered",
        "body_last",
        "bytes_out",
        "chunked_out",
        "client",
        "client_gone",
        "closed",
        "cls",
        "cost",
        "created",
        "dispatched_at",
        "head",
        "out_head",
        "pool",
        "prefix",
        "queued_at",
        "request_done",
        "request_id",
        "response_length",
        "response_started",
        "route",
        "sched_state",
        "served_by",
        "status",
        "upstream",
        "worker",
    )

    def __init__(self, client: ClientConnection, head: edge.RequestHead) -> None:
        self.client = client
        self.head = head
        self.request_id = head.header(b"x-request-id") or new_request_id()
        self.pool: Pool | None = None
        self.worker: Worker | None = None
        self.served_by: Worker | None = None
        self.upstream: UpstreamConnection | None = None
        self.prefix = b""
        now = time.monotonic()
        self.created = now
        self.queued_at = now
        self.dispatched_at = 0.0
        self.body_last = now
        self.sched_state = 0
        self.cls = SHORT
        self.cost = 0.0
        self.route = ""
        self.body_buf: list[bytes] = []
        self.body_buffered = 0
        self.request_done = False
        self.response_started = False
        self.out_head = b""
        self.response_length: int | None = None
        self.chunked_out = False
        self.client_gone = False
        self.closed = False
        self.status = 0
        self.bytes_out = 0

    def keep_alive(self) -> bool:
        return self.head.keep_alive and self.request_done and not self.client.closing

    # --- toward the worker -------------------------------------------------------------------
    def upstream_head(self) -> bytes:
        self.served_by = self.worker
        client = self.client
        return edge.forward_head(self.head, client.peer, self.request_id, client.trusted, prefix=self.prefix)

    def flush_body(self, conn: UpstreamConnection) -> None:
        """Called once the worker connection is ours: 100-continue, then whatever body is buffered."""
        head = self.head
        if head.expect_continue and not self.request_done and not self.body_buf:
            self.client.write_raw(edge.CONTINUE)
        if self.body_buf:
            data = b"".join(self.body_buf)
            self.body_buf = []
            self.body_buffered = 0
            conn.write(edge.chunk(data) if head.chunked else data)
            self.client.resume(PAUSE_BUFFER)
        if self.request_done and head.chunked:
            conn.write(edge.LAST_CHUNK)

    # --- from the worker (UpstreamConnection relays the parser callbacks) ----------------------
    def on_response(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        self.status = status
        self.response_started = True
        self.response_length = length
        client = self.client
        close = not self.head.keep_alive or client.closing
        self.chunked_out = length is None and self.head.version == b"1.1" and self.head.method != b"HEAD"
        if length is None and not self.chunked_out:
            close = True  # HTTP/1.0 client: the body ends when we close
            client.closing = True
        # Held until the first body bytes: one write (one syscall) instead of two for small responses,
        # and a worker that dies before its body can still be answered with a clean 502.
        self.out_head = edge.response_head(status, headers, length, self.request_id, self.chunked_out, close)

    def on_response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.chunked_out:
            data = edge.chunk(data)
        if self.out_head:
            data = self.out_head + data
            self.out_head = b""
        if not self.client_gone:
            self.client.write_raw(data)

    def on_response_end(self, conn: UpstreamConnection, reusable: bool) -> None:
        tail = edge.LAST_CHUNK if self.chunked_out else b""
        if self.out_head:
            tail = self.out_head + tail
            self.out_head = b""
        if tail and not self.client_gone:
            self.client.write_raw(tail)
        self._finish(conn, reusable and self.request_done)

    def _finish(self, conn: UpstreamConnection | None, reusable: bool) -> None:
        self.upstream = None
        pool = self.pool
        if pool is not None:
            pool.served += 1
            pool.release(self, conn, reusable, served=True)
            pool.on_observe(self)
        self.closed = True
        if not self.request_done:
            self.client.closing = True  # the rest of the body cannot be told apart from a new request
        self.client.exchange_done(self)

    def upstream_failed(self, why: str) -> None:
        """The worker connection broke or lied mid-exchange: this request alone pays (502)."""
        conn = self.upstream
        self.upstream = None
        worker = self.worker
        if worker is not None:
            worker.failed += 1
        if self.pool is not None:
            self.pool.failed += 1
            if worker is not None:
                # A worker that drops a request may be dying, its kernel still accepting for a moment:
                # the queue must not follow it there. An upstream stays out until a probe answers; a
                # supervised worker sits out a moment, long enough for its exit to be seen.
                if worker.external:
                    self.pool.on_unreachable(worker, why)
                else:
                    self.pool.quarantine(worker)
        if self.response_started and not self.out_head:
            self.status = self.status or 502
            if self.pool is not None:
                self.pool.release(self, conn, False)
            self.client.close()  # a truncated body must look truncated
            self.closed = True
            self.client.exchange_done(self)
            return
        if self.pool is not None:
            self.pool.release(self, conn, False)
        self.respond_error(502, "the worker failed while handling this request")

    # --- corral's own answers -------------------------------------------------------------
    def respond_error(self, status: int, message: str, retry_after: int | None = None, json: bool = False) -> None:
        self.status = status
        self.closed = True
        self.out_head = b""
        close = not self.request_done or not self.head.keep_alive
        if close:
            self.client.closing = True
        if not self.client_gone:
            self.client.write_raw(
                edge.error_response(status, message, self.request_id, close=close, retry_after=retry_after, json=json)
            )
        if self.pool is not None:
            self.pool.on_observe(self)
        if self.request_done or close:
            self.client.exchange_done(self)

    def queue_timed_out(self, retry_after: int) -> None:
        self.respond_error(503, "timed out waiting for a free worker", retry_after=retry_after)

    def request_timed_out(self) -> None:
        conn = self.upstream
        self.upstream = None
        if self.pool is not None:
            self.pool.failed += 1
            if self.worker is not None:
                self.worker.failed += 1
            self.pool.release(self, conn, False)
        if self.response_started and not self.out_head:
            self.status = 504
            self.client.close()
            self.closed = True
            self.client.exchange_done(self)
        else:
            self.respond_error(504, "the worker did not answer in time")

    def client_left(self) -> None:
        self.client_gone = True
        if self.sched_state == QUEUED and self.pool is not None:
            self.pool.cancel(self)
        elif self.upstream is not None and not self.request_done:
            # The worker has a partial request it can never finish: drop that connection.
            conn = self.upstream
            self.upstream = None
            if self.pool is not None:
                self.pool.release(self, conn, False)


def make_listener(host: str, port: int) -> socket.socket:
    """Bind early (before any worker starts) so a busy port fails fast with its number."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock

