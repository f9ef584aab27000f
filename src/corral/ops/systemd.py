"""systemd without a dependency: sd_notify over $NOTIFY_SOCKET, and sockets passed by socket activation.

sd_notify (man sd_notify(3)) is one datagram of `KEY=VALUE` lines to a unix socket; a name starting
with `@` is in the abstract namespace. corral sends READY=1, STATUS=, RELOADING=1, STOPPING=1 and
WATCHDOG=1 (server.py decides when). Socket activation (man sd_listen_fds(3)): systemd passes
listening sockets from fd 3 on, with LISTEN_FDS=N and LISTEN_PID=the pid they are meant for.

Both read their variables once and remove them from the environment, as sd_notify and
sd_listen_fds do with unset_environment: workers inherit corral's environment and must neither
talk to systemd as corral nor take corral's sockets for theirs.

No corral imports: the bottom layer.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

LISTEN_FDS_START = 3
NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class Notifier:
    """Sends sd_notify datagrams; does nothing when corral was not started with NOTIFY_SOCKET."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = _sockaddr(address) if address else None
        self.watchdog_usec = watchdog_usec
        self.failure: str | None = None  # the last send error, reported once by the caller
        self._sock: socket.socket | None = None

    @classmethod
    def from_environment(cls) -> Notifier:
        env = {k: os.environ.pop(k, None) for k in NOTIFY_VARS}
        address = env["NOTIFY_SOCKET"] or None
        if address is not None and not address.startswith(("/", "@")):
            address = None  # vsock: and other transports are not spoken here
        usec = _positive_int(env["WATCHDOG_USEC"])
        pid = _positive_int(env["WATCHDOG_PID"])
        if pid is not None and pid != os.getpid():
            usec = None  # the watchdog is another process's to feed
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """How often to send WATCHDOG=1: half the timeout, as sd_watchdog_enabled(3) advises."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2e6

    def send(self, *fields: str) -> bool:
        """One datagram of `KEY=VALUE` lines. Never raises and never blocks: False when it did not go."""
        if self.address is None or not fields:
            return False
        try:
            if self._sock is None:
                # Not inherited by workers: Python's sockets are close-on-exec already (SOCK_CLOEXEC is Linux's).
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)  # a full receive queue drops a status line, never stalls the loop
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            self.failure = f"{exc.strerror or exc}"
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def monotonic_usec() -> str:
    """MONOTONIC_USEC=, which systemd wants next to RELOADING=1 (CLOCK_MONOTONIC, as time.monotonic)."""
    return f"MONOTONIC_USEC={int(time.monotonic() * 1e6)}"


def _sockaddr(address: str) -> str:
    return "\0" + address[1:] if address.startswith("@") else address


def _positive_int(value: str | None) -> int | None:
    if value is None or not value.isdigit() or int(value) <= 0:
        return None
    return int(value)


class ActivationError(Exception):
    """LISTEN_FDS names descriptors that are not listening stream sockets; the message is one line."""


def listen_sockets() -> list[socket.socket]:
    """The sockets systemd passed to this process (none when LISTEN_PID names another one). Each is a
    listening stream socket, non-blocking and not inherited by workers. Clears the variables."""
    env = {k: os.environ.pop(k, None) for k in LISTEN_VARS}
    pid, n = _positive_int(env["LISTEN_PID"]), _positive_int(env["LISTEN_FDS"])
    if pid != os.getpid() or n is None:
        return []
    out = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + n):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"LISTEN_FDS={n}: descriptor {fd} is not a socket ({exc.strerror or exc})") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise ActivationError(
                f"LISTEN_FDS={n}: descriptor {fd} is not a listening stream socket "
                "(give the .socket unit ListenStream=)"
            )
        sock.set_inheritable(False)
        sock.setblocking(False)
        out.append(sock)
    return out


def describe(sock: socket.socket) -> tuple[str, int] | None:
    """(host, port) of an inherited TCP socket, None for a unix one."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    host, port = sock.getsockname()[:2]
    return str(host), int(port)
