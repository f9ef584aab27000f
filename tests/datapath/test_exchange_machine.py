"""A stateful property test of the data path: hypothesis plays clients, workers and the clock against the real
ClientConnection / Pool / Exchange / UpstreamConnection, in-process, and checks what each side saw.

What it models (tests/support/machine_fakes.py has the fakes):
* clients: SLOTS clients, each on a real ClientConnection on a fake transport (a new connection when its last one
  is of no more use to it: closed, half-closed, or ended by Connection: close). A client sends requests
  (GET/HEAD/POST, Content-Length or chunked, Expect: 100-continue, keep-alive or close) in pieces, pipelines,
  sends malformed or oversized heads, stops reading (its transport buffer fills: pause_writing) and reads
  again (resume_writing), uploads slowly, half-closes (eof_received) or closes (connection_lost). corral reads
  a client's bytes only while its transport is reading, as asyncio would. A client that sent Expect:
  100-continue sends its body only after a 100.
* workers: each UpstreamConnection the pool opens. A worker reads the forwarded requests and answers the
  oldest: interim 1xx, a head, body pieces, the end (Content-Length, chunked, or close-delimited), an early
  answer before the request body is complete, garbage, surplus bytes after a whole answer (in the same write, or
  a HEAD answer's declared body sent later), or it dies mid-response; it closes idle connections
  (the FIN reaches corral only when the machine says so: a request may be sent on it in between), stops
  reading (pause_writing), refuses connections (connect errors), drains, stops, restarts. A worker is
  single-threaded: a request it has read whole stays its work until it answers it, even if corral closed
  that connection. Its answer's bytes reach corral only while corral reads that connection.
* the clock: a fake monotonic clock; advancing it fires the proxy's tick (pool.expire, check_timeouts) and
  every other timer in time order. A worker found hung (on_hung) is killed, as the supervisor does.

After each step the invariants below are checked; at the end (teardown) everyone finishes what is left (clients
read and send the rest, workers answer, stopped workers come back, the clock runs) and the end-state ones are
checked. A step whose rule does not apply to the state does nothing (see `applies`).

Invariants (each has a name; CORRAL_MACHINE_SKIP=name,name turns some off to look past them):
  observed-once            every request is logged (pool.on_observe) at most once, and by the end exactly once
  slots                    worker.inflight == the requests the worker itself is still working on (plus any sent
                           into a connection it had closed, until corral hears of it); never above max_inflight
  write-after-close        nothing is written to a transport after corral closed it
  response-crossed         a response carrying a worker's answer answers that very request (x-for), in order
  response-bytes           the client's bytes of a worker's answer are that answer's (status, body prefix; whole
                           only when the worker finished it)
  client-bytes             what a client receives parses as HTTP/1.1 responses, one per request
  interim                  the only interim response a client gets is 100, and only after Expect: 100-continue
  corral-error-unjustified a 502 only for a request its worker failed (died, garbled), a 504 only for a hung one
  failed-count             worker.failed / pool.failed never count more failures than workers had
  hung-unjustified         a worker is declared hung only after it held a whole request for request_timeout
                           (time it waited for the client's body, or was held back by corral, does not count)
  send-timeout-early       a client is aborted for not reading only after send_timeout without reading (less
                           CHECK_SLACK: the coarse check period)
  408-unjustified          408 only to a client that owed bytes (and could send them) for the timeout (the head's
                           header_timeout from its first byte, body_timeout since the last byte; less CHECK_SLACK)
  buffering                with request_buffering (the default) a worker sees a request only once its body is in
  dispatched-twice         a request reaches a worker twice only by the retry rules (killed from outside with no
                           answer byte: once more, another worker; or sent on a reused connection
                           that closed with no byte of answer: once more, same worker, fresh connection)
  dispatched-after-client-left  a request whose client had gone never reaches a worker
  worker-pipelined         a worker connection never carries a second request before the first is answered
  request-body             the worker receives the request body the client sent
  no-response              every request the client sent whole is answered, unless it left first or an earlier
                           answer ended the connection (refusals included: after the earlier answers)
  cut-not-logged           a response the client did not receive whole is logged as cut (ex.cut)
  logged-whole-mismatch    a response the client received whole is logged with its status, not as cut
  logged-more-than-taken   bytes_out is never more than the body bytes the client took
  refusal-not-logged       an edge refusal (400/408/413/431/501) is logged too
  counters                 log lines == served + failed + refused + abandoned
  stuck                    once clients and workers finish everything and the clock runs, every connection ends

CORRAL_MACHINE_ONLY=name checks that one alone; CORRAL_MACHINE_METHODS=GET,POST leaves HEAD out;
CORRAL_MACHINE_RULES_OFF=rule,rule turns rules off.
CORRAL_MACHINE_EXAMPLES / CORRAL_MACHINE_STEPS raise the budget (bench: long runs); CORRAL_MACHINE_RANDOM=1 drops
derandomize (a different search every run); CORRAL_MACHINE_ALL_BUGS=1 reports (and shrinks) every distinct failure,
not just the first.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import itertools
import os
import sys
from collections import Counter, defaultdict
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from support.machine_fakes import (
    ClientTransport,
    Clock,
    FakeLoop,
    Malformed,
    OrderedSet,
    RequestParser,
    Resp,
    UpstreamTransport,
    parse_responses,
    patch_time,
    unpatch_time,
)

from corral.config import AppConfig, ServerConfig
from corral.datapath.client import ClientConnection, Proxy
from corral.datapath.pool import Pool
from corral.datapath.worker import KILLED, State, Worker

pytestmark = pytest.mark.unit  # in-process: no child process, no listener (tests/conftest.py)

SKIP = {name.strip() for name in os.environ.get("CORRAL_MACHINE_SKIP", "").split(",") if name.strip()}
ONLY = {name.strip() for name in os.environ.get("CORRAL_MACHINE_ONLY", "").split(",") if name.strip()}
EXAMPLES = int(os.environ.get("CORRAL_MACHINE_EXAMPLES", "800"))
STEPS = int(os.environ.get("CORRAL_MACHINE_STEPS", "30"))
RANDOM = os.environ.get("CORRAL_MACHINE_RANDOM", "") not in ("", "0")
# The request methods clients use (CORRAL_MACHINE_METHODS=GET,POST steers the search around a known HEAD defect).
METHODS = [m.encode() for m in os.environ.get("CORRAL_MACHINE_METHODS", "GET,POST,HEAD").split(",") if m]
EPS = 1e-6
SLOTS = 3  # clients; each opens a new connection when it has none it can use (at most MAX_CONNECTIONS in all)
MAX_CONNECTIONS = 8
# check_timeouts runs on every 5th tick of the proxy's 0.1 s timer: a clock it restarts at a check (send_timeout
# from the last check that saw no backlog; a request's clocks while reading was paused) may run out up to one
# check period early. That much is allowed.
CHECK_SLACK = 0.5 + EPS

# The timeouts, short and distinct so that each one can be reached by a few clock moves.
HEADER_TIMEOUT, BODY_TIMEOUT, SEND_TIMEOUT, KEEPALIVE_TIMEOUT = 2.0, 3.0, 4.0, 5.0
QUEUE_TIMEOUT, REQUEST_TIMEOUT = 6.0, 8.0
RESPONSE_BUFFER = 64  # the client transport's high-water mark: a few dozen body bytes fill it
MAX_HEADER_BYTES, MAX_BODY = 1024, 4096
CORRAL_STATUSES = {400, 404, 408, 413, 414, 417, 431, 501, 502, 503, 504, 505}
REFUSAL_STATUSES = {400, 408, 413, 414, 417, 431, 501, 505}
COUNTERS = ("served", "failed", "refused", "abandoned")

BAD_REQUESTS = {
    "garbage": b"\x16\x03\x01\x02\x00\x01 not http\r\n\r\n",
    "no-host": b"GET /%s HTTP/1.1\r\n\r\n",
    "bad-header": b"GET /%s HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n",
    "huge-head": b"GET /%s HTTP/1.1\r\nHost: t\r\nX-Big: " + b"x" * (MAX_HEADER_BYTES + 64) + b"\r\n\r\n",
    "huge-body": b"POST /%s HTTP/1.1\r\nHost: t\r\nContent-Length: 99999\r\n\r\n",
    "bad-coding": b"POST /%s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n",
}

_VIOLATION_TYPES: dict[str, type[AssertionError]] = {}


def violation(name: str, message: str) -> AssertionError:
    """One exception type per invariant, so that hypothesis shrinks (and reports) each one apart."""
    cls = _VIOLATION_TYPES.get(name)
    if cls is None:
        cls = _VIOLATION_TYPES[name] = type(f"Violated_{name.replace('-', '_')}", (AssertionError,), {})
    return cls(f"[{name}] {message}")


def applies(cond: Any) -> Any:
    """A rule's precondition, checked when the rule runs (a step whose rule does not apply does nothing) rather
    than when hypothesis picks the rule: which rule a step picks then does not depend on the state, so the
    shrinker can delete a step without changing what the steps after it do."""

    def decorate(f: Any) -> Any:
        @functools.wraps(f)
        def guarded(self: Any, **kw: Any) -> None:
            if self.ready and cond(self):
                f(self, **kw)

        return guarded

    return decorate


def body_for(tag: str, n: int) -> bytes:
    pattern = (tag + ".").encode()
    return (pattern * (n // len(pattern) + 1))[:n]


# --- the model ---------------------------------------------------------------------------------------
class CReq:
    """A request as its client composed it."""

    def __init__(
        self,
        client: Client,
        rid: str,
        kind: str,
        method: bytes,
        wire: bytes,
        head_len: int,
        body: bytes = b"",
        expect: bool = False,
        close: bool = False,
    ) -> None:
        self.client = client
        self.rid = rid
        self.kind = kind  # "good", or "bad": the edge must refuse it
        self.method = method
        self.wire = wire
        self.head_len = head_len
        self.body = body
        self.expect = expect
        self.close = close
        self.queued = 0  # bytes the client has sent
        self.delivered = 0  # bytes corral has read

    @property
    def head_in(self) -> bool:
        return self.delivered >= self.head_len

    @property
    def whole_in(self) -> bool:
        return self.delivered >= len(self.wire)

    def __repr__(self) -> str:
        return f"<{self.kind} {self.method.decode()} /{self.rid} {self.delivered}/{len(self.wire)} in>"


class Client:
    def __init__(self, idx: int, conn: ClientConnection, t: ClientTransport) -> None:
        self.idx = idx
        self.conn = conn
        self.t = t
        self.reqs: list[CReq] = []
        self.outbox: list[tuple[CReq, bytes]] = []
        self.received = bytearray()
        self.sent_to = bytearray()  # every byte corral wrote to this client
        self.reads = True  # the client takes what corral writes
        self.eof_pending = False
        self.eof_delivered = False
        self.gone = False  # closed its socket
        self.left_seq: int | None = None  # when it closed or half-closed (event order)
        self.left_known = False  # corral has been told (eof_received / connection_lost)
        self.closed_by_corral_seq: int | None = None
        self.owe_since: float | None = None
        self._parsed: tuple[int, bool, list[Resp], str | None] | None = None

    def methods(self) -> list[bytes]:
        # An answer to a head corral never read whole (a refusal) is corral's error page, whatever the method.
        return [r.method if r.kind == "good" and r.head_in else b"GET" for r in self.reqs]

    def responses(self) -> tuple[list[Resp], str | None]:
        """The responses as the client received them."""
        eof = self.t.lost and not self.t.buf
        key = (len(self.received), eof)
        if self._parsed is None or self._parsed[:2] != key:
            resps, err = parse_responses(bytes(self.received), self.methods(), eof)
            self._parsed = (*key, resps, err)
        return self._parsed[2], self._parsed[3]

    def written(self) -> list[Resp]:
        """The responses as corral wrote them (whether or not the client read them)."""
        return parse_responses(bytes(self.sent_to), self.methods(), self.t.lost)[0]

    def response_to(self, req: CReq) -> Resp | None:
        resps, _ = self.responses()
        i = self.reqs.index(req)
        return resps[i] if i < len(resps) else None

    def sending(self) -> CReq | None:
        """The request the client is still sending."""
        if self.reqs and self.reqs[-1].queued < len(self.reqs[-1].wire):
            return self.reqs[-1]
        return None


class Plan:
    """A worker's answer: what it sends, and what of it the client must end up with."""

    def __init__(self, status: int, framing: str, body: bytes, close: bool, head: bytes) -> None:
        self.status = status
        self.framing = framing  # "length", "chunked", "close" or "none"
        self.body = body
        self.close = close
        self.head = head


