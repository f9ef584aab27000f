"""The byte tunnel a WebSocket session becomes after the worker's 101.

Both sockets keep their asyncio Protocols (client.ClientConnection, upstream.UpstreamConnection); once an
exchange has switched, each hands its bytes to the tunnel instead of its parser. Back-pressure runs both
ways: a side whose write buffer is full stops the other side's reading, so a client that stops reading
costs at most one transport buffer, never unbounded memory (and past send_timeout, the client connection
is cut: client.ClientConnection.check_timeouts). Closing either side, or `ws_idle_timeout` without a byte,
closes both, and `on_close` runs exactly once (the worker's session count goes down).

The bytes stay opaque except for the WebSocket frame headers (RFC 6455 5.2) in the worker-to-client
direction, which `Frames` follows without copying payloads, for two things:

* the session's name: Shiny's first message to the browser is `{"config":{..., "sessionId":"<id>", ...}}`,
  and the session's HTTP requests name it (`session/<id>/download/...`, `.../upload/...`). The first few
  frames are read for it (LEARN_FRAMES, LEARN_BYTES: then never again) and the worker side is told
  (`session_named`), so the pool can send those requests to the process holding the session;
* a clean goodbye: `go_away()` (corral is stopping) sends the client a close frame with status 1001 (Going
  Away) at the end of the frame under way, never inside one, and closes the worker side; a worker that
  goes away without a close frame of its own (stopped past graceful_timeout on a reload, or crashed)
  leaves the client one too (`worker_gone`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Protocol

LEARN_FRAMES = 4  # the worker's first frames looked at for a session id (Shiny's config message is its first)
LEARN_BYTES = 16 * 1024  # ... and no more bytes than this, whatever the frames
GO_AWAY_GRACE = 1.0  # seconds a going-away tunnel waits for the worker to finish the frame it is sending
CLOSE_GOING_AWAY = b"\x88\x02\x03\xe9"  # FIN + close opcode, 2 payload bytes: status 1001, unmasked (server side)
_TEXT, _CLOSE = 0x1, 0x8


class End(Protocol):
    """One side of the tunnel: a connection that can be written, throttled and closed."""

    def write(self, data: bytes) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...


class WorkerEnd(End, Protocol):
    """The worker side (upstream.UpstreamConnection): it also hears the session's name, when the name is gone, and
    why the session was cut if its client failed it."""

    def session_named(self, session_id: str) -> None: ...
    def session_unnamed(self, session_id: str) -> None: ...
    def session_cut(self, why: str) -> None: ...


class Frames:
    """Where the WebSocket frames begin and end in a byte stream from a server (RFC 6455 5.2).

    Headers are parsed; payloads are counted, not copied, except those of the first text frames while
    a session id is looked for (`found` is set once one is)."""

    __slots__ = ("capture", "closing", "count", "found", "head", "learning", "left", "payload", "seen")

    def __init__(self) -> None:
        self.head = b""  # a frame header split across reads
        self.left = 0  # payload bytes of the frame under way still to come
        self.learning = True  # still looking for the session id
        self.count = 0  # frames begun
        self.seen = 0  # bytes looked at while learning
        self.capture = False  # the frame under way is a candidate: its payload is kept
        self.payload = bytearray()
        self.found: str | None = None
        self.closing = False  # a close frame went by: the server began the closing handshake

    def at_boundary(self) -> bool:
        return not self.left and not self.head

    def feed(self, data: bytes, upto_boundary: bool = False) -> int:
        """Follow `data`; returns how many of its bytes were taken: all, or with `upto_boundary`, those up
        to the end of the frame under way (0 when no frame is under way)."""
        i, n = 0, len(data)
        if self.learning:
            self.seen += n
        while i < n:
            if self.left:
                take = min(self.left, n - i)
                if self.capture:
                    self.payload += data[i : i + take]
                self.left -= take
                i += take
                if not self.left:
                    self._frame_end()
                continue
            if upto_boundary and not self.head:
                return i
            i = self._header(data, i)
        if self.learning and self.seen > LEARN_BYTES:
            self._stop_learning()
        return i

    def _header(self, data: bytes, i: int) -> int:
        """Read a frame header that starts in `self.head` + data[i:]; returns the index after what it took."""
        had = len(self.head)
        buf = self.head + data[i : i + 14 - had] if had else data[i : i + 14]
        size = 2
        if len(buf) >= 2:
            length = buf[1] & 0x7F
            size += (2 if length == 126 else 8 if length == 127 else 0) + (4 if buf[1] & 0x80 else 0)
        if len(buf) < size:
            self.head = bytes(buf)
            return len(data)  # all of it was a partial header
        self.head = b""
        length = buf[1] & 0x7F
        if length == 126:
            length = int.from_bytes(buf[2:4], "big")
        elif length == 127:
            length = int.from_bytes(buf[2:10], "big")
        self.count += 1
        first = buf[0]
        if first & 0x0F == _CLOSE:
            self.closing = True
        # Shiny's message is one unmasked, uncompressed (RSV1 clear), unfragmented (FIN) text frame.
        self.capture = (
            self.learning and (first & 0xCF) == (0x80 | _TEXT) and not (buf[1] & 0x80) and length <= LEARN_BYTES
        )
        self.left = length
        if not length:
            self._frame_end()
        return i + size - had

    def _frame_end(self) -> None:
        if self.capture:
            self.capture = False
            self.found = session_id(bytes(self.payload))
            self.payload.clear()
            if self.found is not None:
                self._stop_learning()
                return
        if self.learning and self.count >= LEARN_FRAMES:
            self._stop_learning()

    def _stop_learning(self) -> None:
        self.learning = False
        self.capture = False
        self.payload = bytearray()


def session_id(message: bytes) -> str | None:
    """The session id in Shiny's config message (`{"config":{"workerId":"","sessionId":"<id>","user":null}}`)."""
    if not message.startswith(b'{"config"'):
        return None
    try:
        doc = json.loads(message)
    except ValueError:
        return None
    config = doc.get("config") if isinstance(doc, dict) else None
    sid = config.get("sessionId") if isinstance(config, dict) else None
    if isinstance(sid, str) and 0 < len(sid) <= 128 and sid.isascii() and sid.replace("-", "").isalnum():
        return sid
    return None


