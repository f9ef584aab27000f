"""`--http-redirect PORT`: plain HTTP on a second port, every request answered with a 308 to https.

The request is read by the same edge as the public port (limits, strict parsing, header_timeout), then answered
at once: `308 Permanent Redirect` (method and body kept by the client, unlike 301) to the same host, path and
query on the TLS listener's port, and the connection is closed. No request reaches a worker from here.

The Location is built from the request's Host, so a Host that is not a plain DNS name or IP address gets 400:
a redirect is never made to whatever a client wrote there.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from typing import TYPE_CHECKING

from .. import edge

if TYPE_CHECKING:
    from ..config import ServerConfig

_LABEL = re.compile(rb"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_NAME_MAX = 253  # RFC 1035: a DNS name in text form, without the root's dot


def https_location(host: bytes, target: bytes, https_port: int) -> bytes | None:
    """`https://HOST[:PORT]TARGET` for this Host field and origin-form target, or None when the Host is not
    a DNS name, an IPv4 address or a bracketed IPv6 address (with an optional port, dropped: the TLS
    listener's port replaces it, and is left out when it is 443)."""
    if not target.startswith(b"/"):
        return None  # `OPTIONS *`: nothing to redirect to
    name = _host_name(host)
    if name is None:
        return None
    port = b"" if https_port == 443 else b":%d" % https_port
    return b"https://" + name + port + target


def _host_name(host: bytes) -> bytes | None:
    if host.startswith(b"["):
        literal, sep, rest = host[1:].partition(b"]")
        if not sep or (rest and not (rest.startswith(b":") and _port(rest[1:]))):
            return None
        if b"%" in literal:
            # A zone id: ipaddress takes any text after the %. The edge's Host rule keeps out the @ and ? that
            # would make `[::%@evil.org?]` userinfo and host evil.org to a browser, but a zone names an interface
            # of the client's machine, never ours: no redirect to it.
            return None
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except ValueError:
            return None
        return b"[" + literal + b"]"
    name, sep, port = host.partition(b":")
    if sep and not _port(port):
        return None
    if not name or len(name) > _NAME_MAX:
        return None
    if all(_LABEL.fullmatch(label) for label in name.split(b".")):
        return name.lower()
    return None


def _port(text: bytes) -> bool:
    return text.isdigit() and 0 < int(text) <= 65535


class Redirector:
    """The redirect listener: its connections and the limits they share with the public port."""

    def __init__(self, loop: asyncio.AbstractEventLoop, server: ServerConfig) -> None:
        self.loop = loop
        self.limits = edge.EdgeLimits(server.max_header_bytes, server.max_headers, server.max_body)
        self.header_timeout = server.header_timeout
        self.https_port = server.port
        self.max_connections = server.max_connections or 1024
        self.connections: set[RedirectConnection] = set()
        self.server: asyncio.AbstractServer | None = None

    async def start(self, sock: socket.socket) -> None:
        self.server = await self.loop.create_server(lambda: RedirectConnection(self), sock=sock, backlog=1024)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close()


class RedirectConnection(asyncio.Protocol):
    """One plain-HTTP client: one request read by the edge, one answer, then close."""

    def __init__(self, owner: Redirector) -> None:
        self.owner = owner
        self.reader = edge.RequestReader(self, owner.limits)
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.owner.connections) >= self.owner.max_connections:
            self.answer(edge.error_response(503, "too many connections", retry_after=1))
            return
        self.owner.connections.add(self)
        # One deadline from the accept: a redirect needs nothing but a head, so keep-alive idling has no place.
        self.timer = self.owner.loop.call_later(self.owner.header_timeout, self._late)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        try:
            self.reader.feed(data)
        except edge.EdgeError as exc:
            self.answer(edge.error_response(exc.status, exc.reason))

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def _late(self) -> None:
        self.answer(edge.error_response(408, "request head not received in time"))

    # --- the edge's callbacks: only the head matters ---------------------------------------------------
    def on_request(self, head: edge.RequestHead) -> None:
        location = https_location(head.host, head.target, self.owner.https_port)
        if location is None:
            self.answer(edge.error_response(400, "bad Host for a redirect to https"))
            return
        self.answer(
            b"HTTP/1.1 308 Permanent Redirect\r\nlocation: %s\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            % location
        )

    def on_request_body(self, data: bytes) -> None:
        pass

    def on_request_end(self) -> None:
        pass

    def on_tunnel_data(self, data: bytes) -> None:
        pass

    def answer(self, response: bytes) -> None:
        if self.answered or self.transport is None:
            return
        self.answered = True
        self.transport.write(response)
        self.close()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.transport.close()
