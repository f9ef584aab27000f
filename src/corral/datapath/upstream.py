"""The connection to a worker: the asyncio Protocol on one worker socket (TCP or Unix).

It carries one exchange at a time. `send()` writes the exchange's request and makes the exchange the
handler of the response parser (edge.ResponseReader), so the parser's callbacks land on the exchange
itself. The connection calls its pool only for pool concerns: a stale kept-alive connection's request
to send again, a WebSocket session's name and cut. Kept for the next request (`finish`), it waits on its
worker's idle list, which the pool takes connections from.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import socket
import time
from typing import TYPE_CHECKING

from .. import edge
from ..logs import say
from ..portable import paths
from .exchange import PAUSE_UPSTREAM
from .worker import State

if TYPE_CHECKING:
    from .exchange import Exchange
    from .pool import Pool
    from .tunnel import Tunnel
    from .worker import Worker

# Linux only; absent elsewhere (macOS) and off under CORRAL_PORTABLE=1 (corral.portable): no ACK is hurried then.
_QUICKACK = getattr(socket, "TCP_QUICKACK", None) if paths().quickack else None
# setsockopt through libc on the raw fd: uvloop's socket proxy builds a socket object per call
# (~4 us), and QUICKACK is re-armed twice per request.
_libc = ctypes.CDLL(None, use_errno=True)
_setsockopt = _libc.setsockopt
_ONE = ctypes.byref(ctypes.c_int(1))
# A non-blocking peek at the socket before a request goes out on it: has the worker closed its end already?
_recv = _libc.recv
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_PEEK_BYTE = ctypes.create_string_buffer(1)
_NOTHING_YET = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


class UpstreamConnection(asyncio.Protocol):
    """One connection to a worker. Carries one exchange at a time: no request is ever sent on it before the
    previous response has fully arrived and been checked for surplus bytes."""

    __slots__ = (
        "answered",
        "closed",
        "exchange",
        "fd",
        "idle_since",
        "pool",
        "reader",
        "reused",
        "sockfd",
        "transport",
        "tunnel",
        "worker",
        "write_paused",
    )

    def __init__(self, pool: Pool, worker: Worker) -> None:
        self.pool = pool
        self.worker = worker
        self.exchange: Exchange | None = None
        self.transport: asyncio.Transport | None = None
        # Its handler is the exchange this connection carries (send), and nothing between two of them.
        self.reader = edge.ResponseReader(None)  # type: ignore[arg-type]
        self.closed = False
        self.fd = -1  # for QUICKACK: a TCP socket's
        self.sockfd = -1  # any socket's (TCP or Unix), for the peek before a request goes out
        self.tunnel: Tunnel | None = None
        self.reused = False  # the current request went out on a connection kept from an earlier one
        self.answered = False  # a byte of the current request's response has come back
        self.idle_since = 0.0
        self.write_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # TCP_NODELAY is uvloop's and asyncio's own on every TCP transport. The socket's fd serves the peek before
        # each request (send) and, on TCP, QUICKACK; a Unix socket has no Nagle and no delayed ACK to undo.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.sockfd = sock.fileno()
        if sock is not None and _QUICKACK is not None and sock.family != socket.AF_UNIX:
            self.fd = self.sockfd
        self._quickack()

    def _quickack(self) -> None:
        # httpuv writes head and body in two segments without TCP_NODELAY: on a reused connection
        # the second waits for our delayed ACK (~40 ms). Setting QUICKACK sends the pending ACK now.
        if self.fd >= 0 and not self.closed:
            _setsockopt(self.fd, socket.IPPROTO_TCP, _QUICKACK, _ONE, 4)

    # --- the request ---------------------------------------------------------------------------
    def send(self, ex: Exchange, reused: bool = False) -> None:
        """Carry `ex`: its request goes out, and its response's parser calls it directly. Not on a connection
        the worker has closed already: then no byte of it goes out, and it is sent on a fresh connection."""
        if peer_closed(self.sockfd):
            # The worker closed this connection before our request (idle, kept-alive or new, while corral's loop
            # was busy): nothing of the request reached the worker, so sending it elsewhere is safe for any method.
            # Written here, it would be lost in the closed socket, and its fate unknown: a 502, or a guessed retry.
            self.close()
            self.pool.resend(ex, self.worker, unsent=True)
            return
        self.exchange = ex
        self.reused = reused
        self.answered = False
        ex.upstream = self
        reader = self.reader
        reader.handler = ex
        reader.start(ex.head.method, ex.head.websocket)
        assert self.transport is not None
        self.transport.write(ex.upstream_head())
        ex.flush_body(self)

    # What an exchange uses (interfaces.Upstream), and a tunnel (tunnel.WorkerEnd).
    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def write_blocked(self) -> bool:
        return self.write_paused or self.closed

    def pause_reading(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.resume_reading()

    def switch(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.exchange = None
        self.reader.handler = None  # type: ignore[assignment]

    # The tunnel's session id (tunnel.WorkerEnd), for session-id routing: see Pool._pin.
    def session_named(self, sid: str) -> None:
        self.pool.session_named(self.worker, sid)

    def session_unnamed(self, sid: str) -> None:
        self.pool.session_unnamed(self.worker, sid)

    def session_cut(self, why: str) -> None:
        cuts = self.pool.cuts
        cuts[why] = cuts.get(why, 0) + 1  # a session cut counts as a response cut

    # --- the response (asyncio.Protocol) -----------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_worker(data)
            return
        ex = self.exchange
        self.answered = True
        try:
            self.reader.feed(data)  # on_response, on_response_body, on_response_end: on `ex`
        except edge.UpstreamError as exc:
            self.close()
            if ex is None:
                self.on_surplus()  # bytes on an idle connection: never the answer to a future request
            elif self.exchange is ex:
                ex.upstream_failed(f"malformed response: {exc}")
            return
        if ex is not None and self.exchange is ex:
            # The response is not whole yet: its rest may be held back (Nagle) until this part is ACKed.
            # A response that came whole in one read needs no ACK in a hurry, so a worker that writes
            # its response at once costs no setsockopt at all; httpuv (head, then body) costs one.
            self._quickack()

    def on_surplus(self) -> None:
        say(f"corral: worker {self.worker.name}: {edge.SURPLUS}; its connection is closed, not reused")

    def eof_received(self) -> bool:
        if self.tunnel is not None:
            self.tunnel.worker_gone()
            return False
        if self.exchange is not None:
            self.reader.eof()  # a close-delimited body ends here; anything else is a truncation
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.worker_gone()
        worker = self.worker
        if self in worker.idle:
            worker.idle.remove(self)
        ex, self.exchange = self.exchange, None
        if ex is None:
            return
        if not (self.reused and not self.answered and _closed_while_idle(worker)):
            if ex.worker is worker:
                self.pool.upstream_lost(ex, "worker closed the connection")  # killed? another worker, else 502
            else:
                ex.upstream_failed("worker closed the connection")
        elif ex.resendable() and not ex.ended:
            self.pool.resend(ex, worker)
        else:  # the client left, or its streamed body is gone: no second try, and not the worker's failure
            ex.upstream_failed("worker had closed the kept-alive connection", blame=False)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.tunnel is not None:
            self.tunnel.worker_full()
            return
        ex = self.exchange
        if ex is not None:
            ex.client.pause(PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.tunnel is not None:
            self.tunnel.worker_drained()
            return
        ex = self.exchange
        if ex is not None:
            ex.client.resume(PAUSE_UPSTREAM)
            ex.send_body()

    # --- the end of an exchange ------------------------------------------------------------------
    def finish(self, reusable: bool) -> None:
        """The exchange is over: keep the connection on its worker's idle list for the next one, or close it."""
        self.exchange = None
        self.reader.handler = None  # type: ignore[assignment]  # an idle connection holds no exchange
        worker = self.worker
        if not reusable or self.closed or worker.state not in (State.READY, State.DRAINING):
            self.close()
            return
        self.resume_reading()
        self.idle_since = time.monotonic()
        if self not in worker.idle:
            worker.idle.append(self)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            if self in self.worker.idle:
                self.worker.idle.remove(self)
            self.transport.close()


def peer_closed(fd: int) -> bool:
    """Whether the worker has closed (or reset) its end of the socket: its FIN or RST is waiting to be read.
    Bytes waiting (a surplus on an idle connection) are not a close: data_received deals with them."""
    if fd < 0:
        return False
    n = _recv(fd, _PEEK_BYTE, 1, _PEEK)
    if n == 0:
        return True
    return n < 0 and ctypes.get_errno() not in _NOTHING_YET


def _closed_while_idle(worker: Worker) -> bool:
    """A kept-alive connection closed with no byte of answer: the worker closed it while idle (gunicorn,
    uvicorn, Node do), not because of this request, if the worker process still lives. nginx's rule for
    cached connections: not held against the worker."""
    if worker.state not in (State.READY, State.DRAINING):
        return False
    return worker.proc is None or worker.proc.poll() is None
