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
import socket
import time
from collections import deque
from typing import TYPE_CHECKING

from . import edge
from .exchange import PAUSE_BUFFER, PAUSE_PIPELINE, PAUSE_UPSTREAM, Exchange
from .net import bind_tcp
from .scheduler import QueueFull

if TYPE_CHECKING:
    from .config import ServerConfig
    from .pool import Pool
    from .tunnel import Tunnel


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
        self.send_timeout = server.send_timeout
        self.max_connections = server.max_connections or 1024  # server.py sizes it from the fd limit
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
        self._ticker = self.loop.call_later(0.1, self._tick)  # first, so no error can stop the clocks
        now = time.monotonic()
        for pool in self.pools:
            pool.expire(now)
        self._tick_n += 1
        if self._tick_n % 5 == 0:
            for conn in list(self.connections):
                conn.check_timeouts(now)


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
        self.write_blocked = False  # the transport's buffer is over its high-water mark
        self.buffer_limit = -1
        self.last_active = time.monotonic()
        self.head_started = 0.0
        self.send_progress = 0.0  # when the client last took response bytes (send_timeout)
        self.send_backlog = 0
        self.tunnel: Tunnel | None = None  # set once a WebSocket upgrade switched this connection

    # --- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        proxy = self.proxy
        if len(proxy.connections) >= self.edge.max_connections:
            proxy.refused += 1
            transport.write(edge.error_response(503, "too many connections", retry_after=1))  # type: ignore[attr-defined]
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
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        now = time.monotonic()
        self.last_active = now
        if not self.reader.in_head and self.parsing is None:
            self.head_started = now
        try:
            self.reader.feed(data)
        except edge.EdgeError as exc:
            self.reject(exc.status, exc.reason)

    def eof_received(self) -> bool:
        # A client that half-closes has given up on anything not yet answered (as nginx assumes).
        self._abandon()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.proxy.connections.discard(self)
        self._abandon()

    def pause_writing(self) -> None:
        self.write_blocked = True
        if self.tunnel is not None:
            self.tunnel.client_full()

    def resume_writing(self) -> None:
        self.write_blocked = False
        self.send_progress = time.monotonic()
        if self.tunnel is not None:
            self.tunnel.client_drained()
        elif self.current is not None:
            self.current.client_writable()

    # --- what an Exchange uses (exchange.Client) ------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def writing_paused(self) -> bool:
        return self.write_blocked

    def switch(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def pause_reading(self) -> None:
        self.pause(PAUSE_UPSTREAM)

    def resume_reading(self) -> None:
        self.resume(PAUSE_UPSTREAM)

    # --- request edge callbacks -------------------------------------------------------------
    def on_request(self, head: edge.RequestHead) -> None:
        pool, prefix = self.proxy.router.match(head.target)
        if pool is not None and prefix and pool.strip_prefix:
            rest = head.target[len(prefix) :]
            head.target = rest if rest.startswith(b"/") else b"/" + rest
        else:
            prefix = b""
        ex = Exchange(self, head, pool, prefix, pool.app.response_buffer_file if pool is not None else 0)
        self.parsing = ex
        if self.current is None:
            self.current = ex
            self.start(ex)
        else:
            self.pipeline.append(ex)
            self.pause(PAUSE_PIPELINE)

    def on_request_body(self, data: bytes) -> None:
        if self.parsing is not None:
            self.parsing.request_body(data)

    def on_request_end(self) -> None:
        ex, self.parsing = self.parsing, None
        if ex is not None:
            ex.request_end()

    def on_tunnel_data(self, data: bytes) -> None:
        # Bytes behind a WebSocket upgrade request, before the switch: frames the worker reads after its 101.
        if self.tunnel is not None:
            self.tunnel.from_client(data)
        elif self.current is not None:
            self.current.tunnel_data(data)

    # --- running exchanges -----------------------------------------------------------------
    def start(self, ex: Exchange) -> None:
        pool = ex.pool
        if pool is None:
            ex.respond_error(404, "no app serves this path", json=True)
            return
        limit = pool.app.response_buffer
        if limit != self.buffer_limit and self.transport is not None:
            self.buffer_limit = limit
            self.transport.set_write_buffer_limits(high=limit)
        try:
            pool.submit(ex)
        except QueueFull as full:
            ex.respond_error(503, full.reason, retry_after=full.retry_after)


    def exchange_done(self, ex: Exchange, keep_alive: bool) -> None:
        """The exchange has ended: move on to the next pipelined request, or close."""
        if ex is not self.current:
            return  # a pipelined request whose client left before it started
        self.current = None
        if self.tunnel is not None:
            return  # the connection belongs to the tunnel now
        self.last_active = time.monotonic()
        if not keep_alive or self.closing:
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
        ex, self.parsing = self.parsing, None
        cur = self.current
        if cur is None or ex is cur:
            if cur is not None and cur.head_sent:
                self.close()  # a response is under way: a second one cannot follow it
                return
            self.write(edge.error_response(status, reason))
            if cur is not None:
                self.current = None
                cur.client_left(status)  # a worker holding half of this request must not wait for the rest
            self._abandon()
            self.close()
        # else: the response owed to earlier requests goes out first; close follows exchange_done

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
        """The client is gone: every exchange it still had ends here (each is logged once)."""
        if self.tunnel is not None:
            self.tunnel.close()
        pending = [self.current, *self.pipeline]
        self.current = None
        self.pipeline.clear()
        for ex in pending:
            if ex is not None:
                ex.client_left()

    def check_timeouts(self, now: float) -> None:
        if self.tunnel is not None:
            self.tunnel.check_idle(now)
            return
        self._check_send(now)
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

    def _check_send(self, now: float) -> None:
        # send_timeout: the client took none of the bytes we hold for it for that long.
        transport = self.transport
        backlog = transport.get_write_buffer_size() if transport is not None else 0
        if backlog < self.send_backlog or not backlog:
            self.send_progress = now
        self.send_backlog = backlog
        if backlog and now - self.send_progress > self.edge.send_timeout and transport is not None:
            transport.abort()  # connection_lost ends the exchange as cut


def make_listener(host: str, port: int) -> socket.socket:
    """Bind early (before any worker starts) so a busy port fails fast with its number."""
    sock = bind_tcp(host, port)
    sock.listen(1024)
    sock.setblocking(False)
    return sock

