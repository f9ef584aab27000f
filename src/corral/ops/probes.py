"""Health endpoints for what stands in front of corral: an outer load balancer, Kubernetes.

    GET /livez    200 while corral's event loop runs (it is this loop that answers)
    GET /readyz   200 while every app has at least `ready_min` ready workers and corral is not
                  stopping; 503 otherwise, from the first moment of a stop (SIGTERM, `corral stop`),
                  so an outer balancer stops sending before corral stops accepting. An app scaled to
                  zero (min_workers 0) counts as ready without a worker, and so does one starting from
                  zero, until such a start fails: then it is not ready until a worker is. A probe reads
                  a snapshot only: it never starts a worker, nor keeps one awake

`--health-listen HOST:PORT` serves them on a listener of their own: no token, no data (a fixed word
as the body), nothing else (404), one request per connection. It is its own asyncio server, apart
from the public port: a probe never waits in the central queue, however long that queue is, and it
never reads more than a request head. The admin channel answers the same two paths (`answer`).
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING, Protocol

from .. import edge, net
from . import snapshot

if TYPE_CHECKING:
    from ..config import Config

PATHS = ("/livez", "/readyz")
MAX_HEAD = 8192  # a probe is a request line and a few headers
READ_TIMEOUT = 5.0  # a connection that has not sent its request head by then is closed
MAX_CONNECTIONS = 128  # open probe connections; beyond, new ones are closed at once


class ProbeError(Exception):
    """The health listener cannot be opened as asked; the message is one line for the operator."""


class Watched(snapshot.Fleet, Protocol):
    """What the probes read of a running corral (server.Corral, which sits above and is not imported)."""

    cfg: Config
    draining: bool  # set the moment a stop begins, before the shutdown delay


def readiness(corral: Watched) -> tuple[bool, str]:
    """(ready, the word for the body). Ready: not stopping, and every app has ready_min workers in rotation,
    or is idle at zero (or starting from it, and no start of it has failed since)."""
    if corral.draining:
        return False, "draining"
    need = corral.cfg.server.ready_min
    for app in snapshot.take(corral, time.monotonic(), routes=0).apps:
        if app.ready < need and not (app.zero is not None and app.zero.idle):
            return False, "not ready"
    return True, "ready"


def answer(path: str, corral: Watched) -> tuple[int, bytes]:
    """(status, body) for GET /livez or /readyz: the one rule for the health listener and the admin channel."""
    if path == "/livez":
        return 200, b"ok\n"
    ok, word = readiness(corral)
    return (200 if ok else 503), word.encode() + b"\n"


def response(status: int, body: bytes, head_only: bool = False, extra: bytes = b"") -> bytes:
    return edge.answer(status, body, headers=b"cache-control: no-store\r\n" + extra, head_only=head_only)


def route(line: bytes, corral: Watched) -> bytes:
    """The whole response to one request, from its request line (the headers do not matter here)."""
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0].isalpha():
        return response(400, b"bad request\n")
    method, target = parts[0], parts[1]
    path = target.split(b"?", 1)[0].decode("latin-1")
    if path not in PATHS:
        return response(404, b"not found\n", method == b"HEAD")
    if method not in (b"GET", b"HEAD"):
        return response(405, b"method not allowed\n", extra=b"Allow: GET, HEAD\r\n")
    status, body = answer(path, corral)
    return response(status, body, method == b"HEAD")


def parse_listen(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    return host.strip("[]"), int(port)


def bind(host: str, port: int) -> socket.socket:
    try:
        return net.bind_tcp(host, port)
    except OSError as exc:
        raise ProbeError(
            f"health listener {host}:{port} is not available ({exc.strerror or exc}); choose another with "
            "--health-listen"
        ) from None


class HealthListener:
    """Bound in preflight (a busy port fails before any worker starts), served from the start of run()
    (so /livez answers while workers boot), closed last, after the drain (so /livez holds through it)."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.corral: Watched | None = None
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[ProbeConnection] = set()

    @classmethod
    def prepare(cls, cfg: Config) -> HealthListener | None:
        spec = cfg.server.health_listen
        if spec is None:
            return None
        host, port = parse_listen(spec)
        return cls(bind(host, port), spec)

    async def start(self, corral: Watched) -> None:
        self.corral = corral
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.server = await asyncio.get_running_loop().create_server(lambda: ProbeConnection(self), sock=self.sock)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        else:
            self.sock.close()
        for conn in list(self.connections):
            conn.close()


class ProbeConnection(asyncio.Protocol):
    """One probe: read a request head, answer, close."""

    def __init__(self, listener: HealthListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.listener.connections) >= MAX_CONNECTIONS:
            self.done = True
            transport.abort()  # type: ignore[attr-defined]
            return
        self.listener.connections.add(self)
        self.timer = asyncio.get_running_loop().call_later(READ_TIMEOUT, self.close)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buf += data
        end = self.buf.replace(b"\r\n", b"\n").find(b"\n\n")  # tolerant of bare LF line ends
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self._send(response(400, b"request too large\n"))
            return
        assert self.listener.corral is not None
        self._send(route(bytes(self.buf).replace(b"\r\n", b"\n").split(b"\n", 1)[0], self.listener.corral))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.listener.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def _send(self, data: bytes) -> None:
        self.done = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
        self.close()

    def close(self) -> None:
        self.done = True
        if self.transport is not None:
            self.transport.close()