class WReq:
    """A request as a worker read it, and the worker's work on it."""

    def __init__(self, rid: str, wc: WConn, seq: int, method: bytes) -> None:
        self.rid = rid
        self.wc = wc
        self.seq = seq  # 0: the first request on its connection
        self.method = method
        self.body = bytearray()
        self.complete = False  # the worker has the whole request
        self.active = 0.0  # seconds the worker has worked on it (held it whole and was free to write)
        self.plan: Plan | None = None
        self.sent = 0  # body bytes written
        self.any_byte = False
        self.wrote_all = False
        self.dead = False  # the worker stopped working on it (died, garbled, killed); corral may not know yet
        self.late_body = 0  # a HEAD answer's declared body, which this worker sends anyway, later (httpuv)
        self.finished = False  # no longer the worker's work, and corral has seen all it will see of it

    @property
    def worker(self) -> Worker:
        return self.wc.worker

    def __repr__(self) -> str:
        return f"<wreq /{self.rid} on {self.wc!r}>"


class WConn:
    def __init__(self, serial: int, proto: Any, t: UpstreamTransport, worker: Worker) -> None:
        self.serial = serial
        self.proto = proto
        self.t = t
        self.worker = worker
        self.parser = RequestParser()
        self.reqs: list[WReq] = []
        self.ops: list[tuple[Any, ...]] = []  # what the worker wrote, in order, not yet seen by corral
        self.lost: list[str] = []  # requests corral sent after the worker had closed its end
        self.stalled = False
        self.fin_deferred = False

    def busy(self) -> WReq | None:
        for r in self.reqs:
            if not r.finished:
                return r
        return None

    def __repr__(self) -> str:
        return f"conn{self.serial}(worker {self.worker.index})"


class Snap:
    """What an observed exchange said at the moment it was logged."""

    def __init__(self, ex: Any, seq: int) -> None:
        self.ex = ex
        self.seq = seq
        self.status = getattr(ex, "status", None)
        self.cut = getattr(ex, "cut", "")
        self.bytes_out = getattr(ex, "bytes_out", None)
        self.client = getattr(ex, "client", None)
        head = getattr(ex, "head", None)
        target = getattr(head, "target", None)
        self.rid = target[1:].decode("latin-1") if isinstance(target, bytes) and target.startswith(b"/r") else None

    def __repr__(self) -> str:
        return f"<logged /{self.rid} status={self.status} cut={self.cut!r} bytes_out={self.bytes_out}>"


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


class _Supervised:
    """A killed worker's process, as `worker.proc` shows it: gone (poll() has its exit status)."""

    pid = 1

    def poll(self) -> int:
        return -9


