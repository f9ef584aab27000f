"""The world around corral's data path, for tests/datapath/test_exchange_machine.py: a fake clock, an event loop with
timers on it, client and worker transports with asyncio's flow control, and the two peers' parsers.

Nothing here knows corral's internals: the machine drives the real ClientConnection / UpstreamConnection
through their asyncio Protocol callbacks and reads back what they wrote to these transports.

* Clock: patched in as the `time` module of every corral module (only monotonic() is fake), so timeouts
  fire when the machine moves the clock and never otherwise.
* FakeLoop: call_later/call_at/call_soon on the fake clock (fired in time order when the clock moves),
  create_task (run to their end by run_tasks), create_connection (a worker connection at once, or the next
  planned error for that port).
* ClientTransport: what corral wrote and the client has not read yet (`buf`), asyncio's write flow control
  (pause_writing past `high`; resume_writing when the client reads), close() that still delivers the buffer,
  abort() that drops it.
* UpstreamTransport: every byte corral wrote to a worker (`wire`), and from which offset the worker had
  closed its end (bytes past it never reached the worker).
* RequestParser / parse_responses: the worker's reading of forwarded requests, the client's of responses.
"""

from __future__ import annotations

import heapq
import itertools
import sys
import time as _real_time
from collections.abc import Callable
from typing import Any


# --- the clock ---------------------------------------------------------------------------------------
class Clock:
    """Stands in for the `time` module inside corral: monotonic() is the machine's clock, the rest is real."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(_real_time, name)


def patch_time(clock: Clock) -> list[Any]:
    """Every loaded corral module that imported `time` sees `clock` instead; returns what to restore."""
    patched = []
    for name, mod in list(sys.modules.items()):
        if name != "corral" and not name.startswith("corral."):
            continue
        current = getattr(mod, "time", None)
        if current is _real_time or isinstance(current, Clock):
            mod.time = clock
            patched.append(mod)
    return patched


def unpatch_time(patched: list[Any]) -> None:
    for mod in patched:
        mod.time = _real_time


class OrderedSet(set):  # type: ignore[type-arg]
    """A set that iterates in insertion order. corral iterates its sets of exchanges and connections (expire,
    check_timeouts); in id order, the same steps could run in another order on a re-run, and hypothesis
    would call the test flaky. Swapped in for pool.inflight and proxy.connections."""

    def __init__(self, items: Any = ()) -> None:
        super().__init__()
        self._order: dict[Any, None] = {}
        for item in items:
            self.add(item)

    def add(self, item: Any) -> None:
        super().add(item)
        self._order[item] = None

    def discard(self, item: Any) -> None:
        super().discard(item)
        self._order.pop(item, None)

    def remove(self, item: Any) -> None:
        super().remove(item)
        del self._order[item]

    def pop(self) -> Any:
        item = next(iter(self._order))
        self.remove(item)
        return item

    def clear(self) -> None:
        super().clear()
        self._order.clear()

    def copy(self) -> OrderedSet:
        return OrderedSet(self._order)

    def __iter__(self) -> Any:
        return iter(list(self._order))


# --- the event loop -----------------------------------------------------------------------------------
class Timer:
    __slots__ = ("_cancelled", "args", "callback", "due")

    def __init__(self, due: float, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.due = due
        self.callback = callback
        self.args = args
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled

    def when(self) -> float:
        return self.due


class FakeLoop:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self.tasks: list[Any] = []
        self.errors: dict[int, list[OSError]] = {}
        self.on_connection: Callable[[Any, UpstreamTransport], None] = lambda proto, t: None

    def time(self) -> float:
        return self.clock.now

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Timer:
        timer = Timer(when, callback, args)
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        return self.call_at(self.clock.now + max(0.0, delay), callback, *args)

    def call_soon(self, callback: Callable[..., object], *args: Any) -> Timer:
        return self.call_at(self.clock.now, callback, *args)

    def create_task(self, coro: Any) -> Any:
        self.tasks.append(coro)
        return coro

    async def create_connection(
        self, factory: Callable[[], Any], host: str | None = None, port: int | None = None, **kw: Any
    ) -> tuple[Any, Any]:
        planned = self.errors.get(port or 0)
        if planned:
            raise planned.pop(0)
        protocol = factory()
        transport = UpstreamTransport(protocol, (host, port))
        protocol.connection_made(transport)
        self.on_connection(protocol, transport)
        return transport, protocol

    def run_tasks(self) -> bool:
        ran = False
        while self.tasks:
            coro = self.tasks.pop(0)
            ran = True
            try:
                coro.send(None)
            except StopIteration:
                continue
            raise AssertionError("a task waited on something the fake loop does not provide")
        return ran

    def next_due(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].cancelled():
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def fire_next(self) -> None:
        _, _, timer = heapq.heappop(self._heap)
        timer.callback(*timer.args)


# --- transports ----------------------------------------------------------------------------------------
class _Transport:
    """What both fake transports share: reading on and off, writelines, the peer's address."""

    reading: bool
    peer: Any

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default