class Tunnel:
    __slots__ = ("client", "closed", "frames", "going", "idle_timeout", "last", "on_close", "session_id", "worker")

    def __init__(self, client: End, worker: WorkerEnd, idle_timeout: float, on_close: Callable[[], None]) -> None:
        self.client = client
        self.worker = worker
        self.idle_timeout = idle_timeout
        self.on_close = on_close
        self.last = time.monotonic()
        self.closed = False
        self.frames = Frames()
        self.going: float | None = None  # when go_away() was called
        self.session_id: str | None = None  # the worker's name for the session, once learned

    def from_client(self, data: bytes) -> None:
        if self.going is not None:
            return  # the worker side is closing: what the client sends now reaches no one
        self.last = time.monotonic()
        self.worker.write(data)

    def from_worker(self, data: bytes) -> None:
        if self.closed:
            return
        self.last = time.monotonic()
        frames = self.frames
        if self.going is not None:
            # Going away: the rest of the frame under way, then the close frame; nothing after it.
            taken = frames.feed(data, upto_boundary=True)
            if taken:
                self.client.write(data[:taken] if taken < len(data) else data)
            if frames.at_boundary():
                self._say_going_away()
            return
        frames.feed(data)
        self.client.write(data)
        if frames.found is not None and self.session_id is None:
            self.session_id = frames.found
            self.worker.session_named(frames.found)

    # A side that cannot take more stops the other from reading (its transport stays bounded).
    def client_full(self) -> None:
        self.worker.pause_reading()

    def client_drained(self) -> None:
        self.worker.resume_reading()

    def worker_full(self) -> None:
        self.client.pause_reading()

    def worker_drained(self) -> None:
        self.client.resume_reading()

    def check_idle(self, now: float) -> None:
        if self.going is not None:
            if now - self.going > GO_AWAY_GRACE:
                self.close()  # the worker never finished its frame: a bare close is all that is left
        elif now - self.last > self.idle_timeout:
            self.close()

    def go_away(self) -> None:
        """Close the session because corral is going away: the client gets a close frame (1001) as soon as
        no frame of the worker's is under way, and the worker side is closed."""
        if self.closed or self.going is not None:
            return
        self.going = time.monotonic()
        if self.frames.at_boundary():
            self._say_going_away()
        # else from_worker says it at the end of the frame (check_idle closes anyway past GO_AWAY_GRACE)

    def _say_going_away(self) -> None:
        if not self.frames.closing:  # one close frame per direction: the worker's own one already went
            self.client.write(CLOSE_GOING_AWAY)
        self.close()

    def worker_gone(self) -> None:
        """The worker side closed (the worker stopped: a reload or scale-down past graceful_timeout, a crash).
        A worker that said no goodbye of its own leaves the client a close frame (1001) rather than a bare
        close, when no frame of its was cut short."""
        if not self.closed and self.frames.at_boundary():
            self._say_going_away()
        self.close()

    def cut(self, why: str) -> None:
        """The tunnel was closed because its client failed it (send_timeout): counted with the app's cuts."""
        self.worker.session_cut(why)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.client.close()
        self.worker.close()
        if self.session_id is not None:
            self.worker.session_unnamed(self.session_id)
        self.on_close()
