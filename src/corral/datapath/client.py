"""The client half of the data path: public socket -> request edge -> exchange, and the response back.

Read top to bottom: Proxy accepts and routes; ClientConnection parses requests with the sans-I/O
edge and holds them in order (pipelining-safe: one exchange at a time per connection). Each request
becomes an Exchange (exchange.py: one request's life, and the scheduler's job), which its app's Pool
(pool.py) dispatches to a worker connection (upstream.py). Everything is callbacks on asyncio
Protocols: no task per request, no task per byte.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections import deque
from typing import TYPE_CHECKING

from .. import edge
from ..net import bind_tcp
from ..portable import paths
from .exchange import Exchange
from .fairness import origin
from .interfaces import PAUSE_BUFFER, PAUSE_PIPELINE, PAUSE_REFUSED, PAUSE_UPSTREAM
from .outcomes import CUT_CLIENT, CUT_SEND_TIMEOUT, Refusal
from .scheduler import QUEUED
from .upstream import peer_closed

# struct tcp_info's first byte, tcpi_state: a paused connection's client may have closed or reset it
_TCP_INFO = getattr(socket, "TCP_INFO", None) if paths().tcp_info else None  # Linux only (corral.portable)
_TCP_ESTABLISHED = 1
TLS_SHUTDOWN = 1.0  # s: how long a TLS connection being closed waits for the client's close_notify
RECENTLY_QUEUED = 16  # connections drop_departed looks at before a 503 (those queued in the last loop turns)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..config import ServerConfig
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
        self.tls = server.tls_cert is not None
        self.proto = b"https" if self.tls else b"http"

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
        # Requests refused before their path was known are counted (and logged) with the app on "/", or the
        # first app when none serves "/".
        self.default_pool = next((p for p in pools if p.route == "/"), pools[0] if pools else None)
        self.connections: set[ClientConnection] = set()
        # The connections whose requests were queued last: the ones whose close may still be unread (drop_departed)
        self.recently_queued: deque[ClientConnection] = deque(maxlen=RECENTLY_QUEUED)
        self.server: asyncio.AbstractServer | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._tick_n = 0
        self.handshakes = 0  # TLS handshakes under way (TLSAccept): they hold descriptors as connections do

    async def start(self, sock: socket.socket, tls: ssl.SSLContext | None = None) -> None:
        """Serve on `sock`; with `tls` (tls.Certificates.context), HTTPS only.

        A TLS handshake is the first part of a request head: a client that has not finished one within
        header_timeout is cut (the handshake timeout; the connection is not ours until it completes). Then the
        usual clocks run: keepalive_timeout for the first byte, header_timeout for the head. A TLS connection
        that corral closes waits at most TLS_SHUTDOWN for the client's close_notify, not asyncio's 30 s, so
        closed connections do not hold descriptors."""
        if tls is None:
            factory: Callable[[], asyncio.Protocol] = lambda: ClientConnection(self)  # noqa: E731
        else:
            factory = lambda: TLSAccept(self, tls)  # noqa: E731
        self.server = await self.loop.create_server(factory, sock=sock, backlog=1024)
        self._ticker = self.loop.call_later(0.1, self._tick)

    def over_capacity(self) -> bool:
        """max_connections is reached: client connections and TLS handshakes under way count alike."""
        return len(self.connections) + self.handshakes >= self.edge.max_connections

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    def close_idle_connections(self) -> None:
        """The end of a stop's drain: idle connections are closed; an open WebSocket session is told the
        server is going away (a close frame, status 1001, at a frame boundary) and its worker side closed."""
        for conn in list(self.connections):
            if conn.tunnel is not None:
                conn.tunnel.go_away()
            elif conn.current is None:
                conn.close()

    def open_sessions(self) -> int:
        """WebSocket tunnels open now (a stop drains them as a reload does)."""
        return sum(1 for conn in self.connections if conn.tunnel is not None and not conn.tunnel.closed)

    def refused(self, conn: ClientConnection, status: int) -> None:
        """A request refused before it became an exchange: in the access log and the counters all the same."""
        pool = self.default_pool
        if pool is not None:
            pool.finished(Refusal(conn, status))

    def busy(self) -> bool:
        """What a stop waits for (up to graceful_timeout): requests in flight or queued, open sessions, and
        every exchange not yet ended: an upload still arriving, a response still going to its client."""
        if any(p.inflight or p.scheduler.depth for p in self.pools) or self.open_sessions() > 0:
            return True
        return any(conn.current is not None for conn in self.connections)

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


class TLSAccept(asyncio.Protocol):
    """A TLS client before its handshake is done. asyncio's create_server(ssl=...) makes the protocol only once
    the handshake completes, so a client that sends half a ClientHello and holds was no connection to
    max_connections: any number of them held a descriptor each for header_timeout. Here the TCP connection is
    accepted plain and counted from its accept (Proxy.handshakes): one past the cap is closed at once (there is
    no TLS yet to say 503 in); the others get the loop's own TLS protocol, as create_server(ssl=...) gives it,
    with a ClientConnection behind it that is made when the handshake completes."""

    def __init__(self, proxy: Proxy, tls: ssl.SSLContext) -> None:
        self.proxy = proxy
        self.tls = tls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        proxy = self.proxy
        if proxy.over_capacity():
            transport.abort()  # type: ignore[attr-defined]
            return
        conn = ClientConnection(proxy)
        conn.handshaking = True
        proxy.handshakes += 1
        waiter = proxy.loop.create_future()
        waiter.add_done_callback(lambda w: self._handshake_over(w, conn))
        tls_protocol = _tls_protocol(proxy.loop)(
            proxy.loop,
            conn,
            self.tls,
            waiter,
            server_side=True,
            ssl_handshake_timeout=proxy.edge.header_timeout,
            ssl_shutdown_timeout=TLS_SHUTDOWN,
        )
        # Synchronously, before this callback returns: no byte of the ClientHello is read by anyone but it.
        transport.set_protocol(tls_protocol)
        tls_protocol.connection_made(transport)

    def _handshake_over(self, waiter: asyncio.Future[None], conn: ClientConnection) -> None:
        if not waiter.cancelled():
            waiter.exception()  # a failed handshake is the client's affair: retrieved, so never logged
        if conn.handshaking:  # it failed or timed out (on success, conn.connection_made counted it out)
            conn.handshaking = False
            self.proxy.handshakes -= 1


def _tls_protocol(loop: asyncio.AbstractEventLoop) -> type:
    """The TLS protocol class the loop's own create_server(ssl=...) would use: uvloop's (compiled) on uvloop."""
    if type(loop).__module__.startswith("uvloop"):
        import uvloop.loop

        return uvloop.loop.SSLProtocol  # type: ignore[attr-defined,no-any-return]
    import asyncio.sslproto

    return asyncio.sslproto.SSLProtocol


class ClientConnection(asyncio.Protocol):
    """One client socket: parses requests, runs them one at a time, writes responses in order."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.edge = proxy.edge
        self.reader = edge.RequestReader(self, proxy.edge.limits)
        self.transport: asyncio.Transport | None = None
        self.peer = b"127.0.0.1"
        self.trusted = False
        self.proto = proxy.edge.proto
        self.current: Exchange | None = None  # the exchange whose response is being produced
        self.parsing: Exchange | None = None  # the exchange whose request bytes are arriving
        self.upgrading: Exchange | None = None  # a WebSocket upgrade request: every later byte is its tunnel's
        self.pipeline: deque[Exchange] = deque()
        self.paused = 0
        self.closing = False
        self.write_blocked = False  # the transport's buffer is over its high-water mark
        self.buffer_limit = -1
        self.last_active = time.monotonic()
        self.head_started = 0.0
        self.written = 0  # bytes handed to the transport
        self.flushed = 0  # of those, bytes the kernel had taken when last seen (a lower bound)
        self.send_progress = 0.0  # when `flushed` last grew, or the backlog was empty (send_timeout)
        self.flush_wait = False  # an exchange waits for the client to take every byte before it ends
        self.refusal: bytes | None = None  # an edge error owed after the responses before it
        self.tunnel: Tunnel | None = None  # set once a WebSocket upgrade switched this connection
        self.handshaking = False  # made by TLSAccept, its handshake under way: counted in Proxy.handshakes
        self.resuming = False  # inside resume_writing: the transport's own write callback is running (close)

    # --- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send_progress = time.monotonic()
        proxy = self.proxy
        if self.handshaking:  # its TLS handshake is done: a connection from now on, no longer a handshake
            self.handshaking = False
            proxy.handshakes -= 1
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = str(peer[0]).encode()
        if proxy.over_capacity():
            self.closing = True
            transport.write(edge.error_response(503, "too many connections", retry_after=1))  # type: ignore[attr-defined]
            transport.close()
            proxy.refused(self, 503)
            return
        proxy.connections.add(self)
        if peer:
            self.trusted = self.edge.is_trusted(str(peer[0]))
        # No TCP_NODELAY here: uvloop's and asyncio's TCP transports set it on every connection themselves, and
        # the socket is fetched only when TCP_INFO is read (_peer_gone): each costs system calls per connection.

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        now = time.monotonic()
        self.last_active = now
        parsing = self.parsing
        if parsing is not None:
            parsing.body_last = now  # any byte of the body counts, chunk framing too (as nginx counts reads)
        elif not self.reader.in_head:
            self.head_started = now
        try:
            self.reader.feed(data)
        except edge.EdgeError as exc:
            self.reject(exc.status, exc.reason)

    def eof_received(self) -> bool:
        # A client that half-closes has given up on anything not yet answered (as nginx assumes). An answer
        # corral already holds whole still goes to it, through the half-closed connection; then it closes
        # (or send_timeout cuts it, should the client not read it either).
        self._unsent_now()
        cur = self.current
        if self.edge.tls:
            # TLS has no half-close: the TLS layer closes the connection after its client's close_notify or EOF
            # whatever is returned here (asyncio warns if True is), so what is unanswered is abandoned now.
            self._abandon(CUT_CLIENT)
            return False
        if cur is not None and cur.response_complete and not cur.ended and not cur.switched:
            self.closing = True
            pending, self.pipeline = list(self.pipeline), deque()
            for ex in pending:
                ex.client_left()
            return True  # keep the transport open for writing: exchange_done closes it
        self._abandon(CUT_CLIENT)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.proxy.connections.discard(self)
        self._abandon(CUT_CLIENT)

    def pause_writing(self) -> None:
        self.write_blocked = True
        self._unsent_now()
        if self.tunnel is not None:
            self.tunnel.client_full()

    def resume_writing(self) -> None:
        self.resuming = True
        try:
            self._resume_writing()
        finally:
            self.resuming = False

    def _resume_writing(self) -> None:
        self.write_blocked = False
        self.send_progress = time.monotonic()
        self._unsent_now()
        if self.flush_wait:
            self.flush_wait = False
            if self.transport is not None:  # back to the app's response_buffer (or asyncio's default)
                self.transport.set_write_buffer_limits(high=self.buffer_limit if self.buffer_limit >= 0 else None)
        if self.tunnel is not None:
            self.tunnel.client_drained()
        elif self.current is not None:
            self.current.client_writable()

    def origin(self, forwarded: bytes) -> bytes:
        """The client a trusted proxy forwarded for, from its X-Forwarded-For (fair queueing's key)."""
        return origin(forwarded, self.edge.is_trusted)

    # --- what an Exchange uses (interfaces.Client) ------------------------------------------------
    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            was_flushed = self.flushed == self.written
            self.written += len(data)
            transport.write(data)
            self.flushed = self.written - transport.get_write_buffer_size()
            if was_flushed and self.flushed != self.written:
                self.send_progress = time.monotonic()  # send_timeout counts from when bytes began to wait

    def writing_paused(self) -> bool:
        return self.write_blocked

    def taken(self) -> int:
        """Bytes of what corral wrote that the client's socket took: left corral's buffer for the kernel, as
        last seen (after a reset the buffer is gone: what was not seen to leave counts as not taken). Not what
        the client's TCP acknowledged: a delayed ACK that a reset replaces would hide bytes the client read."""
        return self.written - self._unsent_now()

    def _unsent_now(self) -> int:
        transport = self.transport
        # A transport that is closing may have dropped its buffer already (abort, a reset): keep the last view.
        if transport is not None and not transport.is_closing():
            self.flushed = self.written - transport.get_write_buffer_size()
        return self.written - self.flushed

    def wait_flushed(self) -> bool:
        """True if the client's socket has taken every byte; else False, and the current exchange's
        client_writable() follows once it has (a response is not whole until the client has it). A transport
        already closing has failed (a reset on write): connection_lost will end the exchange as cut."""
        transport = self.transport
        if transport is None:
            return True
        if transport.is_closing():
            return False
        if not self._unsent_now():
            return True
        if not self.flush_wait:
            self.flush_wait = True
            self.write_blocked = True
            transport.set_write_buffer_limits(high=0, low=0)  # resume_writing once the buffer is empty
        return False

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
        if pool is None:
            ex = Exchange(self, head, None, prefix)
        else:
            app = pool.app
            memory = app.request_buffer if app.request_buffering and head.has_body else None
            ex = Exchange(self, head, pool, prefix, app.response_buffer_file, memory)
        self.parsing = ex
        if head.websocket:
            self.upgrading = ex
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
        elif self.upgrading is not None:  # the upgrade request's, even while it waits behind another
            self.upgrading.tunnel_data(data)

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
        ex.begin()

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
        elif self.refusal is not None:
            self.write(self.refusal)  # the edge error owed behind the responses before it
            self.refusal = None
            self.close()
            return
        self.resume(PAUSE_BUFFER)

    def reject(self, status: int, reason: str) -> None:
        """A request the edge refused: counted and logged, answered (after the responses owed before it), and
        the connection closed: nothing after it can be trusted to be a request."""
        self.pause(PAUSE_REFUSED)
        ex, self.parsing = self.parsing, None
        cur = self.current
        if ex is None:
            self.proxy.refused(self, status)
        elif ex is not cur:
            self.pipeline.remove(ex)  # a pipelined request: its answer goes out after the ones before it
            ex.refuse(status)
        error = edge.error_response(status, reason)
        if cur is not None and cur is not ex:
            self.refusal = error  # exchange_done writes it once the responses before it are out
            return
        self.closing = True
        if cur is not None and cur.head_sent:
            self.close()  # a response is under way: a second one cannot follow it (the exchange ends cut)
            return
        self.write(error)
        if cur is not None:
            cur.refuse(status)  # a worker holding half of this request must not wait for the rest
        self._abandon(CUT_CLIENT)
        self.close()

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
        transport = self.transport
        if transport is None:
            return
        if self.resuming:
            # asyncio's selector transport calls resume_writing from its write callback as its buffer empties, and
            # then, seeing itself closing, calls connection_lost at once; a close() in between has scheduled a
            # second call, which the loop reports as an AttributeError (CPython gh-156512, in 3.11-3.13). An
            # answer that ends the connection once the client has it all (wait_flushed) closes there: just after.
            self.proxy.loop.call_soon(transport.close)
            return
        transport.close()

    def _abandon(self, why: str) -> None:
        """The client is gone: every exchange it still had ends here (each is logged once)."""
        if self.tunnel is not None:
            self.tunnel.close()
        pending = [self.current, *self.pipeline]
        self.current = None
        self.pipeline.clear()
        for ex in pending:
            if ex is not None:
                ex.client_left(why=why)

    def check_timeouts(self, now: float) -> None:
        if self.tunnel is not None:
            self._check_tunnel(self.tunnel, now)
            return
        if self.paused and self._peer_gone():
            # Not reading (a pipelined request waits, a queued body is full), so no EOF or reset can reach
            # us: the kernel's view of the connection tells instead, and what the client left is dropped.
            self._abandon(CUT_CLIENT)
            self.close()
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
            if parsing.awaiting_continue():
                parsing.body_last = now  # the client waits for our 100 Continue: it cannot be late yet
            elif now - parsing.body_last > self.edge.body_timeout:
                self.reject(408, "request body stalled")
        elif ex is None and now - self.last_active > self.edge.keepalive_timeout:
            self.close()

    def queued(self) -> None:
        self.proxy.recently_queued.append(self)

    def drop_departed(self) -> None:
        """The queue is full: a queued request whose client has left (its close or reset waits unread in the
        socket) ends now, as its close would have ended it, and gives its place to the request at hand. Only the
        last few queued are looked at (a bounded cost per 503 under overload): a close that came earlier has been
        read by now."""
        for conn in list(self.proxy.recently_queued):
            ex = conn.current
            if ex is not None and ex.sched_state == QUEUED and conn._departed():
                conn._abandon(CUT_CLIENT)
                conn.close()

    def _departed(self) -> bool:
        transport = self.transport
        if transport is None or transport.is_closing():
            return False  # closing already: its exchanges have ended or are about to
        sock = transport.get_extra_info("socket")
        return sock is not None and peer_closed(sock.fileno())

    def _peer_gone(self) -> bool:
        """The client closed or reset its end (TCP state no longer ESTABLISHED), as far as TCP_INFO says. Asked
        only of a paused connection, in the timeout sweep: the socket is fetched here, not per connection."""
        transport = self.transport
        if _TCP_INFO is None or transport is None:
            return False
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)  # type: ignore[arg-type]
        except OSError:
            return False
        return bool(state) and state[0] != _TCP_ESTABLISHED

    def _check_tunnel(self, tunnel: Tunnel, now: float) -> None:
        """A WebSocket tunnel's clocks: send_timeout toward the client, as for a response (nginx applies its
        send_timeout to a WebSocket too): a client whose socket took none of the worker's bytes held for it
        that long is cut, the tunnel closed both ways and the session's place freed (counted as a cut by
        send_timeout); then ws_idle_timeout, with no byte either way."""
        if tunnel.closed:
            return  # closed by its other side: this connection is on its way out
        self._check_send(now)
        if tunnel.closed:
            tunnel.cut(CUT_SEND_TIMEOUT)
            return
        tunnel.check_idle(now)

    def _check_send(self, now: float) -> None:
        # send_timeout: the client's socket took none of the bytes we hold for it for that long. Progress is
        # bytes the kernel took (a slow reader that reads at all is never cut), not the backlog's size.
        flushed = self.flushed
        backlog = self._unsent_now()
        if not backlog or self.flushed > flushed:
            self.send_progress = now
        elif now - self.send_progress > self.edge.send_timeout and self.transport is not None:
            # connection_lost will end the exchange: as cut by send_timeout, with what the client took
            self._abandon(CUT_SEND_TIMEOUT)
            self.transport.abort()


def make_listener(host: str, port: int) -> socket.socket:
    """Bind early (before any worker starts) so a busy port fails fast with its number."""
    sock = bind_tcp(host, port)
    sock.listen(1024)
    sock.setblocking(False)
    return sock
