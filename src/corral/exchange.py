"""One request's life, from its parsed head to its one end.

The client connection (proxy.py) creates an Exchange when a request head has been parsed; its app's
Pool (pool.py) queues and dispatches it; the worker connection's response parser feeds it. It has two
halves that finish separately:

* the worker half ends when the whole response has been received, or the worker failed. The worker's
  slot is released then, in `_release_worker`, the only place that does: responses are buffered (the
  client transport's buffer up to `response_buffer`, then a temporary file up to
  `response_buffer_file`, only then back-pressure on the worker), so a slow client never holds a worker;
* the client half ends when the last byte has been handed to the client transport.

`end()` is the one way out. It settles the worker half if it is still open, counts and logs the
exchange exactly once, and tells the client connection whether it may carry another request.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import TYPE_CHECKING, Protocol

from . import edge, tracing
from .costs import SHORT
from .scheduler import QUEUED
from .tunnel import Tunnel

if TYPE_CHECKING:
    from .worker import Worker

# Reasons the client socket's reading is paused; reading resumes only when none is left.
PAUSE_PIPELINE, PAUSE_UPSTREAM, PAUSE_BUFFER = 1, 2, 4
BODY_BUFFER_LIMIT = 256 * 1024  # request body held while queued before reading is paused
SPILL_READ = 256 * 1024  # bytes moved from the spill file to the client per write
CLIENT_CLOSED = 499  # logged when the client left before its response was complete (nginx's code)



class Client(Protocol):
    """What an exchange needs of the client connection that carries it."""

    peer: bytes
    trusted: bool
    closing: bool

    def write(self, data: bytes) -> None: ...
    def writing_paused(self) -> bool: ...
    def pause(self, why: int) -> None: ...
    def resume(self, why: int) -> None: ...
    def exchange_done(self, ex: Exchange, keep_alive: bool) -> None: ...
    def switch(self, tunnel: Tunnel) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...


class Upstream(Protocol):
    """What an exchange needs of the worker connection carrying its request."""

    def write(self, data: bytes) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def switch(self, tunnel: Tunnel) -> None: ...


class Dispatcher(Protocol):
    """What an exchange needs of its app's pool: its slot back, its counters, its observers."""

    served: int
    failed: int
    sessions_rejected: int
    ws_idle_timeout: float

    def release(self, ex: Exchange, conn: Upstream | None, reusable: bool) -> None: ...
    def session_closed(self, worker: Worker) -> None: ...
    def cancel(self, ex: Exchange) -> None: ...
    def worker_failed(self, worker: Worker, why: str) -> None: ...
    def on_observe(self, ex: Exchange) -> None: ...


class Spill:
    """Response bytes the client has not taken yet, past its transport buffer: a temporary file."""

    __slots__ = ("file", "read_at", "size")

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile(prefix="corral-response-")  # noqa: SIM115 (closed in close())
        self.size = 0  # bytes written and not yet read back
        self.read_at = 0

    def push(self, data: bytes) -> None:
        self.file.seek(0, os.SEEK_END)
        self.file.write(data)
        self.size += len(data)

    def pop(self, n: int) -> bytes:
        self.file.seek(self.read_at)
        data = self.file.read(min(n, self.size))
        self.read_at += len(data)
        self.size -= len(data)
        return data

    def close(self) -> None:
        self.file.close()


