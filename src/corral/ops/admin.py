"""The admin channel: who may ask a running corral about itself or tell it what to do, and how.

It listens on a unix socket by default (one per public port, in a 0700 directory of the user's),
or on `--admin HOST:PORT`; never on the public port. A TCP address other than loopback needs
`--admin-token`, and then every call carries `Authorization: Bearer TOKEN`; without a token, a TCP
channel answers only requests whose Host names it (net.host_names), which defeats DNS rebinding. It is not the hot
path: one asyncio Protocol per connection, httptools for parsing, answers built in memory.

This module is the channel: binding, who may ask (token, Host rule, Origin), connection limits and
deadlines, HTTP/1.1 framing. What each endpoint answers (/status, /metrics, /reload, /scale, /stop,
/logs, the dashboard...) is routes.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import socket
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

import httptools

from .. import edge
from ..net import (
    TOKEN_ENV,
    AddressError,
    bind_tcp,
    default_socket,
    host_names,
    host_refusal,
    is_loopback,
    parse_address,
)
from . import routes
from .routes import ROUTES, Answer, Corral, json_answer

if TYPE_CHECKING:
    from ..config import Config

MAX_REQUEST = 64 * 1024  # an admin request is a line and a few headers
IDLE_CLOSE = 60.0  # keep-alive connections (the dashboard polls) are closed after this long idle between requests


class AdminError(Exception):
    """The admin channel cannot be opened as asked; the message is one line for the operator."""


# --- binding -------------------------------------------------------------------------------------
def _private_dir(path: str) -> None:
    """Create the socket directory 0700, and refuse one that someone else could have planted."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise AdminError(f"admin socket directory {path} is not a private directory of this user; remove it")


def _bind_unix(path: str) -> socket.socket:
    if len(path.encode()) > 100:
        raise AdminError(f"admin socket path {path} is too long for a unix socket; give a shorter --admin unix:PATH")
    if os.path.exists(path):
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # left behind by a corral that died
            else:
                raise AdminError(f"admin socket {path} is in use by another corral; give another with --admin")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise AdminError(f"admin socket {path} cannot be created ({exc.strerror or exc})") from None
    os.chmod(path, 0o600)
    return sock


def _bind_tcp(host: str, port: int) -> socket.socket:
    try:
        return bind_tcp(host, port)
    except OSError as exc:
        raise AdminError(
            f"admin address {host}:{port} is not available ({exc.strerror or exc}); choose another with --admin"
        ) from None


