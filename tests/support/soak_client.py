"""Client side of the soak and delivery tests: raw-socket HTTP/1.1 clients that misbehave on purpose, and
record exactly what they sent and what they received, so a test can judge corral by the client's view.

A Req is one request: its plan (what to send, how to send it, how to read the answer) and, once run, its
record (what arrived, how the connection ended, how long the client itself stalled). A Session is one
client connection carrying one or more Reqs, in turn (keep-alive) or all at once (pipelined).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from dataclasses import dataclass, field

from support.soak_worker import pattern

HANG = 30.0  # a socket that neither answers nor closes for this long: recorded as a hang
CONTINUE_WAIT = 2.0  # how long a client with Expect: 100-continue waits before sending anyway (curl: 1 s)


class Aborted(Exception):
    """The client aborted its own connection on purpose."""


@dataclass
class Req:
    rid: str
    method: str = "GET"
    path: str = "/cl"
    q: dict[str, str] = field(default_factory=dict)
    version: str = "1.1"
    close: bool = False  # send Connection: close (1.1) / omit keep-alive (1.0)
    upload: bytes | None = None
    chunked_upload: bool = False
    expect: bool = False
    send_mode: str = "whole"  # whole | trickle | stall | abort
    pieces: int = 1
    gap: float = 0.0
    stall: float = 0.0
    abort_upload_at: int = 0
    refusal: str | None = None  # too_big | too_big_sent | bad: a request corral must refuse itself
    read_mode: str = "normal"  # normal | slow | pause | abort
    pause_at: int = 0
    pause_s: float = 0.0
    abort_at: int = 0
    abort_rst: bool = True
    death: bool = False  # asks its worker to die, or to outlast request_timeout
    # --- the record -----------------------------------------------------------------------------------
    head_sent: bool = False
    body_sent: bool = False
    send_error: str = ""
    got_continue: bool = False
    waited_continue: float = 0.0
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    framing: str = ""  # cl | chunked | close | none
    declared: int | None = None
    complete: bool = False
    end: str = ""  # done | eof | reset | hang | aborted | unsent
    client_abort: bool = False  # the client itself aborted before it had the whole answer
    half_closed: bool = False
    behind_close: bool = False  # pipelined behind an answer that ended the connection
    max_gap: float = 0.0  # longest the client itself left its request body stalled
    paused: float = 0.0  # longest the client stopped reading mid-answer on purpose
    read_gap: float = 0.0  # longest between two reads of its answer, measured (pauses, slow reading, starvation)
    conn_gap: float = 0.0  # longest between two reads on its connection until its answer ended (pipelining:
    # an answer queued behind another is cut for a pause in reading the one before)
    prev_sent: float | None = None  # when the request before it on a kept connection was sent
    t_sent: float = 0.0
    t_done: float = 0.0

    @property
    def target(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.q.items())
        return f"{self.path}?{query}" if query else self.path

    @property
    def seed(self) -> int:
        return int(self.q.get("seed", "0"))

    def expected(self) -> bytes:
        if self.q.get("echo") == "1":
            return self.upload or b""
        return pattern(self.seed, int(self.q.get("n", "0")))

    @property
    def from_worker(self) -> bool:
        return "x-soak-seed" in self.headers

    @property
    def elapsed(self) -> float:
        return self.t_done - self.t_sent

    def head_bytes(self) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/{self.version}", "Host: soak", f"X-Request-Id: {self.rid}"]
        if self.version == "1.0":
            if not self.close:
                lines.append("Connection: keep-alive")
        elif self.close:
            lines.append("Connection: close")
        if self.refusal == "bad":
            lines += ["Content-Length: 5", "Transfer-Encoding: chunked"]  # CL + TE: a smuggling attempt
        elif self.refusal in ("too_big", "too_big_sent"):
            lines.append(f"Content-Length: {int(self.q['declare'])}")
        elif self.upload is not None:
            lines.append("Transfer-Encoding: chunked" if self.chunked_upload else f"Content-Length: {len(self.upload)}")
        if self.expect:
            lines.append("Expect: 100-continue")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def describe(self) -> str:
        got = (
            f"status={self.status} framing={self.framing} declared={self.declared} got={len(self.body)} "
            f"complete={self.complete}"
        )
        plan = (
            f"{self.method} {self.target} v{self.version} upload={len(self.upload) if self.upload else None}"
            f"{' chunked' if self.chunked_upload else ''}{' expect' if self.expect else ''} send={self.send_mode}"
            f" read={self.read_mode} refusal={self.refusal}"
        )
        names = ("client_abort", "half_closed", "behind_close", "got_continue", "death")
        flags = [n for n in names if getattr(self, n)]
        return (
            f"{self.rid}: {plan} | {got} end={self.end} send_error={self.send_error!r} flags={flags} "
            f"elapsed={self.elapsed:.2f}s max_gap={self.max_gap:.2f}s paused={self.paused:.2f}s "
            f"read_gap={self.read_gap:.2f}s conn_gap={self.conn_gap:.2f}s"
        )


@dataclass
class Session:
    index: int
    reqs: list[Req]
    pipelined: bool = False
    rcvbuf: int | None = None
    half_close: bool = False
    idle: float = 0.0  # pause between two requests on the kept connection


class Wire:
    """A socket and the bytes read from it but not yet parsed; the reading pace a slow reader wants."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.closed = ""  # eof | reset | hang, once the socket ended
        self.slow_until = 0.0
        self.req: Req | None = None  # whose answer is being read
        self.last_read = 0.0
        self.max_gap = 0.0  # over the whole connection

    def fill(self) -> bool:
        if self.closed:
            return False
        slow = time.monotonic() < self.slow_until
        if slow:
            time.sleep(0.01)
        if self.req is not None and self.last_read:
            gap = time.monotonic() - self.last_read
            self.req.read_gap = max(self.req.read_gap, gap)
            self.max_gap = max(self.max_gap, gap)
        try:
            data = self.sock.recv(2048 if slow else 262144)
            self.last_read = time.monotonic()
        except (ConnectionResetError, BrokenPipeError):
            self.closed = "reset"
            return False
        except TimeoutError:
            self.closed = "hang"
            return False
        except OSError as exc:
            self.closed = f"error {exc.errno}"
            return False
        if not data:
            self.closed = "eof"
            return False
        self.buf += data
        return True