# --- the machine -------------------------------------------------------------------------------------
class ExchangeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.patched = patch_time(self.clock)
        self.ready = False
        self.pending: list[AssertionError] = []
        self.seq = itertools.count(1)
        self.rids = itertools.count(1)
        self.clients: list[Client] = []  # every connection ever opened
        self.slots: list[Client | None] = [None] * SLOTS  # the connection each of the SLOTS clients uses now
        self.wconns: list[WConn] = []
        self.reqs: dict[str, CReq] = {}
        self.receipts: dict[str, list[WReq]] = defaultdict(list)
        self.faults: dict[str, str] = {}
        self.worker_faults: Counter[int] = Counter()
        # Requests corral sent into a connection the worker had closed (per worker). corral's rule
        # (docs/security.md): resent once to the same worker, unless the body was streamed or the client left;
        # if the fresh connection is refused, the worker is taken for dead with it: a 502, counted against it.
        self.stale: dict[str, int] = {}
        self.hung: set[str] = set()
        self.killed: set[int] = set()
        # Requests a worker killed from outside held with no byte of answer: corral may send each once more, to
        # another worker (docs/operations.md, Retry and quarantine); `moved`: those it did send again.
        self.outside: set[str] = set()
        self.moved: set[str] = set()
        self.observed: list[Snap] = []

    # --- reporting ------------------------------------------------------------------------------
    def fail(self, name: str, message: str) -> None:
        if name not in SKIP and (not ONLY or name in ONLY):
            self.pending.append(violation(name, f"{message} (t={self.clock.now - 1000:.2f})"))

    # --- setup ----------------------------------------------------------------------------------
    @initialize(
        workers=st.integers(1, 2),
        max_inflight=st.integers(1, 2),
        max_queue=st.sampled_from([4, 1, 0]),
        spill=st.sampled_from([1 << 20, 0, 200]),
        buffering=st.booleans(),
    )
    def setup(self, workers: int, max_inflight: int, max_queue: int, spill: int, buffering: bool) -> None:
        app_kw: dict[str, Any] = {
            "workers": workers,
            "max_inflight": max_inflight,
            "dispatch": "fifo",
            "max_queue": max_queue,
            "queue_timeout": QUEUE_TIMEOUT,
            "request_timeout": REQUEST_TIMEOUT,
            "response_buffer": RESPONSE_BUFFER,
            "response_buffer_file": spill,
            "request_buffering": buffering,
            "request_buffer": 32,
        }
        known = _fields(AppConfig)
        self.app = AppConfig(**{k: v for k, v in app_kw.items() if k in known})
        self.buffering = bool(getattr(self.app, "request_buffering", True))
        server_kw: dict[str, Any] = {
            "header_timeout": HEADER_TIMEOUT,
            "body_timeout": BODY_TIMEOUT,
            "send_timeout": SEND_TIMEOUT,
            "keepalive_timeout": KEEPALIVE_TIMEOUT,
            "max_header_bytes": MAX_HEADER_BYTES,
            "max_body": MAX_BODY,
        }
        known = _fields(ServerConfig)
        self.server = ServerConfig(**{k: v for k, v in server_kw.items() if k in known})
        self.loop = FakeLoop(self.clock)
        self.loop.on_connection = self._on_connection
        self.pool = pool = Pool(self.app, self.loop)  # type: ignore[arg-type]
        pool.on_observe = self._observe
        pool.on_hung = self._on_hung  # pool.on_unreachable stays: out of rotation until worker_restarts
        self.workers = [Worker("app", i, "127.0.0.1", 9000 + i, max_inflight) for i in range(workers)]
        for w in self.workers:
            pool.join(w)
            pool.set_state(w, State.READY)
        self.proxy = Proxy(self.loop, self.server, [pool])  # type: ignore[arg-type]
        for owner, name in ((pool, "inflight"), (self.proxy, "connections")):
            if type(getattr(owner, name, None)) is set:
                setattr(owner, name, OrderedSet(getattr(owner, name)))  # the same order on every re-run
        ticker = self.loop.call_later(0.1, self.proxy._tick)
        if hasattr(self.proxy, "_ticker"):
            self.proxy._ticker = ticker  # type: ignore[assignment]
        self.ready = True

    # --- hooks corral calls ----------------------------------------------------------------------
    def _observe(self, ex: Any) -> None:
        self.observed.append(Snap(ex, next(self.seq)))

    def _on_connection(self, proto: Any, t: UpstreamTransport) -> None:
        wc = WConn(len(self.wconns), proto, t, proto.worker)
        self.wconns.append(wc)
        t.on_write = lambda: self._worker_read(wc)

    def _on_hung(self, worker: Worker, why: str) -> None:
        if worker.index in self.killed:
            return  # another of its requests: the worker is being killed already
        held = [r for r in self._wreqs(worker) if not r.finished and not r.dead]
        if not any(r.active >= REQUEST_TIMEOUT - EPS for r in held):
            worked = (
                ", ".join(
                    f"/{r.rid}: {'whole' if r.complete else 'body still coming'}, worked {r.active:.2f}s" for r in held
                )
                or "nothing"
            )
            self.fail("hung-unjustified", f"worker {worker.index} declared hung ({why}) while holding {worked}")
        for r in held:
            self.hung.add(r.rid)
        self.pool.set_state(worker, State.UNHEALTHY)  # what Supervisor.kill_hung does, then it kills it
        self._kill(worker, "killed as hung")

    def _client_write(self, c: Client, data: bytes) -> None:
        c.sent_to += data
        if b"HTTP/1.1 408 " in data:
            last = c.reqs[-1] if c.reqs else None
            limit = BODY_TIMEOUT if last is not None and last.head_in and not last.whole_in else HEADER_TIMEOUT
            if c.owe_since is None or self.clock.now - c.owe_since < limit - CHECK_SLACK:
                owed = "nothing" if c.owe_since is None else f"bytes for {self.clock.now - c.owe_since:.2f}s"
                sending = c.sending() or (c.reqs[-1] if c.reqs else None)
                self.fail("408-unjustified", f"client {c.idx} answered 408 while it owed {owed} ({sending!r})")

    def _client_abort(self, c: Client) -> None:
        t = c.t
        if t.buf and t.stall_since is not None and self.clock.now - t.stall_since < SEND_TIMEOUT - CHECK_SLACK:
            self.fail(
                "send-timeout-early",
                f"client {c.idx} aborted with {len(t.buf)} unread bytes after only "
                f"{self.clock.now - t.stall_since:.2f}s without reading (send_timeout {SEND_TIMEOUT})",
            )

    def _client_closed(self, c: Client) -> None:
        if c.closed_by_corral_seq is None:
            c.closed_by_corral_seq = next(self.seq)

    # --- helpers ---------------------------------------------------------------------------------
    def _open_client(self, slot: int) -> Client:
        conn = ClientConnection(self.proxy)
        idx = len(self.clients)
        holder: list[Client] = []
        t = ClientTransport(
            conn,
            ("127.0.0.1", 40000 + idx),
            self.clock,
            on_write=lambda data: self._client_write(holder[0], data),
            on_abort=lambda: self._client_abort(holder[0]),
        )
        c = Client(idx, conn, t)
        self.slots[slot] = c
        holder.append(c)
        orig_close, orig_abort = t.close, t.abort

        def close() -> None:
            self._client_closed(c)
            orig_close()

        def abort() -> None:
            self._client_closed(c)
            orig_abort()

        t.close, t.abort = close, abort  # type: ignore[method-assign]
        self.clients.append(c)
        conn.connection_made(t)  # type: ignore[arg-type]
        self.settle()
        return c

    def _wreqs(self, worker: Worker | None = None) -> list[WReq]:
        return [r for wc in self.wconns if worker is None or wc.worker is worker for r in wc.reqs]

    def _fault(self, r: WReq, why: str) -> None:
        if r.rid not in self.faults:
            self.faults[r.rid] = why
        self.worker_faults[r.worker.index] += 1

    def _kill(self, worker: Worker, why: str) -> None:
        """The worker process dies: what it wrote still arrives, then the FIN of every connection."""
        self.killed.add(worker.index)
        for wc in self.wconns:
            if wc.worker is not worker or wc.t.lost:
                continue
            busy = [r for r in wc.reqs if not r.finished]
            for r in busy:
                if not r.dead:
                    self._fault(r, why)
                r.dead = True
            wc.t.peer_close()
            wc.fin_deferred = False
            wc.ops.append(("fin",))
            wc.ops += [("done", r) for r in busy]

    def _send(self, c: Client, req: CReq, n: int) -> None:
        data = req.wire[req.queued : req.queued + n]
        req.queued += len(data)
        if data and not c.gone:
            c.outbox.append((req, data))

    def _may_send_body(self, c: Client, req: CReq, written: bool = False) -> bool:
        """The client has its 100 Continue (read it; or, `written`, corral wrote it to the client)."""
        if not req.expect:
            return True
        if written:
            resps = c.written()
            i = c.reqs.index(req)
            resp = resps[i] if i < len(resps) else None
        else:
            resp = c.response_to(req)
        return resp is not None and 100 in resp.interim

    def _sendable(self, c: Client, req: CReq) -> int:
        """How many more bytes of req the client would send now."""
        left = len(req.wire) - req.queued
        if req.queued < req.head_len:
            if req.expect and not self._may_send_body(c, req):
                return req.head_len - req.queued
            return left
        return left if self._may_send_body(c, req) else 0

    def _compose(self, c: Client, method: bytes, body_len: int, chunked: bool, expect: bool, close: bool) -> CReq:
        rid = f"r{next(self.rids)}"
        if method != b"POST":
            body_len, chunked, expect = 0, False, False
        body = body_for(rid.upper(), body_len)
        lines = [b"%s /%s HTTP/1.1" % (method, rid.encode()), b"Host: t"]
        if method == b"POST":
            lines.append(b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % body_len)
            if expect:
                lines.append(b"Expect: 100-continue")
        if close:
            lines.append(b"Connection: close")
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        if chunked:
            half = len(body) // 2
            enc = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:]) if p) + b"0\r\n\r\n"
        else:
            enc = body
        req = CReq(c, rid, "good", method, head + enc, len(head), body, expect, close)
        c.reqs.append(req)
        self.reqs[rid] = req
        return req

    def _can_start(self, c: Client) -> bool:
        if c.gone or c.eof_pending or c.eof_delivered or c.t.lost or c.sending() is not None:
            return False
        return not c.reqs or (c.reqs[-1].kind == "good" and not c.reqs[-1].close)

    def _done_with(self, c: Client | None) -> bool:
        """The client has no use for this connection any more: its next request goes on a new one."""
        if c is None or c.gone or c.t.lost or c.eof_pending or c.eof_delivered:
            return True
        return bool(c.reqs) and c.sending() is None and (c.reqs[-1].kind == "bad" or c.reqs[-1].close)

    def _slots(self, ok: Any) -> list[int]:
        """The clients (slots) whose current connection satisfies ok(client)."""
        if not self.ready:
            return []
        return [i for i, c in enumerate(self.slots) if c is not None and ok(c)]

    def _starter_slots(self) -> list[int]:
        room = len(self.clients) < MAX_CONNECTIONS
        return (
            [
                i
                for i, c in enumerate(self.slots)
                if (c is not None and self._can_start(c)) or (room and self._done_with(c))
            ]
            if self.ready
            else []
        )

    def _starter(self, c: int) -> Client:
        slot = self._cyclic(self._starter_slots(), c)
        cl = self.slots[slot]
        if cl is None or not self._can_start(cl):
            cl = self._open_client(slot)
        return cl

    def _is_sender(self, c: Client) -> bool:
        if c.gone or c.eof_pending or c.eof_delivered:
            return False
        req = c.sending()
        return req is not None and self._sendable(c, req) > 0

    def _client(self, slots: list[int], c: int) -> Client:
        cl = self.slots[self._cyclic(slots, c)]
        assert cl is not None
        return cl

    @staticmethod
    def _cyclic(items: list[int], c: int) -> int:
        """The first of items (sorted) from c on, wrapping: a step keeps its target when other steps go."""
        return next((i for i in items if i >= c), items[0])

    def _pick(self, items: list[Any], i: int) -> Any:
        return items[i % len(items)]

    # --- the world reacts ------------------------------------------------------------------------
    def settle(self) -> None:
        """Run the loop's tasks and let every peer take and deliver what it can, until nothing moves."""
        for _ in range(10_000):
            progress = self.loop.run_tasks()
            for c in list(self.clients):
                progress |= self._client_io(c)
            for wc in list(self.wconns):
                progress |= self._worker_io(wc)
            if not progress:
                break
        else:
            raise AssertionError("the fake world did not settle")
        for c in self.clients:
            if not self._owes(c):
                c.owe_since = None
            elif c.owe_since is None:
                c.owe_since = self.clock.now

    def _client_io(self, c: Client) -> bool:
        t = c.t
        progress = False
        if c.reads and not c.gone and (t.buf or t.writing_paused) and not t.lost:
            c.received += t.take()
            progress = True
        if c.outbox and t.reading and not t.closed and not c.gone:
            pieces, c.outbox = c.outbox, []
            for req, data in pieces:
                req.delivered += len(data)
            if pieces[-1][0].head_in:
                c.owe_since = None  # body_timeout is the longest gap between body bytes; header_timeout is for a head
            c.conn.data_received(b"".join(d for _, d in pieces))
            progress = True
        if c.eof_pending and not c.outbox and t.reading and not t.closed and not c.gone:
            c.eof_pending = False
            c.eof_delivered = True
            c.left_known = True
            if not c.conn.eof_received():
                ClientTransport.close(t)  # asyncio closes (flushes) the transport when eof_received returns false
            progress = True
        if t.closed and not t.lost and (t.aborted or not t.buf or c.gone):
            c.left_known = True
            t.lose()
            progress = True
        return progress

    def _owes(self, c: Client) -> bool:
        """The client is in the middle of a request, free to send the rest, and does not."""
        if c.gone or c.eof_pending or c.eof_delivered or c.outbox or c.t.closed or not c.t.reading:
            return False
        req = c.reqs[-1] if c.reqs else None
        if req is None or req.delivered == 0 or req.whole_in:
            return False
        return not (req.head_in and not self._may_send_body(c, req, written=True))

    def _worker_io(self, wc: WConn) -> bool:
        t = wc.t
        progress = False
        while wc.ops:
            op = wc.ops[0]
            if op[0] == "done":
                wc.ops.pop(0)
                op[1].finished = True
                progress = True
                continue
            if t.closed:
                wc.ops.pop(0)  # corral closed the connection: the worker's bytes go nowhere
                continue
            if op[0] == "rst":
                wc.ops.pop(0)
                t.lose(ConnectionResetError(errno.ECONNRESET, "reset by the worker"))
                progress = True
                continue
            if not t.reading:
                break
            if op[0] == "data":
                data = bytearray()
                while wc.ops and wc.ops[0][0] == "data":
                    data += wc.ops.pop(0)[1]
                while wc.ops and wc.ops[0][0] == "done":
                    wc.ops.pop(0)[1].finished = True  # these bytes end its answer: the worker is free for the next
                wc.proto.data_received(bytes(data))
            else:  # fin
                wc.ops.pop(0)
                wc.proto.eof_received()
                t.lose(ConnectionResetError(errno.ECONNRESET, "reset") if wc.lost else None)
            progress = True
        if t.closed and not t.lost:
            t.lose()
            progress = True
        if t.lost:
            wc.lost.clear()
            for r in wc.reqs:
                if not r.finished and not r.complete:
                    r.finished = True  # the worker reads EOF in the middle of the request: it drops it
                    progress = True
        return progress

    def _worker_read(self, wc: WConn) -> None:
        t = wc.t
        try:
            events = wc.parser.parse(t.wire)
        except Malformed as exc:
            self.fail("request-body", f"{wc!r} received a malformed request: {exc}")
            wc.parser.pos = len(t.wire)
            return
        for ev in events:
            kind, off = ev[0], ev[1]
            lost = t.peer_closed_at is not None and off >= t.peer_closed_at
            if kind == "head":
                rid = ev[3][1:].decode("latin-1")
                if lost:
                    wc.lost.append(rid)
                    self.stale[rid] = wc.worker.index
                else:
                    self._receipt(wc, rid, ev[2])
            elif lost or not wc.reqs:
                continue
            elif kind == "body":
                wc.reqs[-1].body += ev[2]
            else:
                r = wc.reqs[-1]
                r.complete = True
                creq = self.reqs.get(r.rid)
                if creq is not None and bytes(r.body) != creq.body:
                    self.fail(
                        "request-body",
                        f"worker got body {bytes(r.body)[:60]!r} for /{r.rid}, the client sent {creq.body[:60]!r}",
                    )

    def _receipt(self, wc: WConn, rid: str, method: bytes) -> None:
        creq = self.reqs.get(rid)
        if creq is None or creq.kind != "good":
            self.fail("dispatched-twice", f"{wc!r} received a request nobody sent whole: /{rid}")
        busy = wc.busy()
        if busy is not None:
            self.fail("worker-pipelined", f"{wc!r} received /{rid} while its answer to /{busy.rid} is unfinished")
        if creq is not None:
            c = creq.client
            if c.left_known:
                self.fail(
                    "dispatched-after-client-left",
                    f"/{rid} reached worker {wc.worker.index} after its client {c.idx} had gone",
                )
            if self.buffering and not creq.whole_in:
                self.fail(
                    "buffering",
                    f"/{rid} reached worker {wc.worker.index} with {creq.delivered} of its "
                    f"{len(creq.wire)} bytes in (request_buffering is on)",
                )
        earlier = self.receipts[rid]
        if (
            earlier
            and rid in self.outside
            and rid not in self.moved
            and all(e.wc.worker is not wc.worker for e in earlier)
        ):
            self.moved.add(rid)  # its worker was killed from outside: once more, to another worker
        elif earlier:
            first = earlier[0]
            ft = first.wc.t
            ok = (  # corral's rule: a kept connection (one that sat idle, before a request or after one)
                len(earlier) == 1
                and not first.any_byte
                and (ft.closed or ft.peer_closed_at is not None)
                and first.wc.worker is wc.worker
                and not wc.reqs
            )
            if not ok:
                self.fail(
                    "dispatched-twice",
                    f"/{rid} reached a worker again ({wc!r}, after {earlier!r}: "
                    f"first on request #{first.seq} of its connection, answer bytes {first.any_byte})",
                )
        r = WReq(rid, wc, len(wc.reqs), method)
        wc.reqs.append(r)
        earlier.append(r)

    def _accrue(self, dt: float) -> None:
        """Request-timeout time: a worker works on a whole request unless corral keeps it from writing."""
        if dt <= 0:
            return
        for wc in self.wconns:
            blocked = not wc.t.reading and any(op[0] == "data" for op in wc.ops)
            for r in wc.reqs:
                # A worker waits for the client while the request is not whole, unless it stopped reading itself.
                if (r.complete or wc.stalled) and not r.finished and not r.dead and not blocked:
                    r.active += dt

    def _advance(self, dt: float) -> None:
        # A worker's FIN reaches corral at once on loopback: time passing never leaves one undelivered.
        if any(wc.fin_deferred for wc in self.wconns):
            for wc in self.wconns:
                if wc.fin_deferred:
                    wc.fin_deferred = False
                    wc.ops.append(("fin",))
            self.settle()
        target = self.clock.now + dt
        while True:
            due = self.loop.next_due()
            if due is None or due > target:
                break
            self._accrue(due - self.clock.now)
            self.clock.now = max(self.clock.now, due)
            self.loop.fire_next()
            self.settle()
        self._accrue(target - self.clock.now)
        self.clock.now = target
        self.settle()

    # --- worker answers ---------------------------------------------------------------------------
    def _actionable(self, started: bool | None = None) -> list[WReq]:
        out = []
        for wc in self.wconns:
            if wc.t.closed or wc.t.peer_closed_at is not None:
                continue
            for r in wc.reqs:
                if r.finished or r.dead or r.wrote_all:
                    continue
                if started is None or (r.plan is not None) == started:
                    out.append(r)
        return out

    def _make_plan(self, r: WReq, status: int, framing: str, length: int, close: bool) -> Plan:
        headers = [b"x-for: %s" % r.rid.encode()]
        body = body_for(r.rid, length)
        if status in (204, 304):
            framing, body = "none", b""
        elif r.method == b"HEAD":
            headers.append(b"content-length: %d" % length)
            framing, body = "none", b""
        elif framing == "length":
            headers.append(b"content-length: %d" % length)
        elif framing == "chunked":
            headers.append(b"transfer-encoding: chunked")
        if close:
            headers.append(b"connection: close")
        head = b"HTTP/1.1 %d Whatever\r\n" % status + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
        return Plan(status, framing, body, close or framing == "close", head)

    def _wwrite(self, r: WReq, data: bytes) -> None:
        if data:
            r.any_byte = True
            r.wc.ops.append(("data", data))

    def _body_piece(self, r: WReq, n: int) -> None:
        plan = r.plan
        assert plan is not None
        piece = plan.body[r.sent : r.sent + n]
        r.sent += len(piece)
        if piece:
            self._wwrite(r, b"%x\r\n%s\r\n" % (len(piece), piece) if plan.framing == "chunked" else piece)
        if plan.framing in ("length", "none") and r.sent == len(plan.body):
            self._complete(r)

    def _complete(self, r: WReq) -> None:
        plan = r.plan
        assert plan is not None
        wc = r.wc
        r.wrote_all = True
        if plan.framing == "chunked":
            self._wwrite(r, b"0\r\n\r\n")
        if plan.framing == "close":
            wc.t.peer_close()
            wc.ops += [("fin",), ("done", r)]
            return
        wc.ops.append(("done", r))
        if plan.close:
            wc.t.peer_close()
            wc.ops.append(("fin",))

    def _start(self, r: WReq, status: int, framing: str, length: int, close: bool, first: int) -> None:
        r.plan = self._make_plan(r, status, framing, length, close)
        if r.method == b"HEAD" and status not in (204, 304):
            r.late_body = length
        piece = r.plan.body[:first]
        r.sent = len(piece)
        if piece and r.plan.framing == "chunked":
            piece = b"%x\r\n%s\r\n" % (len(piece), piece)
        self._wwrite(r, r.plan.head + piece)
        if r.plan.framing in ("length", "none") and r.sent == len(r.plan.body):
            self._complete(r)

    # --- rules: clients ---------------------------------------------------------------------------
    @rule(
        c=st.integers(0, SLOTS - 1),
        method=st.sampled_from(METHODS),
        body_len=st.integers(0, 40),
        chunked=st.booleans(),
        expect=st.booleans(),
        close=st.booleans(),
        send=st.sampled_from(["all", "head", "part-of-head"]),
    )
    @applies(lambda self: self._starter_slots())
    def client_request(
        self, c: int, method: bytes, body_len: int, chunked: bool, expect: bool, close: bool, send: str
    ) -> None:
        cl = self._starter(c)
        req = self._compose(cl, method, body_len, chunked, expect, close)
        n = {"all": self._sendable(cl, req), "head": req.head_len, "part-of-head": req.head_len // 2}[send]
        self._send(cl, req, n)
        self.settle()

    @rule(c=st.integers(0, SLOTS - 1), n=st.integers(1, 80))
    @applies(lambda self: self._slots(self._is_sender))
    def client_sends_more(self, c: int, n: int) -> None:
        cl = self._client(self._slots(self._is_sender), c)
        req = cl.sending()
        assert req is not None
        self._send(cl, req, min(n, self._sendable(cl, req)))
        self.settle()

    @rule(c=st.integers(0, SLOTS - 1), pieces=st.integers(2, 6), gap=st.sampled_from([2.5, 1.0, 0.5]))
    @applies(lambda self: self._slots(self._is_sender))
    def client_trickles(self, c: int, pieces: int, gap: float) -> None:
        """A slow uploader: the rest of its request in `pieces` pieces, `gap` seconds apart."""
        cl = self._client(self._slots(self._is_sender), c)
        req = cl.sending()
        assert req is not None
        for k in range(pieces, 0, -1):
            left = self._sendable(cl, req)
            if not left or cl.gone:
                break
            self._advance(gap)
            self._send(cl, req, -(-left // k))
            self.settle()

    @rule(c=st.integers(0, SLOTS - 1), second=st.sampled_from(METHODS))
    @applies(lambda self: self._starter_slots())
    def client_pipelines_two(self, c: int, second: bytes) -> None:
        cl = self._starter(c)
        one = self._compose(cl, b"GET", 0, False, False, False)
        two = self._compose(cl, second, 7, False, False, False)
        self._send(cl, one, len(one.wire))
        self._send(cl, two, len(two.wire))
        self.settle()

    @rule(c=st.integers(0, SLOTS - 1), kind=st.sampled_from(sorted(BAD_REQUESTS)))
    @applies(lambda self: self._starter_slots())
    def client_sends_bad_request(self, c: int, kind: str) -> None:
        cl = self._starter(c)
        rid = f"r{next(self.rids)}"
        raw = BAD_REQUESTS[kind]
        wire = raw % rid.encode() if b"%s" in raw else raw
        req = CReq(cl, rid, "bad", b"GET", wire, len(wire))
        cl.reqs.append(req)
        self.reqs[rid] = req
        self._send(cl, req, len(wire))
        self.settle()

    def _reading(self, reading: bool) -> list[int]:
        return self._slots(lambda c: not c.gone and c.reads is reading and not c.t.lost)

    @rule(c=st.integers(0, SLOTS - 1))
    @applies(lambda self: self._reading(True))
    def client_stops_reading(self, c: int) -> None:
        self._client(self._reading(True), c).reads = False

    @rule(c=st.integers(0, SLOTS - 1))
    @applies(lambda self: self._reading(False))
    def client_reads(self, c: int) -> None:
        self._client(self._reading(False), c).reads = True
        self.settle()

    def _open(self, half_closed: bool = True) -> list[int]:
        def ok(c: Client) -> bool:
            return not c.gone and not c.t.lost and (half_closed or not (c.eof_pending or c.eof_delivered))

        return self._slots(ok)

    @rule(c=st.integers(0, SLOTS - 1))
    @applies(lambda self: self._open(half_closed=False))
    def client_half_closes(self, c: int) -> None:
        cl = self._client(self._open(half_closed=False), c)
        cl.eof_pending = True
        if cl.left_seq is None:
            cl.left_seq = next(self.seq)
        self.settle()

    @rule(c=st.integers(0, SLOTS - 1))
    @applies(lambda self: self._open())
    def client_closes(self, c: int) -> None:
        self._client_goes(self._client(self._open(), c))
        self.settle()

    def _client_goes(self, cl: Client) -> None:
        if cl.left_seq is None:
            cl.left_seq = next(self.seq)
        cl.gone = True
        cl.reads = False
        cl.outbox.clear()
        cl.left_known = True
        cl.t.lose()

    # --- rules: workers ---------------------------------------------------------------------------
    @rule(
        i=st.integers(0, 7),
        status=st.sampled_from([200, 404, 500, 204, 304]),
        framing=st.sampled_from(["length", "chunked", "close"]),
        length=st.one_of(st.integers(0, 40), st.integers(41, 700)),
        close=st.booleans(),
    )
    @applies(lambda self: self.ready and self._actionable(started=False))
    def worker_answers(self, i: int, status: int, framing: str, length: int, close: bool) -> None:
        r = self._pick(self._actionable(started=False), i)
        self._start(r, status, framing, length, close, length)
        if not r.wrote_all:
            self._complete(r)
        self.settle()

    @rule(
        i=st.integers(0, 7),
        status=st.sampled_from([200, 404, 500]),
        framing=st.sampled_from(["length", "chunked", "close"]),
        length=st.one_of(st.integers(0, 40), st.integers(41, 700)),
        close=st.booleans(),
        first=st.integers(0, 700),
    )
    @applies(lambda self: self.ready and self._actionable(started=False))
    def worker_sends_head(self, i: int, status: int, framing: str, length: int, close: bool, first: int) -> None:
        r = self._pick(self._actionable(started=False), i)
        self._start(r, status, framing, length, close, min(first, length))
        self.settle()

    @rule(i=st.integers(0, 7), code=st.sampled_from([100, 103]))
    @applies(lambda self: self.ready and self._actionable(started=False))
    def worker_sends_interim(self, i: int, code: int) -> None:
        r = self._pick(self._actionable(started=False), i)
        self._wwrite(r, b"HTTP/1.1 %d Interim\r\nlink: </s.css>\r\n\r\n" % code)
        r.any_byte = False  # an interim answer is not an answer: the request could still be retried
        self.settle()

    @rule(i=st.integers(0, 7), n=st.integers(1, 300))
    @applies(lambda self: self.ready and self._actionable(started=True))
    def worker_sends_body(self, i: int, n: int) -> None:
        self._body_piece(self._pick(self._actionable(started=True), i), n)
        self.settle()

    @rule(i=st.integers(0, 7))
    @applies(lambda self: self.ready and self._actionable(started=True))
    def worker_ends_response(self, i: int) -> None:
        r = self._pick(self._actionable(started=True), i)
        assert r.plan is not None
        self._body_piece(r, len(r.plan.body))
        if not r.wrote_all:
            self._complete(r)
        self.settle()

    @rule(i=st.integers(0, 7), eof_first=st.booleans())
    @applies(lambda self: self.ready and self._actionable())
    def worker_dies_mid_request(self, i: int, eof_first: bool) -> None:
        r = self._pick(self._actionable(), i)
        wc = r.wc
        if eof_first and r.plan is not None and r.plan.framing == "close":
            r.plan.body = r.plan.body[: r.sent]  # a close-delimited answer cut by a FIN is whole: nobody can tell
            self._complete(r)
            self.settle()
            return
        self._fault(r, "died")
        r.dead = True
        wc.t.peer_close()
        if eof_first:
            wc.ops += [("fin",), ("done", r)]
        else:
            wc.ops = [op for op in wc.ops if op[0] == "done"] + [("rst",), ("done", r)]
        self.settle()

    @rule(i=st.integers(0, 7))
    @applies(lambda self: self.ready and self._actionable(started=False))
    def worker_sends_garbage(self, i: int) -> None:
        r = self._pick(self._actionable(started=False), i)
        self._fault(r, "garbled")
        r.dead = True
        self._wwrite(r, b"THIS IS NOT HTTP\r\n\r\n")
        r.wc.ops.append(("done", r))
        self.settle()

    @rule(i=st.integers(0, 7), forged=st.booleans())
    @applies(lambda self: self.ready and self._actionable(started=False))
    def worker_answers_with_surplus(self, i: int, forged: bool) -> None:
        """A whole answer, then more bytes in the same write: junk, or a whole second response. Neither may
        reach any client, and the connection must not carry another request."""
        r = self._pick(self._actionable(started=False), i)
        self._start(r, 200, "length", 5, False, 5)
        if not r.wrote_all:
            self._complete(r)
        extra = b"HTTP/1.1 200 OK\r\nx-for: forged\r\ncontent-length: 6\r\n\r\nforged" if forged else b"junk\r\n"
        for k, op in enumerate(r.wc.ops):
            if op[0] == "done" and op[1] is r:
                r.wc.ops.insert(k, ("data", extra))  # before the end: in the same read as the answer
                break
        self.settle()

    def _late_bodies(self) -> list[WReq]:
        return (
            [
                r
                for wc in self.wconns
                if not wc.t.closed and wc.t.peer_closed_at is None
                for r in wc.reqs
                if r.finished and r.late_body
            ]
            if self.ready
            else []
        )

    @rule(i=st.integers(0, 7))
    @applies(lambda self: self._late_bodies())
    def worker_sends_declared_body_late(self, i: int) -> None:
        """After a HEAD answer that declared a body, the worker sends that body anyway, in a later segment:
        corral must not have reused the connection, or the bytes would be taken as another request's answer."""
        r = self._pick(self._late_bodies(), i)
        data = body_for(r.rid, r.late_body)
        r.late_body = 0
        r.wc.ops.append(("data", data))
        self.settle()

    def _orphans(self) -> list[WReq]:
        return [r for wc in self.wconns if wc.t.closed for r in wc.reqs if not r.finished and not r.dead]

    @rule(i=st.integers(0, 7))
    @applies(lambda self: self.ready and self._orphans())
    def worker_finishes_unwanted_request(self, i: int) -> None:
        """A worker finishes a request whose connection corral closed: its answer goes nowhere."""
        self._pick(self._orphans(), i).finished = True
        self.settle()

    def _idle_conns(self) -> list[WConn]:
        if not self.ready:
            return []
        return [
            wc
            for wc in self.wconns
            if not wc.t.closed and wc.t.peer_closed_at is None and wc.busy() is None and not wc.ops
        ]

    @rule(i=st.integers(0, 7))
    @applies(lambda self: self._idle_conns())
    def worker_closes_idle_connection(self, i: int) -> None:
        """The worker's keep-alive timer closes an idle connection; corral hears of it at deliver_worker_fins."""
        wc = self._pick(self._idle_conns(), i)
        wc.t.peer_close()
        wc.fin_deferred = True

    @rule()
    @applies(lambda self: self.ready and any(wc.fin_deferred for wc in self.wconns))
    def deliver_worker_fins(self) -> None:
        for wc in self.wconns:
            if wc.fin_deferred:
                wc.fin_deferred = False
                wc.ops.append(("fin",))
        self.settle()

    def _stallable(self, stalled: bool) -> list[WConn]:
        return [wc for wc in self.wconns if wc.stalled is stalled and not wc.t.closed] if self.ready else []

    @rule(i=st.integers(0, 7))
    @applies(lambda self: self._stallable(False))
    def worker_stops_reading(self, i: int) -> None:
        wc = self._pick(self._stallable(False), i)
        wc.stalled = True
        wc.proto.pause_writing()
        self.settle()

    @rule(i=st.integers(0, 7))
    @applies(lambda self: self._stallable(True))
    def worker_reads_again(self, i: int) -> None:
        wc = self._pick(self._stallable(True), i)
        wc.stalled = False
        wc.proto.resume_writing()
        self.settle()

    @rule(w=st.integers(0, 1), out_of_fds=st.booleans())
    @applies(lambda self: self.ready and sum(len(v) for v in self.loop.errors.values()) < 2)
    def worker_refuses_next_connection(self, w: int, out_of_fds: bool) -> None:
        worker = self._pick(self.workers, w)
        err = (
            OSError(errno.EMFILE, "Too many open files")
            if out_of_fds
            else ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        )
        self.loop.errors.setdefault(worker.port, []).append(err)

    @rule(w=st.integers(0, 1))
    @applies(lambda self: self.ready and any(w.state is State.READY for w in self.workers))
    def worker_drains(self, w: int) -> None:
        worker = self._pick([w for w in self.workers if w.state is State.READY], w)
        self.pool.set_state(worker, State.DRAINING)
        self.settle()

    @rule(w=st.integers(0, 1))
    @applies(lambda self: self.ready and any(w.state is State.DRAINING for w in self.workers))
    def worker_stops(self, w: int) -> None:
        worker = self._pick([w for w in self.workers if w.state is State.DRAINING], w)
        self._kill(worker, "stopped while holding it")
        self.pool.set_state(worker, State.STOPPED)
        self.pool.forget(worker)
        self.settle()

    @rule(w=st.integers(0, 1), exit_seen_first=st.booleans())
    @applies(lambda self: self.ready and any(w.state is State.READY for w in self.workers))
    def worker_killed_from_outside(self, w: int, exit_seen_first: bool) -> None:
        """An operator's kill -9 (or the OOM killer): the process ends, its connections close, the supervisor reaps
        it. `exit_seen_first`: the exit is known before corral reads the sockets' close (else the other way)."""
        worker = self._pick([w for w in self.workers if w.state is State.READY], w)
        worker.proc = _Supervised()  # type: ignore[assignment]  # a worker corral started: its end can be known
        for r in self._wreqs(worker):
            # Sent again only while no byte of its answer has reached the client: corral holds a response head
            # until the first body byte (or the end), so a head alone does not count. POST: never again.
            if not r.finished and not r.dead and not r.sent and r.method != b"POST":
                self.outside.add(r.rid)
        self._kill(worker, "killed from outside")
        if not exit_seen_first:
            self.settle()  # the close first: its requests wait for the verdict
        worker.exit_cause = KILLED  # what Supervisor._after_exit does once it has reaped the process
        self.pool.set_state(worker, State.STOPPED)
        self.pool.forget(worker)
        self.pool.worker_exited(worker)
        self.settle()

    def _revivable(self) -> list[Worker]:
        if not self.ready:
            return []
        return [
            w
            for w in self.workers
            if w.state is not State.READY
            and all(wc.t.lost for wc in self.wconns if wc.worker is w and w.index in self.killed)
        ]

    @rule(w=st.integers(0, 1))
    @applies(lambda self: self._revivable())
    def worker_restarts(self, w: int) -> None:
        self._revive(self._pick(self._revivable(), w))
        self.settle()

    def _revive(self, worker: Worker) -> None:
        self.killed.discard(worker.index)
        worker.proc, worker.exit_cause, worker.lost, worker.awaiting = None, None, [], []  # a new process
        if worker not in self.pool.workers:
            self.pool.join(worker)
        self.pool.set_state(worker, State.READY)

    # --- rules: time -----------------------------------------------------------------------------
    @rule(dt=st.sampled_from([1.0, 9.0, 4.5, 2.5, 0.5, 0.1]))
    @applies(lambda self: self.ready)
    def time_passes(self, dt: float) -> None:
        self._advance(dt)

    # --- invariants ------------------------------------------------------------------------------
    @invariant()
    def holds(self) -> None:
        if self.ready:
            self._check_step()
        if self.pending:
            raise self.pending[0]

    def _check_step(self) -> None:
        for c in self.clients:
            if c.t.late:
                self.fail("write-after-close", f"client {c.idx}: {c.t.late!r} written after close")
        for wc in self.wconns:
            if wc.t.late:
                self.fail("write-after-close", f"{wc!r}: {wc.t.late!r} written after close")
        ids = Counter(id(s.ex) for s in self.observed)
        rids = Counter(s.rid for s in self.observed if s.rid is not None)
        if any(n > 1 for n in ids.values()) or any(n > 1 for n in rids.values()):
            twice = [s for s in self.observed if ids[id(s.ex)] > 1 or (s.rid is not None and rids[s.rid] > 1)]
            self.fail("observed-once", f"logged more than once: {twice!r}")
        for w in self.workers:
            self._check_slots(w)
        for w in self.workers:
            stale = sum(1 for i in self.stale.values() if i == w.index)
            if w.failed > self.worker_faults[w.index] + stale:
                self.fail(
                    "failed-count",
                    f"worker {w.index} counted {w.failed} failures, it failed {self.worker_faults[w.index]} times",
                )
        for c in self.clients:
            self._check_responses(c)

    def _check_slots(self, w: Worker) -> None:
        working = []
        for wc in self.wconns:
            if wc.worker is not w:
                continue
            busy = wc.busy()
            if busy is not None:
                working.append(busy.rid)
            elif wc.lost and not wc.t.lost:
                working.append(f"{wc.lost[0]} (sent after the worker closed {wc!r})")
        if w.inflight != len(working) or w.inflight > w.max_inflight:
            self.fail(
                "slots",
                f"worker {w.index} ({w.state.value}): inflight={w.inflight} (max {w.max_inflight}) "
                f"but the worker is working on {working or 'nothing'}",
            )

    def _check_responses(self, c: Client) -> None:
        resps, err = c.responses()
        if err:
            self.fail("client-bytes", f"client {c.idx}: {err}")
        for i, resp in enumerate(resps):
            req = c.reqs[i]
            for code in resp.interim:
                if code != 100 or not req.expect:
                    self.fail("interim", f"client {c.idx} got a {code} interim answer to {req!r}")
            if resp.status is None:
                continue
            xfor = resp.headers.get(b"x-for")
            if xfor is not None:
                if req.kind != "good" or xfor.decode() != req.rid:
                    self.fail(
                        "response-crossed",
                        f"client {c.idx} got the answer to /{xfor.decode()} as its answer #{i} ({req!r})",
                    )
                    continue
                plan = next((r.plan for r in reversed(self.receipts[req.rid]) if r.plan is not None), None)
                if plan is None:
                    self.fail("response-crossed", f"client {c.idx}: an answer to /{req.rid} no worker sent")
                elif resp.status != plan.status or not plan.body.startswith(bytes(resp.body)):
                    self.fail(
                        "response-bytes",
                        f"client {c.idx}: answer to /{req.rid} is {resp!r}, the worker "
                        f"sent {plan.status} {plan.body[:40]!r}",
                    )
                elif resp.complete and len(resp.body) != len(plan.body) and plan.framing != "close":
                    # (a close-delimited body ends where the worker's connection does, however it ends)
                    self.fail(
                        "response-bytes",
                        f"client {c.idx}: answer to /{req.rid} looks whole with "
                        f"{len(resp.body)} of the worker's {len(plan.body)} body bytes",
                    )
                continue
            if resp.status not in CORRAL_STATUSES:
                self.fail("client-bytes", f"client {c.idx}: unexpected status {resp.status} for {req!r}")
            elif resp.status == 502 and req.rid not in self.faults and req.rid not in self.stale:
                self.fail(
                    "corral-error-unjustified",
                    f"client {c.idx}: 502 for /{req.rid}, which no worker failed ({self._story(req)})",
                )
            elif resp.status == 504 and req.rid not in self.hung:
                self.fail(
                    "corral-error-unjustified",
                    f"client {c.idx}: 504 for /{req.rid}, which no hung worker held ({self._story(req)})",
                )

    def _story(self, req: CReq) -> str:
        got = self.receipts.get(req.rid) or []
        if not got:
            return "no worker received it"
        return "received by " + ", ".join(f"{r.wc!r} (request #{r.seq} there)" for r in got)

    # --- the end ---------------------------------------------------------------------------------
    def teardown(self) -> None:
        failing = sys.exc_info()[0] is not None
        try:
            if self.ready and not failing and not self.pending:
                self._finish_everything()
                if not self.pending:
                    self._final_checks()
                if self.pending:
                    raise self.pending[0]
        finally:
            unpatch_time(self.patched)

    def _quiet(self) -> bool:
        return (
            all(c.t.lost for c in self.clients)
            and not any(wc.ops or wc.busy() for wc in self.wconns)
            and not self.pool.inflight
            and not self.pool.scheduler.depth
            and not self.loop.tasks
        )

    def _finish_everything(self) -> None:
        """Everyone does what is left to do: clients read and finish their requests, workers answer, stopped
        workers come back, and the clock runs; every connection must end."""
        for _ in range(200):
            for c in self.clients:
                if not c.gone:
                    c.reads = True
                req = c.sending()
                if req is not None and not c.gone and not c.eof_pending and not c.eof_delivered:
                    self._send(c, req, self._sendable(c, req))
            for wc in self.wconns:
                if wc.stalled and not wc.t.closed:
                    wc.stalled = False
                    wc.proto.resume_writing()
                if wc.fin_deferred:
                    wc.fin_deferred = False
                    wc.ops.append(("fin",))
            for r in self._orphans():
                r.finished = True
            for r in self._actionable():
                if r.complete or r.plan is not None:
                    if r.plan is None:
                        self._start(r, 200, "length", 3, False, 3)
                    elif not r.wrote_all:
                        self._body_piece(r, len(r.plan.body))
                        if not r.wrote_all:
                            self._complete(r)
            for w in self.workers:
                if w.state is not State.READY and w in self._revivable():
                    self._revive(w)
            self.settle()
            self._check_step()
            if self.pending or self._quiet():
                return
            self._advance(1.0)
            self._check_step()
            if self.pending:
                return
        stuck = [
            f"client {c.idx}: {c.reqs[-3:]!r}, transport {'closed' if c.t.closed else 'open'}, "
            f"{'reading' if c.t.reading else 'not reading'}"
            for c in self.clients
            if not c.t.lost
        ]
        self.fail(
            "stuck",
            f"200 s after everyone finished, still open: {stuck}; workers "
            f"{[(w.index, w.state.value, w.inflight) for w in self.workers]}, queue {self.pool.scheduler.depth}",
        )

    def _final_checks(self) -> None:
        pool = self.pool
        for w in self.workers:
            self._check_slots(w)
        if pool.inflight or pool.scheduler.depth:
            self.fail("slots", f"at the end: pool.inflight={len(pool.inflight)} queue={pool.scheduler.depth}")
        good: dict[str, list[Snap]] = defaultdict(list)
        refusals: dict[int, list[Snap]] = defaultdict(list)
        for s in self.observed:
            creq = self.reqs.get(s.rid) if s.rid else None
            if creq is not None and creq.kind == "good":
                good[s.rid].append(s)  # type: ignore[index]
            else:
                refusals[id(s.client)].append(s)
        for c in self.clients:
            self._final_client(c, good, refusals[id(c.conn)])
        outcomes = getattr(pool, "outcomes", {})  # the counters, by outcome (where the new code keeps them)
        counted = {name: getattr(pool, name, None) for name in COUNTERS}
        counted = {name: outcomes.get(name, 0) if n is None else n for name, n in counted.items()}
        if len(self.observed) != sum(counted.values()):
            self.fail("counters", f"{len(self.observed)} exchanges logged, counters say {counted}")

    def _final_client(self, c: Client, good: dict[str, list[Snap]], refusals: list[Snap]) -> None:
        got, _ = c.responses()  # what the client read
        wrote = c.written()  # what corral wrote (an abort, or a client that left, can keep it from the client)
        # An earlier exchange ended the connection: what follows may go unanswered. "asked": that request
        # said Connection: close; "cut": its answer was cut; "corral": corral's answer said close (allowed to
        # leave pipelined requests unanswered, except one refused at the edge: its answer must follow).
        ended = ""
        refused: Resp | None = None
        closed = c.closed_by_corral_seq
        client_first = c.left_seq is not None and (closed is None or c.left_seq < closed)
        for i, req in enumerate(c.reqs):
            resp = got[i] if i < len(got) else None
            answer = wrote[i] if i < len(wrote) else None
            logs = good.get(req.rid, [])
            if req.kind == "good" and req.head_in and len(logs) != 1:
                self.fail("observed-once", f"client {c.idx}: {req!r} logged {len(logs)} times ({self._story(req)})")
            if answer is not None and answer.status in REFUSAL_STATUSES and (req.kind == "bad" or not req.head_in):
                refused = answer
            for s in logs:
                taken = len(resp.body) if resp is not None else 0
                # corral counts what it handed to the client's socket (nginx's $body_bytes_sent): a client
                # that closes with bytes unread, or a transport whose close still flushes, may take fewer
                if answer is not None and not c.t.aborted:
                    taken = max(taken, len(answer.body))
                if s.bytes_out is not None and s.bytes_out > taken:
                    self.fail(
                        "logged-more-than-taken",
                        f"client {c.idx}: {s!r} but the client took {taken} body bytes of {resp!r}",
                    )
            if ended:
                continue  # an answer that said close (or was cut) ends the connection: nothing may follow it
            if resp is not None and resp.complete:
                for s in logs:
                    if s.status != resp.status or s.cut:
                        self.fail("logged-whole-mismatch", f"client {c.idx} got {resp!r} whole, logged as {s!r}")
                if resp.closes:
                    ended = "asked" if req.close else "corral"
                continue
            ended = "cut"
            if not req.whole_in and not (req.kind == "good" and req.head_in):
                continue  # corral never had it (or not its head): nothing was asked
            if req.kind == "bad" or not req.head_in:
                if answer is None and not client_first:
                    self.fail(
                        "no-response",
                        f"client {c.idx}: {req!r} was refused (connection closed) without its error response",
                    )
                continue
            if (resp is None or resp.status is None) and client_first:
                continue  # the client left before it got any of it: abandoned, not cut
            if resp is None or resp.status is None:
                what = "before the client had any of the answer"
            else:
                what = f"in the middle of the answer ({resp!r})"
            how = "the client left" if client_first else "corral closed it" + (" (abort)" if c.t.aborted else "")
            if client_first and answer is not None and answer.complete and not c.t.aborted:
                continue  # corral had handed the whole answer to the socket before the client left: whole
            if answer is not None and answer.status in REFUSAL_STATUSES:
                continue  # an edge refusal is logged as it is written, then the connection closes (documented)
            for s in logs:
                if not s.cut:
                    self.fail(
                        "cut-not-logged",
                        f"client {c.idx}: connection ended {what} to {req!r} ({how}; "
                        f"corral wrote {answer!r}), logged as {s!r}",
                    )
        if len(refusals) > 1 or (refused is not None and len(refusals) != 1):
            self.fail(
                "refusal-not-logged", f"client {c.idx} was refused with {refused!r}; logged refusals: {refusals!r}"
            )


# CORRAL_MACHINE_RULES_OFF=rule,rule: those rules never run (steers the search around a known defect).
for _name in filter(None, os.environ.get("CORRAL_MACHINE_RULES_OFF", "").split(",")):
    setattr(ExchangeMachine, _name, precondition(lambda self: False)(getattr(ExchangeMachine, _name)))


SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=list(HealthCheck),
    # One defect, shrunk, in well under a minute (each distinct one shrinks apart: minutes on a bad day).
    report_multiple_bugs=os.environ.get("CORRAL_MACHINE_ALL_BUGS", "") not in ("", "0"),
)


def test_exchange_machine() -> None:
    run_state_machine_as_test(ExchangeMachine, settings=SETTINGS)


def test_machine_rig_serves_a_request() -> None:
    """The rig itself: one request, answered whole, leaves nothing behind and breaks no invariant."""
    m = ExchangeMachine()
    try:
        m.setup(workers=1, max_inflight=1, max_queue=4, spill=1 << 20, buffering=True)
        m.client_request(c=0, method=b"POST", body_len=5, chunked=False, expect=False, close=False, send="all")
        m.holds()
        m.worker_answers(i=0, status=200, framing="length", length=5, close=False)
        m.holds()
        [resp], err = m.clients[0].responses()
        assert err is None and resp.complete and resp.status == 200 and bytes(resp.body) == body_for("r1", 5)
    finally:
        m.teardown()


def test_a_response_head_held_by_corral_does_not_stop_a_retry():
    """Found by the machine: a worker killed from outside after its response head, before any body byte. corral
    holds a head until the first body byte, so nothing reached the client and the GET goes to the other worker."""
    state = ExchangeMachine()
    state.setup(buffering=True, spill=1048576, max_inflight=1, max_queue=4, workers=2)
    state.client_pipelines_two(c=0, second=b"GET")
    state.holds()
    state.worker_sends_head(close=False, first=0, framing="length", i=0, length=1, status=200)
    state.holds()
    state.worker_killed_from_outside(exit_seen_first=False, w=0)
    state.holds()
    state.teardown()