# --- the server ----------------------------------------------------------------------------------
class AdminServer:
    """Bound in preflight (so a bad or busy address fails before any worker starts), served in run()."""

    def __init__(
        self,
        cfg: Config,
        sock: socket.socket,
        address: str,
        path: str | None,
        token: str | None,
        hosts: frozenset[str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.sock = sock
        self.address = address
        self.path = path
        self.token = token
        self.hosts = hosts  # Host values accepted; None: no Host rule (unix socket, or the token guards)
        self.tcp = path is None
        self.endpoints: routes.Routes | None = None  # made in start(): what each endpoint answers
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[AdminConnection] = set()
        # Each connection is a descriptor the public port may need: at most this many, and each owes its
        # request within header_timeout (bytes do not extend it), so trickling clients cannot hold them.
        self.max_connections = cfg.server.admin_max_connections
        self.request_timeout = cfg.server.header_timeout
        too_many = f"too many admin connections (admin_max_connections {self.max_connections})"
        self.busy = response(503, json_answer(503, {"error": too_many})[1], "application/json", keep_alive=False)
        self._sampler: asyncio.Task[None] | None = None

    @classmethod
    def prepare(cls, cfg: Config) -> AdminServer:
        server = cfg.server
        token = server.admin_token or os.environ.get(TOKEN_ENV) or None
        spec = server.admin or f"unix:{default_socket(server.port)}"
        try:
            kind, host, port = parse_address(spec)
        except AddressError as exc:
            raise AdminError(f"admin: {exc}") from None
        if kind == "unix":
            if server.admin is None:
                _private_dir(os.path.dirname(host))
            sock = _bind_unix(host)
            return cls(cfg, sock, f"unix:{host}", host, token)
        if port == server.port:
            raise AdminError(f"admin address {spec}: the admin channel is never served on the public port {port}")
        if not is_loopback(host) and not token:
            raise AdminError(
                f"admin address {spec} is reachable from other machines: set --admin-token TOKEN "
                f"(or ${TOKEN_ENV}) or bind it to 127.0.0.1 or unix:/path"
            )
        sock = _bind_tcp(host, port)
        # A browser cannot attach the token, so with one a rebound page gets nowhere whatever its Host;
        # without one (loopback only) the Host header is what tells a rebound page from the operator's.
        hosts = None if token else host_names(host, port, server.admin_hosts)
        return cls(cfg, sock, f"{host}:{port}" if ":" not in host else f"[{host}]:{port}", None, token, hosts)

    def unlink_socket(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def start(self, corral: Corral) -> None:
        loop = asyncio.get_running_loop()
        self.endpoints = routes.Routes(corral, self.address)
        self.sock.listen(64)
        self.sock.setblocking(False)
        if self.tcp:
            self.server = await loop.create_server(lambda: AdminConnection(self), sock=self.sock)
        else:
            self.server = await loop.create_unix_server(lambda: AdminConnection(self), sock=self.sock)
        self._sampler = loop.create_task(self.endpoints.series.run())

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close()
        self.unlink_socket()

    # --- requests ---------------------------------------------------------------------------
    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self.token is None:
            return True
        given = headers.get(b"authorization", b"")
        return hmac.compare_digest(given, b"Bearer " + self.token.encode())

    def handle(self, method: str, path: str, query: str, headers: dict[bytes, bytes]) -> Answer:
        """(status, body, content type) for one request."""
        misdirected = self._misdirected(headers.get(b"host"))
        if misdirected:
            return misdirected
        wrong = routes.unrouted(method, path)
        if wrong:
            return wrong
        if path not in routes.OPEN:
            if not self.authorized(headers):
                return json_answer(401, {"error": "admin token required: Authorization: Bearer TOKEN"})
            if self.tcp and method == "POST" and _cross_site(headers):
                return json_answer(403, {"error": "cross-site request refused"})
        assert self.endpoints is not None
        return self.endpoints.answer(path, query)

    def _misdirected(self, host: bytes | None) -> Answer | None:
        """The Host rule: refused before anything else, so a rebound page learns and changes nothing."""
        if self.hosts is None:
            return None
        refused = host_refusal(None if host is None else host.decode("latin-1"), self.hosts)
        if refused is None:
            return None
        return json_answer(400 if host is None else 421, {"error": refused})  # RFC 9112: no Host at all is a 400


def _cross_site(headers: dict[bytes, bytes]) -> bool:
    """A browser POST from another site carries its Origin: such a page must not reload or stop us."""
    origin = headers.get(b"origin")
    if origin is None:
        return False  # not a browser (corral's CLI, curl)
    host = headers.get(b"host", b"")
    return origin.split(b"://", 1)[-1] != host


SECURITY_HEADERS = (
    b"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
    b"Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    b"connect-src 'self'; img-src data:\r\n"
)


def response(
    status: int, body: bytes, ctype: str, keep_alive: bool, extra: bytes = b"", head_only: bool = False
) -> bytes:
    """`head_only`: the answer to a HEAD request, its Content-Length and no body (a body would be read as the
    start of the next response on a kept connection)."""
    connection = b"keep-alive" if keep_alive else b"close"
    return edge.answer(status, body, ctype.encode(), connection, SECURITY_HEADERS + extra, head_only)


class AdminConnection(asyncio.Protocol):
    """One admin client. Requests are answered in order as each completes (answers are immediate).

    A connection beyond admin_max_connections gets a short 503 and is closed at once, unread. A request
    must arrive whole within header_timeout of the connection's accept (or, kept alive, of its own first
    byte): further bytes do not extend that deadline. Between requests a connection may idle IDLE_CLOSE.
    """

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.size = 0
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._awaiting = False  # a request is due: its deadline runs

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.server.connections) >= self.server.max_connections:
            self.close(self.server.busy)  # over the cap: its descriptor goes back now, nothing is read
            return
        self.server.connections.add(self)
        self._expect_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()

    def _set_timer(self, delay: float, then: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, then)

    def _expect_request(self) -> None:
        """Start the request deadline, once per request: bytes never re-arm it."""
        if not self._awaiting:
            self._awaiting = True
            self._set_timer(self.server.request_timeout, self._too_slow)

    def _between_requests(self) -> None:
        self._awaiting = False
        self._set_timer(IDLE_CLOSE, self.close)

    def _too_slow(self) -> None:
        self._send_error(408, f"no whole request within header_timeout ({self.server.request_timeout:g}s)")

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.size += len(data)
        if self.size > MAX_REQUEST:
            self._send_error(431, "request too large")
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # on_message_complete has refused it already (one request, one answer); nothing more is read
            if not self.closed:
                self._send_error(400, "upgrade not supported")
        except httptools.HttpParserError as exc:
            if not self.closed:
                self._send_error(400, f"malformed request: {exc}")

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self._expect_request()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_message_complete(self) -> None:
        if self.closed:
            return
        if self.parser.should_upgrade():  # refused before anything is done: one request, one answer
            self._send_error(400, "upgrade not supported")
            return
        self.size = 0
        self._between_requests()
        method = self.parser.get_method().decode("latin-1")
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self._send_error(400, "malformed URL")
            return
        path = (url.path or b"/").decode("latin-1")
        query = (url.query or b"").decode("latin-1")
        head = method == "HEAD"
        # RFC 9110 9.3.2: HEAD is GET without the body, as on the health listener (a probe may use either).
        asked = "GET" if head and ROUTES.get(path) == "GET" else method
        status, body, ctype = self.server.handle(asked, path, query, self.headers)
        keep = self.parser.should_keep_alive()
        extra = b""
        if status == 401:
            extra = b'WWW-Authenticate: Bearer realm="corral"\r\n'
        elif status == 405:
            extra = f"Allow: {ROUTES[path]}\r\n".encode()
        self._write(response(status, body, ctype, keep, extra, head_only=head))
        if not keep:
            self.close()

    def _send_error(self, status: int, message: str) -> None:
        _, body, ctype = json_answer(status, {"error": message})
        self._write(response(status, body, ctype, keep_alive=False))
        self.close()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self, last: bytes = b"") -> None:
        if last:
            self._write(last)
        self.closed = True
        if self.transport is not None:
            self.transport.close()