def abort(sock: socket.socket, rst: bool) -> None:
    if rst:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_head(wire: Wire, req: Req) -> bool:
    """The next final response head (interim 1xx ones are recorded and skipped). False if none came."""
    while True:
        while b"\r\n\r\n" not in wire.buf:
            if not wire.fill():
                return False
        end = wire.buf.index(b"\r\n\r\n")
        raw = bytes(wire.buf[:end]).decode("latin-1")
        del wire.buf[: end + 4]
        first, *lines = raw.split("\r\n")
        status = int(first.split()[1])
        if 100 <= status < 200:
            req.got_continue = True
            continue
        req.status = status
        req.headers = {}
        for line in lines:
            k, _, v = line.partition(":")
            req.headers[k.strip().lower()] = v.strip()
        return True


def read_body(wire: Wire, req: Req) -> None:
    """The body of the response whose head was read, under the request's reading behaviour."""
    te = req.headers.get("transfer-encoding", "").lower()
    cl = req.headers.get("content-length")
    if req.method == "HEAD" or req.status in (204, 304):
        req.framing, req.complete = "none", True
        return
    if "chunked" in te:
        req.framing = "chunked"
        req.complete = _chunked(wire, req)
    elif cl is not None:
        req.framing, req.declared = "cl", int(cl)
        left = req.declared
        while left:
            if not wire.buf and not wire.fill():
                return
            take = min(left, len(wire.buf))
            _take(wire, req, take)
            left -= take
        req.complete = True
    else:
        req.framing = "close"
        while True:
            if wire.buf:
                _take(wire, req, len(wire.buf))
            if not wire.fill():
                break
        req.complete = wire.closed == "eof"


def _chunked(wire: Wire, req: Req) -> bool:
    while True:
        while b"\r\n" not in wire.buf:
            if not wire.fill():
                return False
        end = wire.buf.index(b"\r\n")
        size = int(bytes(wire.buf[:end]).split(b";")[0], 16)
        del wire.buf[: end + 2]
        if size == 0:
            while True:
                while b"\r\n" not in wire.buf:
                    if not wire.fill():
                        return False
                end = wire.buf.index(b"\r\n")
                del wire.buf[: end + 2]
                if end == 0:
                    return True
        left = size
        while left:
            if not wire.buf and not wire.fill():
                return False
            take = min(left, len(wire.buf))
            _take(wire, req, take)
            left -= take
        while len(wire.buf) < 2:
            if not wire.fill():
                return False
        del wire.buf[:2]


def _take(wire: Wire, req: Req, n: int) -> None:
    """Move n body bytes to the record, then act out the reading behaviour (pause, abort)."""
    before = len(req.body)
    req.body += wire.buf[:n]
    del wire.buf[:n]
    got = len(req.body)
    if req.read_mode == "pause" and before < req.pause_at <= got:
        t = time.monotonic()
        time.sleep(req.pause_s)
        req.paused = max(req.paused, time.monotonic() - t)
    elif req.read_mode == "abort" and before < req.abort_at <= got:
        del req.body[req.abort_at :]
        raise Aborted