class ClientTransport(_Transport):
    """corral's side of a client socket, with asyncio's write flow control (pause past `high`, resume when the
    client has read it all), close() that flushes and abort() that drops. Writes after close go to `late`."""

    def __init__(
        self,
        protocol: Any,
        peer: tuple[str, int],
        clock: Clock,
        on_write: Callable[[bytes], None],
        on_abort: Callable[[], None],
    ) -> None:
        self.protocol = protocol
        self.peer = peer
        self.clock = clock
        self.on_write = on_write
        self.on_abort = on_abort
        self.buf = bytearray()  # written, not yet read by the client
        self.late: list[bytes] = []
        self.reading = True
        self.closed = False
        self.closed_at: float | None = None
        self.aborted = False
        self.lost = False
        self.high: int | None = None
        self.writing_paused = False
        self.stall_since: float | None = None  # the client has not read anything since (bytes pending)

    # asyncio.Transport
    def write(self, data: bytes) -> None:
        if self.closed:
            self.late.append(bytes(data))
            return
        if not data:
            return
        if not self.buf:
            self.stall_since = self.clock.now
        self.buf += data
        self.on_write(bytes(data))
        self._maybe_pause()

    def _maybe_pause(self) -> None:
        if self.high is not None and not self.writing_paused and not self.lost and len(self.buf) > self.high:
            self.writing_paused = True
            self.protocol.pause_writing()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.closed_at = self.clock.now

    def abort(self) -> None:
        if not self.aborted:
            self.on_abort()
        self.close()
        self.aborted = True
        self.buf.clear()  # never reaches the client

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return len(self.buf)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        high = self.high or 0
        return high // 4, high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high
        self._maybe_pause()  # as asyncio does: a buffer already past the new mark pauses the protocol now

    # the client's side
    def take(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        if data:
            self.stall_since = None
        if self.writing_paused and not self.lost:
            self.writing_paused = False
            self.protocol.resume_writing()
        return data

    def lose(self, exc: Exception | None = None) -> None:
        self.closed = True
        if self.closed_at is None:
            self.closed_at = self.clock.now
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(exc)


class UpstreamTransport(_Transport):
    """corral's side of a worker socket. `wire` is everything corral wrote; bytes from `peer_closed_at` on were
    written after the worker had closed its end and never reached it."""

    def __init__(self, protocol: Any, peer: tuple[Any, Any]) -> None:
        self.protocol = protocol
        self.peer = peer
        self.wire = bytearray()
        self.on_write: Callable[[], None] = lambda: None  # the worker reads as soon as corral writes
        self.late: list[bytes] = []
        self.peer_closed_at: int | None = None
        self.reading = True
        self.closed = False
        self.lost = False

    def write(self, data: bytes) -> None:
        if self.closed:
            self.late.append(bytes(data))
            return
        self.wire += data
        self.on_write()

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def peer_close(self) -> None:
        if self.peer_closed_at is None:
            self.peer_closed_at = len(self.wire)

    def lose(self, exc: Exception | None = None) -> None:
        self.closed = True
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(exc)


# --- the worker reads requests --------------------------------------------------------------------------
class Malformed(Exception):
    pass


class RequestParser:
    """What a worker makes of the bytes corral sends it: ('head', offset, method, target, headers),
    ('body', offset, data), ('end', offset) events, parsed from `pos` on each time parse() is called."""

    def __init__(self) -> None:
        self.pos = 0
        self.state = "head"
        self.remaining = 0

    def parse(self, wire: bytes | bytearray) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        n = len(wire)
        while self.pos < n:
            pos = self.pos
            if self.state == "head":
                end = wire.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                lines = bytes(wire[pos:end]).split(b"\r\n")
                parts = lines[0].split(b" ")
                if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                    raise Malformed(f"request line {lines[0]!r}")
                headers: dict[bytes, bytes] = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(b":")
                    if not sep:
                        raise Malformed(f"header line {line!r}")
                    headers[name.strip().lower()] = value.strip()
                self.pos = end + 4
                out.append(("head", pos, parts[0], parts[1], headers))
                if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                    self.state = "chunked"
                elif int(headers.get(b"content-length", b"0") or 0) > 0:
                    self.state, self.remaining = "fixed", int(headers[b"content-length"])
                else:
                    out.append(("end", self.pos))
            elif self.state == "fixed":
                take = min(self.remaining, n - pos)
                out.append(("body", pos, bytes(wire[pos : pos + take])))
                self.pos += take
                self.remaining -= take
                if not self.remaining:
                    self.state = "head"
                    out.append(("end", self.pos))
            else:  # chunked: whole chunks only
                eol = wire.find(b"\r\n", pos)
                if eol < 0:
                    break
                try:
                    size = int(bytes(wire[pos:eol]).split(b";")[0], 16)
                except ValueError:
                    raise Malformed(f"chunk size line {bytes(wire[pos:eol])!r}") from None
                if size == 0:
                    if n < eol + 4:
                        break
                    if wire[eol + 2 : eol + 4] != b"\r\n":
                        raise Malformed("trailers or junk after the last chunk")
                    self.pos = eol + 4
                    self.state = "head"
                    out.append(("end", self.pos))
                else:
                    if n < eol + 2 + size + 2:
                        break
                    if wire[eol + 2 + size : eol + 4 + size] != b"\r\n":
                        raise Malformed("chunk not followed by CRLF")
                    out.append(("body", pos, bytes(wire[eol + 2 : eol + 2 + size])))
                    self.pos = eol + 4 + size
        return out


# --- the client reads responses ---------------------------------------------------------------------------
class Resp:
    """One response as the client has it so far."""

    __slots__ = ("body", "closes", "complete", "headers", "interim", "start", "status")

    def __init__(self, start: int) -> None:
        self.start = start
        self.interim: list[int] = []
        self.status: int | None = None  # None: its head is not complete yet
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.complete = False
        self.closes = False  # it announced (or its framing means) that the connection closes after it

    def __repr__(self) -> str:
        state = "complete" if self.complete else "partial"
        return f"<Resp {self.status} {state} body={bytes(self.body[:40])!r}{'...' if len(self.body) > 40 else ''}>"


def parse_responses(data: bytes, methods: list[bytes], eof: bool) -> tuple[list[Resp], str | None]:
    """The client's reading of `data`: responses in order, one per request (methods[i] is request i's
    method: a HEAD answer has no body). Returns (responses, what is wrong with the bytes or None)."""
    out: list[Resp] = []
    pos, n, i = 0, len(data), 0
    while pos < n:
        if i >= len(methods):
            extra = data[pos : pos + 60]
            return out, f"{n - pos} response bytes after the answers to all {len(methods)} requests: {extra!r}"
        r = Resp(pos)
        out.append(r)
        while True:
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                return out, None
            lines = data[pos:end].split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                return out, f"malformed status line {lines[0][:80]!r}"
            status = int(parts[1])
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            pos = end + 4
            if 100 <= status < 200:
                r.interim.append(status)
                if pos >= n:
                    return out, None
                continue
            break
        r.status, r.headers = status, headers
        r.closes = b"close" in headers.get(b"connection", b"").lower()
        if methods[i] == b"HEAD" or status in (204, 304):
            r.complete = True
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    pos = n
                    break
                try:
                    size = int(data[pos:eol].split(b";")[0], 16)
                except ValueError:
                    return out, f"malformed chunk size line {data[pos:eol][:40]!r}"
                if size == 0:
                    if n >= eol + 4:
                        if data[eol + 2 : eol + 4] != b"\r\n":
                            return out, "trailers or junk after the last chunk"
                        r.complete = True
                        pos = eol + 4
                    else:
                        pos = n
                    break
                r.body += data[eol + 2 : min(n, eol + 2 + size)]
                if n < eol + 4 + size:
                    pos = n
                    break
                if data[eol + 2 + size : eol + 4 + size] != b"\r\n":
                    return out, "chunk not followed by CRLF"
                pos = eol + 4 + size
        elif b"content-length" in headers:
            length = int(headers[b"content-length"])
            take = data[pos : pos + length]
            r.body += take
            pos += len(take)
            r.complete = len(take) == length
        else:
            r.body += data[pos:]
            pos = n
            r.complete = eof
            r.closes = True
        if not r.complete:
            return out, None
        i += 1
    return out, None
