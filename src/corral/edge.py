"""The HTTP/1.1 edge, without sockets: strict request parsing, forwarding rewrites, response framing.

Everything here takes bytes and calls a handler (h11's sans-I/O style), so every RFC 9112 rule is a
deterministic unit test.  llhttp (through httptools) does the byte-level work and is strict by default
(CL+TE, duplicate Content-Length, bad chunk sizes, obs-fold, bare CR/LF, control bytes all raise);
this module adds what llhttp leaves open: size and count bounds, the exact request-line grammar,
HTTP version, Host rules, CONNECT, Expect, and the header rewriting a proxy owes both sides.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Protocol

import httptools

# RFC 9110 7.6.1 + the de-facto ones every proxy strips.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Headers corral regenerates toward the worker, so the client's copies are dropped.
_REGENERATED = frozenset(
    {
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
    }
)


class EdgeError(Exception):
    """A request the edge refuses: answered with `status` and the connection closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class UpstreamError(Exception):
    """A worker answered something that is not valid HTTP/1.1."""


class RequestHead:
    """The parts of a request head the proxy needs, validated."""

    __slots__ = (
        "chunked",
        "content_length",
        "expect_continue",
        "headers",
        "host",
        "keep_alive",
        "method",
        "target",
        "version",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = b"1.1"
        self.headers: list[tuple[bytes, bytes]] = []  # (lower-case name, value), hop-by-hop removed
        self.host = b""
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.expect_continue = False

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class RequestHandler(Protocol):
    def on_request(self, head: RequestHead) -> None: ...
    def on_request_body(self, data: bytes) -> None: ...
    def on_request_end(self) -> None: ...


class EdgeLimits:
    __slots__ = ("max_body", "max_header_bytes", "max_headers")

    def __init__(self, max_header_bytes: int = 16384, max_headers: int = 100, max_body: int = 100 << 20):
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_body = max_body


class RequestReader:
    """Feeds client bytes through llhttp and raises EdgeError on anything RFC 9112 forbids.

    Pipelined requests are parsed as they arrive; the caller decides how many it holds.
    """

    __slots__ = (
        "_body_seen",
        "_chunk",
        "_conn_tokens",
        "_head",
        "_head_buf",
        "_head_len",
        "_in_head",
        "_parser",
        "_te",
        "_url",
        "handler",
        "limits",
    )

    def __init__(self, handler: RequestHandler, limits: EdgeLimits) -> None:
        self.handler = handler
        self.limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self._in_head = False
        self._head_buf: list[bytes] = []
        self._head_len = 0
        self._head: RequestHead | None = None
        self._url = b""
        self._te: bytes | None = None
        self._conn_tokens: list[bytes] = []
        self._body_seen = 0
        self._chunk = b""

    @property
    def in_head(self) -> bool:
        """True while a request head is partly received (the header timeout runs)."""
        return self._in_head

    def feed(self, data: bytes) -> None:
        self._chunk = data
        if self._in_head:
            self._head_buf.append(data)
            self._head_len += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._after_upgrade(data, exc)
        except httptools.HttpParserInvalidMethodError:
            raise EdgeError(400, "invalid method") from None
        except httptools.HttpParserInvalidURLError:
            raise EdgeError(400, "invalid request target") from None
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, EdgeError):
                raise cause from None
            raise EdgeError(400, _describe(exc)) from None
        if self._in_head and self._head_len > self.limits.max_header_bytes:
            self._head_too_large()

    def _head_too_large(self) -> None:
        # The head is still incomplete past the bound: 414 when even the request line has not ended.
        buf = b"".join(self._head_buf)
        if buf.find(b"\r\n") == -1:
            raise EdgeError(414, "request line too long")
        raise EdgeError(431, "request header fields too large")

    def _after_upgrade(self, data: bytes, exc: httptools.HttpParserUpgrade) -> None:
        # llhttp stops at CONNECT and at Upgrade. CONNECT is refused; an Upgrade offer is simply
        # declined (RFC 9110 7.8 lets a server ignore it) and parsing resumes on a fresh parser.
        head = self._head
        if head is None or head.method == b"CONNECT":
            raise EdgeError(405, "CONNECT is not supported")
        if head.has_body:
            raise EdgeError(501, "protocol upgrade with a request body is not supported")
        self.on_message_complete()
        self._parser = httptools.HttpRequestParser(self)
        offset = int(exc.args[0]) if exc.args else len(data)
        rest = data[offset:]
        if rest:
            self.feed(rest)

    # --- llhttp callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        # The head is counted from the chunk it starts in (over-counting at most one pipelined read).
        self._in_head = True
        self._head_buf = [self._chunk]
        self._head_len = len(self._chunk)
        self._head = RequestHead()
        self._url = b""
        self._te = None
        self._conn_tokens = []
        self._body_seen = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self._head
        assert head is not None
        if len(head.headers) >= self.limits.max_headers:
            raise EdgeError(431, "too many header fields")
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"transfer-encoding":
                self._te = value if self._te is None else self._te + b"," + value
                _check_codings(self._te)
            elif lname == b"connection":
                self._conn_tokens.extend(t.strip().lower() for t in value.split(b","))
            return
        if lname == b"host":
            if head.host:
                raise EdgeError(400, "more than one Host header")
            head.host = value
        elif lname == b"content-length":
            head.content_length = int(value)  # llhttp has checked it is plain decimal and unique
            if head.content_length > self.limits.max_body:
                raise EdgeError(413, "request body too large")
        elif lname == b"expect":
            if value.lower() != b"100-continue":
                raise EdgeError(417, "unsupported expectation")
            head.expect_continue = True
        head.headers.append((lname, value))

    def on_headers_complete(self) -> None:
        head = self._head
        assert head is not None
        parser = self._parser
        self._in_head = False
        version = parser.get_http_version()
        head.method = parser.get_method()
        self._check_request_line(head.method, version)
        if version not in ("1.1", "1.0"):
            raise EdgeError(505, "HTTP version not supported")
        head.version = version.encode()
        if head.method == b"CONNECT":
            raise EdgeError(405, "CONNECT is not supported")
        head.target = self._url
        if self._te is not None:
            head.chunked = True
        if version == "1.1" and not head.host:
            raise EdgeError(400, "missing Host header")
        if head.target[:1] != b"/":
            self._absolute_to_origin(head)
        head.keep_alive = bool(parser.should_keep_alive())
        if self._conn_tokens:
            drop = set(self._conn_tokens)
            head.headers = [(k, v) for k, v in head.headers if k not in drop]
        self.handler.on_request(head)

    def _check_request_line(self, method: bytes, version: str) -> None:
        # llhttp tolerates repeated spaces and a missing version (HTTP/0.9); RFC 9112 3 does not.
        # The line corral forwards is regenerated anyway, so this check is about refusing, not safety.
        buf = self._head_buf[0] if len(self._head_buf) == 1 else b"".join(self._head_buf)
        self._head_buf = []
        expected = b"%s %s HTTP/%s\r\n" % (method, self._url, version.encode())
        if version == "0.9" or buf.find(expected) == -1:
            raise EdgeError(400, "malformed request line")

    def _absolute_to_origin(self, head: RequestHead) -> None:
        target = head.target
        if head.method == b"OPTIONS" and target == b"*":
            return
        lower = target[:8].lower()
        if not (lower.startswith(b"http://") or lower.startswith(b"https://")):
            raise EdgeError(400, "invalid request target")
        rest = target.split(b"://", 1)[1]
        slash = rest.find(b"/")
        authority, path = (rest, b"/") if slash == -1 else (rest[:slash], rest[slash:])
        if not authority:
            raise EdgeError(400, "invalid request target")
        # RFC 9112 3.2.2: the authority of an absolute-form target replaces Host.
        head.host = authority
        head.headers = [(k, v) for k, v in head.headers if k != b"host"]
        head.headers.append((b"host", authority))
        head.target = path

    def on_body(self, data: bytes) -> None:
        self._body_seen += len(data)
        if self._body_seen > self.limits.max_body:
            raise EdgeError(413, "request body too large")
        self.handler.on_request_body(data)

    def on_message_complete(self) -> None:
        self._head = None
        self.handler.on_request_end()

    def on_chunk_header(self) -> None:
        pass


