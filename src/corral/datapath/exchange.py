"""One request's life, from its parsed head to its one end.

The client connection (client.py) creates an Exchange when a request head has been parsed; its app's
Pool (pool.py) queues and dispatches it; the worker connection (upstream.py) sends it, and makes it the
handler of its response parser (what it needs of these three: interfaces.py). It has two halves that
finish separately, and it is counted and logged once, when both have (as one of outcomes.py's outcomes):

* the worker half holds one of the worker's slots from dispatch until the worker has finished with the
  request: its whole response received, or the worker failed. `_release_worker` is the only place a slot
  is given back for good; `detach` gives it back for a request whose worker connection broke, which may go
  to another worker (pool.upstream_lost: should that worker turn out to have been killed from outside).
  Responses are buffered (the client transport's buffer up to `response_buffer`, then a temporary file up
  to `response_buffer_file`, only then back-pressure on the worker), so a slow client never holds a worker.
  A client that leaves does not free the slot of a worker still computing its answer: the worker is busy
  until it is done, and its answer is read and dropped;
* the client half ends when the client's socket has taken the last byte, or the client is gone.

Request bodies are read whole before dispatch by default (`request_buffering`, buffers.RequestBody), so
the worker sees a request only once it can start on it, and time spent waiting for a client is never
the worker's. `end()` ends the client half; `_finish()` counts and logs the exchange, exactly once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .. import edge
from . import tracing
from .buffers import READ_SIZE, RequestBody, Spill
from .costs import SHORT
from .interfaces import PAUSE_BUFFER, PAUSE_UPSTREAM
from .outcomes import ABANDONED, CLIENT_CLOSED, CUT_CLIENT, CUT_REQUEST_TIMEOUT, CUT_WORKER, FAILED, REFUSED, SERVED
from .quarantine import Quarantined
from .scheduler import QUEUED, QueueFull
from .tunnel import Tunnel

if TYPE_CHECKING:
    from .interfaces import Client, Dispatcher, Upstream
    from .worker import Worker

IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"))  # RFC 9110 9.2.2: safe to send again
BODY_BUFFER_LIMIT = 256 * 1024  # a streamed request body held while queued before reading is paused
# A re-chunked body's ledger forgets the chunks the client took once it holds this many (edge.ChunkLedger).
LEDGER_CHECK = 64
SPILL_READ = READ_SIZE  # bytes moved from the spill file to the client per write


class Exchange:
    """One request from arrival to its end. Also the scheduler's job."""

    __slots__ = (
        "begun",
        "body",
        "body_buf",
        "body_buffered",
        "body_done_at",
        "body_last",
        "body_out",
        "body_pos",
        "body_seen",
        "bytes_out",
        "client",
        "client_gone",
        "cls",
        "continue_sent",
        "cost",
        "created",
        "cut",
        "discarding",
        "dispatched_at",
        "early",
        "ended",
        "extra_headers",
        "fair_key",
        "finished",
        "head",
        "head_len",
        "head_sent",
        "held_back",
        "keep",
        "ledger",
        "out_head",
        "outcome",
        "pin",
        "pool",
        "prefix",
        "queued_at",
        "redispatched",
        "relay_chunked",
        "request_done",
        "request_id",
        "response_complete",
        "retried",
        "route",
        "sched_state",
        "served_by",
        "session",
        "spill",
        "spill_limit",
        "status",
        "sticky_token",
        "submitted",
        "switched",
        "traceparent",
        "unsent",
        "upstream",
        "upstream_paused",
        "wire_start",
        "worker",
        "worker_done",
    )

    def __init__(
        self,
        client: Client,
        head: edge.RequestHead,
        pool: Dispatcher | None,
        prefix: bytes = b"",
        spill_limit: int = 0,
        body_memory: int | None = None,
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
        self.body_done_at = 0.0  # when the last request body byte arrived
        self.sched_state = 0
        self.cls = SHORT
        self.cost = 0.0
        self.route = ""
        # request_buffering: the whole body is read before the request goes out (None: streamed)
        self.body = RequestBody(body_memory) if body_memory is not None else None
        self.body_pos = 0  # bytes of the buffered body handed to the worker connection
        self.body_buf: list[bytes] = []  # a streamed body's bytes that came before its dispatch
        self.body_buffered = 0
        self.body_seen = False
        self.early: list[bytes] = []  # bytes behind a WebSocket upgrade request: the tunnel's, after a 101
        self.request_done = False
        self.begun = False  # the client connection's current exchange: its answer is the next one due
        self.submitted = False
        self.continue_sent = False
        self.out_head = b""  # the response head, held until the first body bytes (one write, not two)
        self.head_len = 0
        self.head_sent = False  # response bytes have gone toward the client: no error page can follow
        self.wire_start = -1  # client.written when this exchange's response head went out
        self.relay_chunked = False
        self.ledger: edge.ChunkLedger | None = None  # a re-chunked body's chunks on the wire, for _took
        self.response_complete = False  # the worker's whole response is in our hands
        self.keep = False  # the response announced that the client connection stays open
        self.spill: Spill | None = None
        self.spill_limit = spill_limit  # response_buffer_file: bytes past the client buffer, on disk
        self.upstream_paused = False
        # Seconds corral itself kept the worker from writing (back-pressure for a slow client): the
        # request deadline does not count them against the worker.
        self.held_back = 0.0
        self.client_gone = False
        self.discarding = False  # the client left; the worker's answer is read and dropped
        self.retried = False  # sent once more, on a fresh connection (pool.resend)
        self.unsent = 0  # connections its worker had closed before the request went out on them (pool.resend)
        self.redispatched = False  # sent once more, to another worker: its first was killed from outside
        self.ended = False  # the client half
        self.worker_done = False  # the worker half: never dispatched, or its slot given back
        self.finished = False  # counted and logged
        self.outcome = ""
        self.cut = ""  # why the client did not get the whole response (CUTS), or ""
        self.status = 0
        self.body_out = 0  # response body bytes handed toward the client
        self.bytes_out = 0  # response body bytes the client took (set when the client half ends)
        self.session = head.websocket  # counted against the worker's max_sessions, not its request slots
        self.switched = False  # the worker answered 101: this exchange became a tunnel
        self.pin: object = None  # sticky: the worker (or worker index) this request must wait for
        self.fair_key: object = None  # fair queueing: the client it counts against (pool._client_key)
        self.sticky_token: bytes | None = None  # the client's sticky cookie, if any
        self.extra_headers: list[tuple[bytes, bytes]] = []  # added to the response (Set-Cookie)

    # --- the request, from the client ------------------------------------------------------------
    def begin(self) -> None:
        """This is the client connection's current exchange: read its body first, or go to the queue."""
        self.begun = True
        if self.body is not None and not self.request_done:
            if self.head.expect_continue:
                self._send_continue()  # corral reads the body itself, so it asks for it at once
            return  # request_end submits it
        self._submit()

    def _submit(self) -> None:
        if self.ended or self.pool is None:
            return
        self.submitted = True
        if self.pool.queue_full():
            # Before a 503: a client that sent its request and left at once may still hold a place, its close
            # unread (asyncio's loop reads a request and the close behind it in two turns; uvloop in one).
            self.client.drop_departed()
        try:
            self.pool.submit(self)
        except QueueFull as full:
            # 503 when the queue is full for everyone, 429 when this client's share of it is (fair queueing)
            self.respond_error(full.status, full.reason, retry_after=full.retry_after)
        except Quarantined as q:
            self.respond_error(502, str(q), retry_after=q.retry_after)
        else:
            if self.sched_state == QUEUED:
                self.client.queued()

    def request_body(self, data: bytes) -> None:
        self.body_last = time.monotonic()
        self.body_seen = True
        if self.ended:
            return  # answered already (e.g. 503): the rest of its body is read and dropped
        body = self.body
        if body is not None:
            try:
                body.add(data)
            except OSError as exc:
                if self.pool is not None:
                    self.pool.disk_full("a request body", exc)
                self.respond_error(503, "corral could not buffer the request body", retry_after=5)
            return
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
        self.body_done_at = time.monotonic()
        if self.ended:
            return
        if self.body is not None:
            if self.begun and not self.submitted:
                self._submit()
            return
        conn = self.upstream
        if conn is not None and self.head.chunked:
            conn.write(edge.LAST_CHUNK)

    def awaiting_continue(self) -> bool:
        """The client waits for our 100 Continue before it sends the body: its body clock must not run."""
        return self.head.expect_continue and not self.continue_sent and not self.body_seen

    def _send_continue(self) -> None:
        if not self.continue_sent and not self.client_gone:
            self.continue_sent = True
            self.client.write(edge.CONTINUE)

    # --- the request, toward the worker ------------------------------------------------------
    def upstream_head(self) -> bytes:
        self.served_by = self.worker
        client = self.client
        head = self.head
        if self.body is not None:
            # Read whole: the worker gets it with a Content-Length, never chunked (nginx does the same).
            head.chunked = False
            head.content_length = self.body.size
        return edge.forward_head(
            head,
            client.peer,
            self.request_id,
            client.trusted,
            proto=client.proto,
            prefix=self.prefix,
            traceparent=self.traceparent,
        )

    def flush_body(self, conn: Upstream) -> None:
        """Called once the worker connection is ours: the buffered body, or 100-continue and what came so far."""
        if self.body is not None:
            self.body_pos = 0
            self.send_body()
            return
        head = self.head
        if head.expect_continue and not self.request_done and not self.body_buf:
            self._send_continue()
        if self.body_buf:
            data = b"".join(self.body_buf)
            self.body_buf = []
            self.body_buffered = 0
            conn.write(edge.chunk(data) if head.chunked else data)
            self.client.resume(PAUSE_BUFFER)
        if self.request_done and head.chunked:
            conn.write(edge.LAST_CHUNK)

    def send_body(self) -> None:
        """Hand the buffered body to the worker connection as fast as it takes it (again on resume_writing)."""
        conn, body = self.upstream, self.body
        if conn is None or body is None:
            return
        while self.body_pos < body.size and not conn.write_blocked():
            data = body.read(self.body_pos)
            if not data:
                break
            self.body_pos += len(data)
            conn.write(data)

    def _sent_whole(self) -> bool:
        """The worker has (or has been handed) the whole request."""
        if self.body is not None:
            return self.body_pos >= self.body.size
        return self.request_done and not self.body_buf

    def streamed(self) -> bool:
        """Its body goes to the worker as it arrives (request_buffering off): it cannot be sent twice."""
        return self.body is None and self.head.has_body

    def redispatchable(self) -> bool:
        """Safe to send to another worker, should its own be killed from outside: nothing of its response has
        reached the client, its body is still ours, it is idempotent (RFC 9110 9.2.2) or carries
        Idempotency-Key, it was not sent again already, and it is not a WebSocket upgrade."""
        if self.head_sent or self.ended or self.redispatched or self.head.websocket:
            return False
        body = self.body
        if (body is None and self.head.has_body) or (body is not None and body.closed):
            return False
        return self.head.method in IDEMPOTENT or self.head.header(b"idempotency-key") is not None

    def detach(self) -> None:
        """Give the worker's slot back but keep the request, body and all: it may go to another worker
        (pool.redispatch), or end with a 502."""
        conn, self.upstream = self.upstream, None
        if conn is not None:
            self.client.resume(PAUSE_UPSTREAM)
            conn.finish(False)
        self.upstream_paused = False
        if self.worker is not None:
            assert self.pool is not None
            self.pool.release(self)

    def resendable(self) -> bool:
        """The request can go out again as it was: its body (if any) is still ours."""
        if self.head.websocket or self.retried:
            return False
        return self.body is not None or not self.head.has_body

    # --- the response, from the worker (this is its parser's handler: edge.ResponseHandler) ------
    def on_response(self, status: int, headers: list[tuple[bytes, bytes]], framing: int) -> None:
        if self.discarding:
            return  # the client left: its exchange keeps the status it was logged with (499)
        self.status = status
        head = self.head
        self.relay_chunked, close_delimited = edge.client_framing(framing, head.version)
        self.ledger = edge.ChunkLedger() if self.relay_chunked else None
        self.keep = (
            head.keep_alive and self.request_done and not self.client.closing and not close_delimited
        ) and not head.websocket  # a refused upgrade: the client's next bytes may not be HTTP
        conn = edge.connection_token(head.version, self.keep)
        if self.extra_headers:
            headers = headers + self.extra_headers
        self.out_head = edge.response_head(status, headers, self.request_id, self.relay_chunked, conn)

    def on_response_body(self, data: bytes) -> None:
        if self.discarding:
            return
        self.body_out += len(data)
        ledger = self.ledger
        if ledger is None:
            self._deliver(data)
            return
        if len(ledger.marks) >= LEDGER_CHECK and self.wire_start >= 0:
            ledger.taken(self.client.taken() - self.wire_start - self.head_len)
        ledger.add(len(data))
        self._deliver(edge.chunk(data))

    def on_response_end(self, reusable: bool) -> None:
        if not self.discarding:
            tail = edge.LAST_CHUNK if self.relay_chunked else b""
            if tail or self.out_head:
                self._deliver(tail)
        self.response_complete = True
        # A declined upgrade's connection is not reused: the worker may still take it for one being upgraded.
        self._release_worker(reusable and self._sent_whole() and not self.head.websocket)
        if not self.ended and self.spill is None and self.client.wait_flushed():
            self.end()
        # else: client_writable() ends it once the client has taken the rest

    def on_surplus(self) -> None:
        if self.upstream is not None:
            self.upstream.on_surplus()  # logged with its worker's name; on_response_end(False) follows

    def on_upgrade(self, headers: list[tuple[bytes, bytes]], rest: bytes) -> None:
        """The worker answered 101 to a WebSocket request: the two connections become one tunnel."""
        conn, worker, pool = self.upstream, self.worker, self.pool
        assert conn is not None and worker is not None and pool is not None
        if self.ended:  # the client left before the switch: the session never opens
            self._release_worker(False)
            return
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
        early, self.early = self.early, []
        for data in early:
            tunnel.from_client(data)
        self.client.resume(PAUSE_BUFFER)
        if rest:
            tunnel.from_worker(rest)
        self.end()

    def tunnel_data(self, data: bytes) -> None:
        """Bytes a client sent right behind its upgrade request: held until the worker's 101, and dropped
        if the worker declines. Sent before, a worker that declines would read them as a request of its
        own, one corral never checked (request smuggling)."""
        if self.ended:
            return
        self.early.append(data)
        self.body_buffered += len(data)
        if self.body_buffered > BODY_BUFFER_LIMIT:
            self.client.pause(PAUSE_BUFFER)

    def _deliver(self, data: bytes) -> None:
        if self.out_head:
            self.head_len = len(self.out_head)
            data = self.out_head + data
            self.out_head = b""
        body = self.body
        if not self.head_sent and body is not None and self.body_pos >= body.size:
            body.close()  # the response has begun: the request will never be sent again (else: still going out)
        self.head_sent = True
        if self.client_gone or self.ended:
            return
        client = self.client
        if self.wire_start < 0:
            self.wire_start = client.written
        if self.spill is None and (not client.writing_paused() or not self.spill_limit):
            client.write(data)
            if client.writing_paused():
                self._pause_upstream_if(not self.spill_limit)
            return
        if self.spill is None:
            self.spill = Spill()
        if not self.spill.push(data) and self.pool is not None and self.spill.stuck is not None:
            self.pool.disk_full("a response", self.spill.stuck)
        self._pause_upstream_if(self.spill.size >= self.spill_limit or bool(self.spill.held))

    def _pause_upstream_if(self, full: bool) -> None:
        conn = self.upstream
        if full and conn is not None and not self.upstream_paused:
            self.upstream_paused = True
            self.held_back -= time.monotonic()
            conn.pause_reading()

    def _resume_upstream(self) -> None:
        if self.upstream_paused and self.upstream is not None:
            self.upstream_paused = False
            self.held_back += time.monotonic()
            self.upstream.resume_reading()

    def client_writable(self) -> None:
        """The client transport drained below its low-water mark: feed it from the spill, then the worker."""
        if self.ended:
            return
        spill = self.spill
        client = self.client
        if spill is not None:
            while spill.size and not client.writing_paused():
                client.write(spill.pop(SPILL_READ))
            if spill.size:
                return
            spill.close()
            self.spill = None
        self._resume_upstream()
        if self.response_complete and client.wait_flushed():
            self.end()

    # --- the ways it can go wrong ------------------------------------------------------------------
    def upstream_failed(self, why: str, blame: bool = True) -> None:
        """The worker connection broke or lied mid-exchange: this request alone pays (502). `blame`: count
        it against the worker (not when the worker had closed a kept-alive connection while idle)."""
        if blame and self.pool is not None and self.worker is not None:
            self.pool.worker_failed(self.worker, why)
        self._release_worker(False)
        if self.ended:
            return  # the client had left: nobody to answer
        self.outcome = FAILED
        if self.head_sent:
            self._cut(502, CUT_WORKER)
        else:
            self.respond_error(502, "the worker failed while handling this request", outcome=FAILED)

    def timed_out(self) -> None:
        """Past request_timeout: the pool has already taken the worker out of rotation."""
        if self.worker is not None:
            self.worker.failed += 1
        self._release_worker(False)
        if self.ended:
            return
        self.outcome = FAILED
        if self.head_sent:
            self._cut(504, CUT_REQUEST_TIMEOUT)
        else:
            self.respond_error(504, "the worker did not answer in time", outcome=FAILED)

    def client_left(self, status: int = CLIENT_CLOSED, why: str = CUT_CLIENT) -> None:
        """The client closed, or stopped reading past send_timeout: it gets nothing more."""
        if self.ended:
            return
        self.client_gone = True
        if not self.response_complete:
            self.status = status
        if self.head_sent:
            self.cut = why
        if not self.outcome:
            self.outcome = ABANDONED
        self.end()

    def refuse(self, status: int) -> None:
        """The edge refused the rest of this request (its body): the caller answers `status` itself."""
        if self.ended:
            return
        self.client_gone = True  # the answer is the caller's: nothing more is written from here
        self.status = status
        self.outcome = REFUSED
        self.end()

    def _cut(self, status: int, why: str) -> None:
        # A truncated body must look truncated: the client connection closes after what was sent.
        self.status = status
        self.cut = why
        self.keep = False
        self.end()

    # --- corral's own answers -------------------------------------------------------------------
    def respond_error(
        self,
        status: int,
        message: str,
        retry_after: int | None = None,
        json: bool = True,
        outcome: str = REFUSED,
    ) -> None:
        # JSON like plumber's own errors (a client of the API parses one format); edge refusals stay plain text.
        self.status = status
        self.head_sent = True
        if not self.outcome:
            self.outcome = outcome
        self.keep = self.request_done and self.head.keep_alive and not self.client.closing
        if not self.client_gone:
            conn = edge.connection_token(self.head.version, self.keep)
            head_only = self.head.method == b"HEAD"
            self.client.write(edge.error_response(status, message, self.request_id, conn, retry_after, json, head_only))
        self.response_complete = True
        if self.client_gone or self.client.wait_flushed():
            self.end()
        # else: client_writable() ends it once the client has the page (or connection_lost, as cut)

    def queue_timed_out(self, retry_after: int) -> None:
        self.respond_error(503, "timed out waiting for a free worker", retry_after=retry_after)

    # --- the ways out ---------------------------------------------------------------------------
    def _release_worker(self, reusable: bool) -> None:
        """The only place a worker's slot is given back (its connection kept or closed first, so that the
        request the pool dispatches next can take it)."""
        conn, self.upstream = self.upstream, None
        if conn is not None:
            self.client.resume(PAUSE_UPSTREAM)  # a worker that stopped taking our body no longer holds the client
            conn.finish(reusable)
        if self.worker is not None or conn is not None:
            self.upstream_paused = False
            assert self.pool is not None
            self.pool.release(self)
        if self.body is not None:
            self.body.close()  # no second sending once the worker has answered or failed
        self.worker_done = True
        self._finish()

    def _settle_worker(self) -> None:
        """The client half ended first: free the worker half now, or let the worker finish (discard)."""
        if self.worker_done:
            return
        if self.upstream is not None and self.client_gone and self._sent_whole():
            # The worker is computing the answer: its slot stays taken until it is done, or a client that
            # leaves could pile R work past max_inflight. Its answer is read and dropped.
            self.discarding = True
            self._resume_upstream()
            return
        self._release_worker(False)  # queued, connecting, or a half-sent request the worker must not wait on

    def end(self) -> None:
        """The client half ends: it is told whether its connection may carry another request."""
        if self.ended:
            return
        self.ended = True
        pool = self.pool
        if self.sched_state == QUEUED and pool is not None:
            pool.cancel(self)
        if self.spill is not None:
            self.spill.close()
            self.spill = None
        self.bytes_out = self._took() if self.cut else self.body_out
        keep = self.keep and self.request_done and self.response_complete and not self.client_gone
        self._settle_worker()
        self.client.exchange_done(self, keep)
        self._finish()

    def _took(self) -> int:
        """Body bytes of a cut response that went to the client (nginx's $body_bytes_sent, without the chunk
        framing of a re-chunked body): when corral cut it (the worker failed or hung), all it had handed to
        the client's socket, which closes only once they are sent; when the client left, what its socket had
        taken by then. Bytes still in the spill file never count: they never reached the socket."""
        if self.wire_start < 0:
            return 0
        client = self.client
        out = client.written if self.cut in (CUT_WORKER, CUT_REQUEST_TIMEOUT) else client.taken()
        wire = out - self.wire_start - self.head_len
        if self.ledger is not None:
            return self.ledger.body_within(wire)
        return max(0, min(self.body_out, wire))

    def _finish(self) -> None:
        if self.finished or not (self.ended and self.worker_done):
            return
        self.finished = True
        if not self.outcome:
            self.outcome = SERVED
        pool = self.pool
        if pool is not None:
            if self.session and not self.switched and self.status == 503:
                pool.sessions_rejected += 1
            pool.finished(self)
