"""The byte tunnel a WebSocket session becomes after the worker's 101.

Both sockets keep their asyncio Protocols (proxy.ClientConnection, pool.UpstreamConnection); once an
exchange has switched, each hands its bytes to the tunnel instead of its parser. Back-pressure runs both
ways: a side whose write buffer is full stops the other side's reading, so a client that stops reading
costs at most one transport buffer, never unbounded memory. Closing either side, or `ws_idle_timeout`
without a byte, closes both, and `on_close` runs exactly once (the worker's session count goes down).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class End(Protocol):
    """One side of the tunnel: a connection that can be written, throttled and closed."""

    def write(self, data: bytes) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...


class Tunnel:
    __slots__ = ("client", "closed", "idle_timeout", "last", "on_close", "worker")

    def __init__(self, client: End, worker: End, idle_timeout: float, on_close: Callable[[], None]) -> None:
        self.client = client
        self.worker = worker
        self.idle_timeout = idle_timeout
        self.on_close = on_close
        self.last = time.monotonic()
        self.closed = False

    def from_client(self, data: bytes) -> None:
        self.last = time.monotonic()
        self.worker.write(data)

    def from_worker(self, data: bytes) -> None:
        self.last = time.monotonic()
        self.client.write(data)

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
        if now - self.last > self.idle_timeout:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.client.close()
        self.worker.close()
        self.on_close()