_KNOWN_CODINGS = frozenset({b"chunked", b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"})


def _check_codings(te: bytes) -> None:
    # RFC 9112 6.1/6.3: a final coding other than chunked leaves the length unknowable (400);
    # a coding corral cannot decode is 501, and chunked is the only one it passes through.
    codings = [c.strip().lower() for c in te.split(b",")]
    if any(c not in _KNOWN_CODINGS for c in codings):
        raise EdgeError(501, "unknown transfer coding")
    if codings[-1] != b"chunked" or b"chunked" in codings[:-1]:
        raise EdgeError(400, "transfer coding must end in chunked")
    if len(codings) > 1:
        raise EdgeError(501, "unsupported transfer coding")


def _describe(exc: Exception) -> str:
    text = str(exc).strip() or "malformed request"
    return text[:120]


# --- forwarding toward the worker ----------------------------------------------------------
def forward_head(
    head: RequestHead,
    client_ip: bytes,
    request_id: bytes,
    trusted: bool,
    proto: bytes = b"http",
    prefix: bytes = b"",
) -> bytes:
    """The request head corral sends a worker: regenerated framing, forwarding headers, no hop-by-hop."""
    xff = client_ip
    xfp = proto
    xfh = head.host
    parts = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
    has_rid = False
    for name, value in head.headers:
        if name in _REGENERATED:
            if trusted:
                if name == b"x-forwarded-for":
                    xff = value + b", " + client_ip
                elif name == b"x-forwarded-proto":
                    xfp = value
                elif name == b"x-forwarded-host":
                    xfh = value
                elif name == b"forwarded":
                    parts += [b"forwarded: ", value, b"\r\n"]
            continue
        if name == b"x-request-id":
            has_rid = True
        elif name == b"via":
            value = value + b", 1.1 corral"
        parts += [name, b": ", value, b"\r\n"]
    if not has_rid:
        parts += [b"x-request-id: ", request_id, b"\r\n"]
    if head.header(b"via") is None:
        parts.append(b"via: 1.1 corral\r\n")
    parts += [b"x-forwarded-for: ", xff, b"\r\nx-forwarded-proto: ", xfp, b"\r\n"]
    if xfh:
        parts += [b"x-forwarded-host: ", xfh, b"\r\n"]
    if prefix:
        parts += [b"x-forwarded-prefix: ", prefix, b"\r\n"]
    if head.chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif head.content_length is not None:
        parts += [b"content-length: ", str(head.content_length).encode(), b"\r\n"]
    parts.append(b"\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


# --- responses from the worker -------------------------------------------------------------
class ResponseHandler(Protocol):
    def on_response(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_end(self, reusable: bool) -> None: ...


class ResponseReader:
    """Parses one worker response at a time; anything malformed raises UpstreamError."""

    __slots__ = ("_headers", "_length", "_parser", "_status", "_te", "_tokens", "bodyless", "handler")

    def __init__(self, handler: ResponseHandler) -> None:
        self.handler = handler
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._length: int | None = None
        self._te = False
        self._tokens: list[bytes] = []
        self.bodyless = False  # set for a HEAD request: llhttp cannot be told, so we end at the head

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise UpstreamError("worker switched protocols") from None
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadDone):
                return
            raise UpstreamError(_describe(exc)) from None

    def on_message_begin(self) -> None:
        self._headers = []
        self._length = None
        self._te = False
        self._tokens = []

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                self._tokens.extend(t.strip().lower() for t in value.split(b","))
            elif lname == b"transfer-encoding":
                self._te = True
            return
        if lname == b"content-length":
            self._length = int(value)
        self._headers.append((lname, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            return  # interim responses are not relayed (Expect is answered by corral itself)
        headers = self._headers
        if self._tokens:
            drop = set(self._tokens)
            headers = [(k, v) for k, v in headers if k not in drop]
        bodyless = self.bodyless or status in (204, 304)
        length = self._length if not self._te else None
        if bodyless:
            length = 0 if length is None else length
        self.handler.on_response(status, headers, length)
        if self.bodyless:
            self.handler.on_response_end(False)
            raise _HeadDone

    def on_body(self, data: bytes) -> None:
        self.handler.on_response_body(data)

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() < 200:
            return
        self.handler.on_response_end(bool(self._parser.should_keep_alive()))

    def eof(self) -> bool:
        """The worker closed; True when that ends a close-delimited body cleanly."""
        try:
            self._parser.feed_data(b"")
        except httptools.HttpParserError:
            return False
        return True


class _HeadDone(Exception):
    pass


def response_head(
    status: int,
    headers: list[tuple[bytes, bytes]],
    length: int | None,
    request_id: bytes,
    chunked: bool,
    close: bool,
) -> bytes:
    parts = [b"HTTP/1.1 ", _status_line(status)]
    has_rid = False
    for name, value in headers:
        if name == b"x-request-id":
            has_rid = True
        elif name == b"via":
            value = value + b", 1.1 corral"
        parts += [name, b": ", value, b"\r\n"]
    if not has_rid:
        parts += [b"x-request-id: ", request_id, b"\r\n"]
    parts.append(b"via: 1.1 corral\r\n")
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        line = _STATUS_LINES[status] = f"{status} {phrase}\r\n".encode()
    return line


def error_response(
    status: int,
    message: str,
    request_id: bytes = b"",
    close: bool = False,
    retry_after: int | None = None,
    json: bool = False,
) -> bytes:
    """A short plain error page: no paths, versions or traces."""
    if json:
        text = message.replace('"', "'")
        body = f'{{"error": "{text}", "status": {status}}}\n'.encode()
        ctype = b"application/json"
    else:
        body = f"{status} {message}\n".encode()
        ctype = b"text/plain; charset=utf-8"
    parts = [
        b"HTTP/1.1 ",
        _status_line(status),
        b"content-type: ",
        ctype,
        b"\r\ncontent-length: ",
        str(len(body)).encode(),
        b"\r\n",
    ]
    if retry_after is not None:
        parts += [b"retry-after: ", str(retry_after).encode(), b"\r\n"]
    if request_id:
        parts += [b"x-request-id: ", request_id, b"\r\n"]
    if close:
        parts.append(b"connection: close\r\n")
    parts += [b"\r\n", body]
    return b"".join(parts)


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