class Exchange:
    """One request from arrival to its end. Also the scheduler's job."""

    __slots__ = (
        "body_buf",
        "body_buffered",
        "body_last",
        "bytes_out",
        "client",
        "client_gone",
        "cls",
        "cost",
        "created",
        "dispatched_at",
        "ended",
        "extra_headers",
        "head",
        "head_sent",
        "held_back",
        "keep",
        "out_head",
        "pin",
        "pool",
        "prefix",
        "queued_at",
        "relay_chunked",
        "request_done",
        "request_id",
        "response_complete",
        "route",
        "sched_state",
        "served_by",
        "session",
        "spill",
        "spill_limit",
        "status",
        "sticky_token",
        "switched",
        "traceparent",
        "upstream",
        "upstream_paused",
        "worker",
    )

    def __init__(
        self,
        client: Client,
        head: edge.RequestHead,
        pool: Dispatcher | None,
        prefix: bytes = b"",
        spill_limit: int = 0,
    ) -> None:
        self.client = client
        self.head = head
        self.pool = pool
        self.prefix = prefix
        # W3C trace context: a trusted proxy's valid traceparent is continued, anything else restarts the
        # trace. A request id corral makes up is the trace id, so one id finds the request everywhere.
        tp = tracing.accept(head.header(b"traceparent")) if client.trusted else None
        self.traceparent = tp or tracing.start()
        self.request_id = head.header(b"x-request-id") or tracing.trace_id(self.traceparent)
        self.worker: Worker | None = None  # set while this exchange holds one of the worker's slots
        self.served_by: Worker | None = None
        self.upstream: Upstream | None = None
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
        self.out_head = b""  # the response head, held until the first body bytes (one write, not two)
        self.head_sent = False  # response bytes have gone toward the client: no error page can follow
        self.relay_chunked = False
        self.response_complete = False  # the worker's whole response is in our hands
        self.keep = False  # the response announced that the client connection stays open
        self.spill: Spill | None = None
        self.spill_limit = spill_limit  # response_buffer_file: bytes past the client buffer, on disk
        self.upstream_paused = False
        # Seconds corral itself kept the worker from writing (back-pressure for a slow client): the
        # request deadline does not count them against the worker.
        self.held_back = 0.0
        self.client_gone = False
        self.ended = False
        self.status = 0
        self.bytes_out = 0
        self.session = head.websocket  # counted against the worker's max_sessions, not its request slots
        self.switched = False  # the worker answered 101: this exchange became a tunnel
        self.pin: object = None  # sticky: the worker (or worker index) this request must wait for
        self.sticky_token: bytes | None = None  # the client's sticky cookie, if any
        self.extra_headers: list[tuple[bytes, bytes]] = []  # added to the response (Set-Cookie)

    # --- the request, toward the worker ------------------------------------------------------
    def upstream_head(self) -> bytes:
        self.served_by = self.worker
        client = self.client
        return edge.forward_head(
            self.head, client.peer, self.request_id, client.trusted, prefix=self.prefix, traceparent=self.traceparent
        )

    def flush_body(self, conn: Upstream) -> None:
        """Called once the worker connection is ours: 100-continue, then whatever body is buffered."""
        head = self.head
        if head.expect_continue and not self.request_done and not self.body_buf:
            self.client.write(edge.CONTINUE)
        if self.body_buf:
            data = b"".join(self.body_buf)
            self.body_buf = []
            self.body_buffered = 0
            conn.write(edge.chunk(data) if head.chunked else data)
            self.client.resume(PAUSE_BUFFER)
        if self.request_done and head.chunked:
            conn.write(edge.LAST_CHUNK)

    def request_body(self, data: bytes) -> None:
        self.body_last = time.monotonic()
        if self.ended:
            return  # answered already (e.g. 503): the rest of its body is read and dropped
        conn = self.upstream
        if conn is not None:
            conn.write(edge.chunk(data) if self.head.chunked else data)
            return
        self.body_buf.append(data)
        self.body_buffered += len(data)
        if self.body_buffered > BODY_BUFFER_LIMIT:
            self.client.pause(PAUSE_BUFFER)

    def request_end(self) -> None:
        self.request_done = True
        conn = self.upstream
        if conn is not None and self.head.chunked:
            conn.write(edge.LAST_CHUNK)

    # --- the response, from the worker (UpstreamConnection relays the parser's callbacks) --------
    def on_response(self, status: int, headers: list[tuple[bytes, bytes]], framing: int) -> None:
        self.status = status
        head = self.head
        self.relay_chunked, close_delimited = edge.client_framing(framing, head.version)
        self.keep = (
            head.keep_alive and self.request_done and not self.client.closing and not close_delimited
        ) and not head.websocket  # a refused upgrade: the client's next bytes may not be HTTP
        conn = edge.connection_token(head.version, self.keep)
        if self.extra_headers:
            headers = headers + self.extra_headers
        self.out_head = edge.response_head(status, headers, self.request_id, self.relay_chunked, conn)

    def on_response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self._deliver(edge.chunk(data) if self.relay_chunked else data)

    def on_response_end(self, reusable: bool) -> None:
        tail = edge.LAST_CHUNK if self.relay_chunked else b""
        if tail or self.out_head:
            self._deliver(tail)
        self.response_complete = True
        if self.pool is not None:
            self.pool.served += 1
        self._release_worker(reusable and self.request_done)
        if self.spill is None:
            self.end()
        # else: client_writable() ends it once the client has taken the spilled bytes

    def on_upgrade(self, headers: list[tuple[bytes, bytes]], rest: bytes) -> None:
        """The worker answered 101 to a WebSocket request: the two connections become one tunnel."""
        conn, worker, pool = self.upstream, self.worker, self.pool
        assert conn is not None and worker is not None and pool is not None
        self.status = 101
        self.switched = True
        self.response_complete = True
        head = [*headers, *self.extra_headers, (b"upgrade", b"websocket")]
        self.client.write(edge.response_head(101, head, self.request_id, False, b"upgrade"))
        tunnel = Tunnel(self.client, conn, pool.ws_idle_timeout, lambda: pool.session_closed(worker))
        self.client.switch(tunnel)
        conn.switch(tunnel)
        self.upstream = None  # the connection is the tunnel's now: releasing the slot must not reuse it
        self._release_worker(False)
        if rest:
            tunnel.from_worker(rest)
        self.end()

    def tunnel_data(self, data: bytes) -> None:
        """Frames a client sent right behind its upgrade request, before the worker's 101."""
        self.request_body(data)

    def _deliver(self, data: bytes) -> None:
        if self.out_head:
            data = self.out_head + data
            self.out_head = b""
        self.head_sent = True
        if self.client_gone or self.ended:
            return
        client = self.client
        if self.spill is None and (not client.writing_paused() or not self.spill_limit):
            client.write(data)
            if client.writing_paused():
                self._pause_upstream_if(not self.spill_limit)
            return
        if self.spill is None:
            self.spill = Spill()
        self.spill.push(data)
        self._pause_upstream_if(self.spill.size >= self.spill_limit)

    def _pause_upstream_if(self, full: bool) -> None:
        conn = self.upstream
        if full and conn is not None and not self.upstream_paused:
            self.upstream_paused = True
            self.held_back -= time.monotonic()
            conn.pause_reading()

    def client_writable(self) -> None:
        """The client transport drained below its low-water mark: feed it from the spill, then the worker."""
        spill = self.spill
        client = self.client
        if spill is not None:
            while spill.size and not client.writing_paused():
                client.write(spill.pop(SPILL_READ))
            if spill.size:
                return
            spill.close()
            self.spill = None
        if self.upstream_paused and self.upstream is not None:
            self.upstream_paused = False
            self.held_back += time.monotonic()
            self.upstream.resume_reading()
        if self.response_complete:
            self.end()

    # --- the ways it can go wrong ------------------------------------------------------------------
    def upstream_failed(self, why: str) -> None:
        """The worker connection broke or lied mid-exchange: this request alone pays (502)."""
        if self.pool is not None and self.worker is not None:
            self.pool.worker_failed(self.worker, why)
        self._release_worker(False)
        if self.head_sent:
            self._cut(502)
        else:
            self.respond_error(502, "the worker failed while handling this request")

    def timed_out(self) -> None:
        """Past request_timeout: the pool has already taken the worker out of rotation."""
        if self.pool is not None:
            self.pool.failed += 1
        if self.worker is not None:
            self.worker.failed += 1
        self._release_worker(False)
        if self.head_sent:
            self._cut(504)
        else:
            self.respond_error(504, "the worker did not answer in time")

    def client_left(self, status: int = CLIENT_CLOSED) -> None:
        """The client closed, stopped reading past send_timeout, or sent something the edge refused."""
        if self.ended:
            return
        self.client_gone = True
        if not self.response_complete:
            self.status = status
        self.end()

    def _cut(self, status: int) -> None:
        # A truncated body must look truncated: the client connection closes after what was sent.
        self.status = status
        self.keep = False
        self.end()

    # --- corral's own answers -------------------------------------------------------------------
    def respond_error(self, status: int, message: str, retry_after: int | None = None, json: bool = True) -> None:
        # JSON like plumber's own errors (a client of the API parses one format); edge refusals stay plain text.
        self.status = status
        self.head_sent = True
        self.keep = self.request_done and self.head.keep_alive and not self.client.closing
        if not self.client_gone:
            conn = edge.connection_token(self.head.version, self.keep)
            self.client.write(
                edge.error_response(status, message, self.request_id, conn, retry_after=retry_after, json=json)
            )
        self.response_complete = True
        self.end()

    def queue_timed_out(self, retry_after: int) -> None:
        self.respond_error(503, "timed out waiting for a free worker", retry_after=retry_after)

    # --- the one way out ------------------------------------------------------------------------
    def _release_worker(self, reusable: bool) -> None:
        """The only place a worker's slot is given back (and its connection kept or closed)."""
        conn, self.upstream = self.upstream, None
        if conn is not None:
            self.client.resume(PAUSE_UPSTREAM)  # a worker that stopped taking our body no longer holds the client
        if self.worker is not None or conn is not None:
            self.upstream_paused = False
            assert self.pool is not None
            self.pool.release(self, conn, reusable)

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        pool = self.pool
        if self.sched_state == QUEUED and pool is not None:
            pool.cancel(self)
        self._release_worker(False)
        if self.spill is not None:
            self.spill.close()
            self.spill = None
        if pool is not None:
            if self.session and not self.switched and self.status == 503:
                pool.sessions_rejected += 1
            pool.on_observe(self)
        keep = self.keep and self.request_done and self.response_complete and not self.client_gone
        self.client.exchange_done(self, keep)
