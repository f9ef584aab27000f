"""Addresses: ports, IP and loopback tests, the admin channel's address and its Host rule, and binding.

Written once here for the configuration, the server (ops/admin.py) and the CLI verbs (cli/verbs.py). No corral
imports: `corral status` loads this, not the server stack.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable

PORT_MAX = 65535
TOKEN_ENV = "CORRAL_ADMIN_TOKEN"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


class AddressError(ValueError):
    """An admin address that cannot be parsed; the message is one line for the operator, without the key's
    name (the caller knows whether it was `server.admin` or `--admin`)."""


def socket_dirs() -> list[str]:
    """Where default admin sockets live, in the order a client looks: runtime dir, then /tmp."""
    out = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        out.append(os.path.join(runtime, "corral"))
    out.append(f"/tmp/corral-{os.getuid()}")
    return out


def default_socket(port: int) -> str:
    return os.path.join(socket_dirs()[0], f"{port}.sock")


def parse_address(spec: str) -> tuple[str, str, int]:
    """`unix:/path` -> ("unix", path, 0); `HOST:PORT` / `[v6]:PORT` -> ("tcp", host, port)."""
    if spec.startswith("unix:") and len(spec) > len("unix:"):
        return "unix", spec[len("unix:") :], 0
    host, sep, port_s = spec.rpartition(":")
    host = host.strip("[]")
    if spec.startswith("unix:") or not sep or not host or not valid_port(port_s):
        raise AddressError(f"must be HOST:PORT with a port in 1..{PORT_MAX}, or unix:/path (got {spec!r})")
    return "tcp", host, int(port_s)


def valid_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 0 < int(text) <= PORT_MAX


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # As written: a bracketed IPv6 address is a URL's spelling, not an address to bind or connect to.
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_ip(host: str) -> bool:
    """An IP address literal as bind() and connect() take it (IPv6 without brackets), not a name."""
    return _ip(host) is not None


def is_loopback(host: str) -> bool:
    """Only this host can connect: localhost, 127.0.0.0/8, ::1."""
    addr = _ip(host)
    return host == "localhost" or (addr is not None and addr.is_loopback)


def reaches_loopback(host: str) -> bool:
    """A listener bound here also takes loopback connections: a loopback address, or every address."""
    addr = _ip(host)
    return is_loopback(host) or (addr is not None and addr.is_unspecified)


# --- the Host rule -------------------------------------------------------------------------------
# A page from attacker.example whose name is rebound to 127.0.0.1 reaches a loopback port as the
# same origin, but its requests still say `Host: attacker.example`: only names of this channel pass.
def host_names(host: str, port: int, extra: Iterable[str] = ()) -> frozenset[str]:
    """Host header values (lower case) that name a TCP admin channel bound to host:port.

    The loopback names and the bound host, each with or without `:port`; an `extra` entry without a
    port is accepted the same way, one with a port only as written."""
    bound = f"[{host}]" if ":" in host else host
    out: set[str] = set()
    for name in (*LOOPBACK_NAMES, bound, *extra):
        name = name.strip().lower()
        if not name:
            continue
        out.add(name)
        if not _has_port(name):
            out.add(f"{name}:{port}")
    return frozenset(out)


def _has_port(name: str) -> bool:
    tail = name.rpartition("]")[2] if name.startswith("[") else name
    return ":" in tail


def host_refusal(value: str | None, allowed: frozenset[str]) -> str | None:
    """Why a request with this Host header is not for this channel, or None when it is."""
    if value is None:
        return "Host header required"
    if value.strip().lower() in allowed:
        return None
    shown = value if len(value) <= 64 else value[:64] + "..."
    return f"Host {shown!r} does not name this admin channel (DNS rebinding guard; see docs/operations.md)"


def bind_tcp(host: str, port: int) -> socket.socket:
    """A bound TCP socket (IPv6 when the host is), SO_REUSEADDR set; OSError when the port is taken.

    Every listener corral opens (public, admin, health) binds through here, before any worker starts, so
    a busy port fails fast; the caller names the port and the option that moves it.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