def send_request(sock: socket.socket, wire: Wire, req: Req) -> None:
    """Send one request as planned; the record says how far it got. Raises Aborted for a planned abort."""
    req.t_sent = time.monotonic()
    try:
        sock.sendall(req.head_bytes())
    except OSError as exc:
        req.send_error = f"head: {exc!r}"
        return
    req.head_sent = True
    if req.refusal == "bad":
        _send(sock, req, b"0\r\n\r\n")
        return
    if req.refusal == "too_big":
        return  # Expect: 100-continue; corral must refuse before any byte of the body
    if req.refusal == "too_big_sent":
        _send(sock, req, b"x" * 1000)
        return
    if req.upload is None:
        req.body_sent = True
        return
    if req.expect:
        t = time.monotonic()
        ready, _, _ = select.select([sock], [], [], CONTINUE_WAIT)
        req.waited_continue = time.monotonic() - t
        if ready:
            if not wire.fill():
                return
            if wire.buf.startswith(b"HTTP/1.1 100") or wire.buf.startswith(b"HTTP/1.0 100"):
                while b"\r\n\r\n" not in wire.buf:
                    if not wire.fill():
                        return
                del wire.buf[: wire.buf.index(b"\r\n\r\n") + 4]
                req.got_continue = True
            else:
                return  # a final answer instead of 100 Continue: the body is not sent (RFC 9110 10.1.1)
    body = req.upload
    last = time.monotonic()

    def piece(data: bytes) -> bool:
        nonlocal last
        now = time.monotonic()
        req.max_gap = max(req.max_gap, now - last)
        out = (b"%x\r\n%s\r\n" % (len(data), data)) if req.chunked_upload and data else data
        if not _send(sock, req, out):
            return False
        last = time.monotonic()
        return True

    if req.send_mode == "abort":
        piece(body[: req.abort_upload_at])
        raise Aborted
    if req.send_mode == "stall":
        third = len(body) // 3
        if not piece(body[:third]):
            return
        time.sleep(req.stall)
        if not piece(body[third:]):
            return
    elif req.send_mode == "trickle":
        step = max(1, -(-len(body) // req.pieces))
        for i in range(0, len(body), step):
            if i:
                time.sleep(req.gap)
            if not piece(body[i : i + step]):
                return
    elif not piece(body):
        return
    if req.chunked_upload and not _send(sock, req, b"0\r\n\r\n"):
        return
    req.body_sent = True


def _send(sock: socket.socket, req: Req, data: bytes) -> bool:
    if not data:
        return True
    try:
        sock.sendall(data)
    except OSError as exc:
        req.send_error = f"body: {exc!r}"
        return False
    return True


def ends_connection(req: Req) -> bool:
    """Whether the answer to req leaves its connection unusable for the next request."""
    if not req.complete or req.status is None:
        return True
    if (req.upload is not None or req.refusal) and not req.body_sent:
        return True  # a body announced and not sent: the connection's framing is lost
    if req.headers.get("connection", "").lower() == "close" or req.framing == "close":
        return True
    return req.version == "1.0" and req.headers.get("connection", "").lower() != "keep-alive"


def run_session(port: int, sess: Session) -> None:
    """Run one client connection as planned; every Req's record is filled in (unsent ones: end='unsent')."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sess.rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sess.rcvbuf)
    sock.settimeout(HANG)
    for r in sess.reqs:
        r.end = "unsent"
    try:
        sock.connect(("127.0.0.1", port))
    except OSError as exc:
        sess.reqs[0].send_error = f"connect: {exc!r}"
        sock.close()
        return
    wire = Wire(sock)
    current: Req | None = None
    try:
        if sess.pipelined:
            for r in sess.reqs:
                r.t_sent = time.monotonic()
            raw = b"".join(r.head_bytes() + (r.upload or b"") for r in sess.reqs)
            try:
                sock.sendall(raw)
            except OSError as exc:
                sess.reqs[0].send_error = repr(exc)
            else:
                for r in sess.reqs:
                    r.head_sent = r.body_sent = True
            for i, r in enumerate(sess.reqs):
                current = r
                if i and ends_connection(sess.reqs[i - 1]):
                    r.behind_close = True
                _read(wire, r, continued=i > 0)
            current = None
            return
        for i, r in enumerate(sess.reqs):
            if i:
                if ends_connection(sess.reqs[i - 1]):
                    return
                if sess.idle:
                    time.sleep(sess.idle)
                r.prev_sent = sess.reqs[i - 1].t_sent
            current = r
            send_request(sock, wire, r)
            if not r.head_sent:
                r.end = "unsent"
                return
            if sess.half_close and i == len(sess.reqs) - 1:
                r.half_closed = True
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
            _read(wire, r)
        current = None
    except Aborted:
        assert current is not None
        current.end = "aborted"
        current.t_done = time.monotonic()
        for r in sess.reqs[sess.reqs.index(current) :]:
            r.client_abort = True  # this one, and any pipelined behind it: the client gave them up
        abort(sock, current.abort_rst)
        return
    finally:
        if sock.fileno() >= 0:
            sock.close()


def _read(wire: Wire, req: Req, continued: bool = False) -> None:
    """Read req's answer. continued: pipelined, the answer follows the previous one on the wire, so time spent
    not reading the previous one counts as not reading this one."""
    if req.read_mode == "slow":
        wire.slow_until = time.monotonic() + 0.5
    wire.req = req
    if not continued:
        wire.last_read = 0.0
    try:
        if read_head(wire, req):
            read_body(wire, req)
    finally:
        req.t_done = time.monotonic()
        req.conn_gap = wire.max_gap
        wire.slow_until = 0.0
    req.end = "done" if req.complete else (wire.closed or "eof")
