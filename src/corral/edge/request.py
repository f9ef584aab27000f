"""Parsing a client's request, sans I/O: bytes in, RequestHandler calls out (h11's style), so every
RFC 9112 rule is a deterministic unit test.

llhttp (through httptools) does the byte-level work and is strict by default (CL+TE, duplicate
Content-Length, bad chunk sizes, obs-fold, bare CR/LF, control bytes all raise); this module adds what
llhttp leaves open: size and count bounds, the exact request-line grammar, HTTP version, Host rules,
CONNECT, Expect, and the fields no worker may see (hop-by-hop ones and those Connection names).
"""

from __future__ import annotations

import re
from typing import Protocol

import httptools

from .errors import EdgeError, parse_error_reason
from .forwarding import HOP_BY_HOP
from .framing import CHUNKED, LENGTH, body_framing, check_transfer_codings
from .head import RequestHead


class RequestHandler(Protocol):
    def on_request(self, head: RequestHead) -> None: ...
    def on_request_body(self, data: bytes) -> None: ...
    def on_request_end(self) -> None: ...
    def on_tunnel_data(self, data: bytes) -> None: ...


class EdgeLimits:
    """Bounds on one request. Chunk-line and trailer bounds are not knobs: no sane client comes near them."""

    __slots__ = ("max_body", "max_chunk_line", "max_header_bytes", "max_headers")

    def __init__(
        self,
        max_header_bytes: int = 16384,
        max_headers: int = 100,
        max_body: int = 100 << 20,
        max_chunk_line: int = 4096,
    ) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_body = max_body
        self.max_chunk_line = max_chunk_line  # chunk-size line including extensions and CRLF


# Where the reader is in the byte stream: llhttp does not say where a head ends or what a chunk-size
# line carries, so RequestReader frames the stream itself and hands llhttp exact slices.
_HEAD, _FIXED, _CHUNKED = 0, 1, 2
_C_SIZE, _C_DATA, _C_CRLF, _C_TRAILER = 0, 1, 2, 3
_EV_HEAD, _EV_BODY, _EV_END, _EV_TUNNEL = 0, 1, 2, 3
_TUNNEL = 3  # after an accepted WebSocket upgrade: the bytes are no longer HTTP
_ACCEPTED = b"\0websocket"  # RequestReader._upgrade once the head's upgrade is accepted
_HEX = re.compile(rb"[0-9A-Fa-f]+\Z")
_F_HOP, _F_HOST, _F_LENGTH, _F_EXPECT = 0, 1, 2, 3
# Field names on_header must look at; everything else is appended as it is.
_SPECIAL = {name: _F_HOP for name in HOP_BY_HOP} | {
    b"host": _F_HOST,
    b"content-length": _F_LENGTH,
    b"expect": _F_EXPECT,
}
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
# Fields a client's Connection header may not strip: corral sets, regenerates or vouches for them.
_PROTECTED = frozenset({b"host", b"content-length", b"via", b"forwarded", b"x-request-id"})
_LLHTTP_BAD_VERSION = "Invalid HTTP version"
_REQUEST_LINE_END = re.compile(rb" HTTP/[0-9]\.[0-9]\r?\Z")
# RFC 9110 7.2 / RFC 3986 authority: reg-name or IP-literal, optional port.
_HOST = re.compile(rb"(?:\[[0-9A-Za-z:._~!$&'()*+,;=%-]+\]|[0-9A-Za-z._~!$&'()*+,;=%-]*)(?::[0-9]*)?\Z")


class RequestReader:
    """Feeds client bytes through llhttp and raises EdgeError on anything RFC 9112 forbids.

    Framing is tracked here too (head end, body length, chunk lines, trailers), which gives exact head
    sizes, a bound on chunk extensions and trailers (httptools exposes neither), and one more property:
    handler callbacks for a read are delivered only after the whole read parsed, so a request whose head
    and malformed body arrive together is refused before any worker sees its head.
    Pipelined requests are parsed as they arrive; the caller decides how many it holds.
    """

    __slots__ = (
        "_body_seen",
        "_cline",
        "_complete",
        "_conn_tokens",
        "_cstate",
        "_dead",
        "_events",
        "_hbuf",
        "_head",
        "_host_seen",
        "_in_head",
        "_mark",
        "_nfields",
        "_parser",
        "_remaining",
        "_src",
        "_src_pos",
        "_state",
        "_tbytes",
        "_tcount",
        "_te",
        "_tfirst",
        "_tline",
        "_upgrade",
        "_url",
        "handler",
        "limits",
    )

    def __init__(self, handler: RequestHandler, limits: EdgeLimits) -> None:
        self.handler = handler
        self.limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self._state = _HEAD
        self._hbuf = bytearray()  # the head received so far (bounded by max_header_bytes)
        self._src: bytes | None = None  # or the read holding the whole head, from _src_pos
        self._src_pos = 0
        self._in_head = False
        self._head: RequestHead | None = None
        self._url = b""
        self._te: bytes | None = None
        self._upgrade: bytes | None = None
        self._conn_tokens: list[bytes] = []
        self._nfields = 0
        self._host_seen = False
        self._body_seen = 0
        self._complete = False
        self._remaining = 0
        self._cstate = _C_SIZE
        self._cline = bytearray()
        self._tbytes = self._tcount = self._tline = self._tfirst = 0
        self._events: list[tuple[int, object]] = []
        self._mark = 0  # events up to here belong to complete requests
        self._dead: EdgeError | None = None

    @property
    def in_head(self) -> bool:
        """True while a request head is partly received (the header timeout runs)."""
        return self._in_head

    def feed(self, data: bytes) -> None:
        if self._dead is not None:
            raise self._dead
        events = self._events = []
        self._mark = 0
        try:
            self._feed(data)
        except EdgeError as exc:
            self._dead = exc
            self._deliver(events[: self._mark])
            raise
        self._deliver(events)

    def _deliver(self, events: list[tuple[int, object]]) -> None:
        handler = self.handler
        for kind, arg in events:
            if kind == _EV_BODY:
                handler.on_request_body(arg)  # type: ignore[arg-type]
            elif kind == _EV_HEAD:
                handler.on_request(arg)  # type: ignore[arg-type]
            elif kind == _EV_END:
                handler.on_request_end()
            else:
                handler.on_tunnel_data(arg)  # type: ignore[arg-type]

    def _feed(self, data: bytes) -> None:
        view = memoryview(data)
        pos, n = 0, len(data)
        while pos < n:
            state = self._state
            if state == _HEAD:
                pos = self._feed_head(data, view, pos)
            elif state == _TUNNEL:
                self._events.append((_EV_TUNNEL, data[pos:]))
                pos = n
            elif state == _FIXED:
                end = min(n, pos + self._remaining)
                self._remaining -= end - pos
                self._parse(view[pos:end])
                pos = end
                if not self._remaining:
                    self._message_done()
            else:
                end, done, err = self._scan_chunked(data, pos)
                if end > pos:
                    self._parse(view[pos:end])  # llhttp's own verdict on these bytes comes first
                if err is not None:
                    raise err
                pos = end
                if done:
                    self._message_done()

    def _feed_head(self, data: bytes, view: memoryview, pos: int) -> int:
        buf = self._hbuf
        end = -1
        if buf:  # the blank line may straddle two reads
            tail = bytes(buf[-3:])
            j = (tail + data[pos : pos + 3]).find(b"\r\n\r\n")
            if j != -1:
                end = pos + j + 4 - len(tail)
        if end == -1:
            end = data.find(b"\r\n\r\n", pos)
            end = -1 if end == -1 else end + 4
        n = len(data)
        stop = n if end == -1 else end
        if end == -1:
            self._check_first_line(bytes(buf) + data[pos:])
        room = self.limits.max_header_bytes - len(buf)
        if stop - pos > room:
            cut = pos + max(room, 0)
            buf += view[pos:cut]
            self._parse(view[pos:cut])  # a syntax error before the bound is reported as such
            self._head_too_large()
        if end != -1 and not buf and data[pos] not in (13, 10):
            # The whole head is in this read (the common case): read the request line from it, no copy.
            self._src, self._src_pos = data, pos
        else:
            # Blank lines before a request (RFC 9112 2.2) stay in buf and count against the bound,
            # so a stream of CRLFs cannot hold a connection forever; on_headers_complete empties it.
            buf += view[pos:stop]
            self._src = None
        try:
            self._parse(data if pos == 0 and stop == n else view[pos:stop])
        except EdgeError as exc:
            if exc.reason != _LLHTTP_BAD_VERSION or not self._respell(data, pos, stop):
                raise
        return stop

    def _respell(self, data: bytes, pos: int, stop: int) -> bool:
        # RFC 9110 2.5: HTTP/1.x with x > 1 is served as 1.1, the highest minor version corral speaks.
        # llhttp refuses it, so the head so far is respelled and parsed again (only on that error: the
        # common path pays nothing).
        head = bytes(self._hbuf) if self._src is None else data[pos:stop]
        fixed = _as_http11(head)
        if fixed == head:
            return False
        self._parser = httptools.HttpRequestParser(self)
        if self._src is None:
            self._hbuf[:] = fixed
        else:
            self._src, self._src_pos = fixed, 0
        self._parse(fixed)
        return True

    @staticmethod
    def _check_first_line(partial: bytes) -> None:
        # An HTTP/0.9 line (`GET /v`) has no head to wait for: refuse it now, not at the header timeout.
        partial = partial.lstrip(b"\r\n")
        nl = partial.find(b"\n")
        if nl != -1 and not _REQUEST_LINE_END.search(partial[:nl]):
            raise EdgeError(400, "malformed request line")

    def _head_too_large(self) -> None:
        # 414 when even the request line has not ended within the bound.
        if bytes(self._hbuf).lstrip(b"\r\n").find(b"\r\n") == -1:
            raise EdgeError(414, "request line too long")
        raise EdgeError(431, "request header fields too large")

    def _message_done(self) -> None:
        self._state = _HEAD
        if not self._complete:
            # Our framing and llhttp's disagree: never guess where the next request starts.
            raise EdgeError(400, "malformed message framing")

    def _scan_chunked(self, data: bytes, pos: int) -> tuple[int, bool, EdgeError | None]:
        """Walk chunk framing from pos: (end of what belongs to this request, request done, error)."""
        n = len(data)
        limits = self.limits
        while pos < n:
            cstate = self._cstate
            if cstate in (_C_DATA, _C_CRLF):
                take = min(self._remaining, n - pos)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    if cstate == _C_DATA:
                        self._cstate, self._remaining = _C_CRLF, 2
                    else:
                        self._cstate = _C_SIZE
            elif cstate == _C_SIZE:
                nl = data.find(b"\n", pos)
                stop = n if nl == -1 else nl + 1
                line = self._cline
                if len(line) + stop - pos > limits.max_chunk_line:
                    cut = pos + max(limits.max_chunk_line - len(line), 0)
                    return cut, False, EdgeError(400, "chunk extension too long")
                line += data[pos:stop]
                pos = stop
                if nl == -1:
                    break
                size_text = bytes(line).split(b";", 1)[0].rstrip(b"\r\n").rstrip(b" \t").lstrip(b"0") or b"0"
                line.clear()
                if len(size_text) > 16 or not _HEX.match(size_text):
                    return pos, False, EdgeError(400, "malformed chunk size")
                size = int(size_text, 16)
                if self._body_seen + size > limits.max_body:
                    return pos, False, EdgeError(413, "request body too large")
                if size:
                    self._cstate, self._remaining = _C_DATA, size
                else:
                    self._cstate = _C_TRAILER
                    self._tbytes = self._tcount = self._tline = 0
            else:
                nl = data.find(b"\n", pos)
                stop = n if nl == -1 else nl + 1
                if not self._tline:
                    self._tfirst = data[pos]
                self._tline += stop - pos
                self._tbytes += stop - pos
                if self._tbytes > limits.max_header_bytes:
                    return stop, False, EdgeError(431, "trailer section too large")
                pos = stop
                if nl == -1:
                    break
                if self._tline == 2 and self._tfirst == 13:  # CRLF: the empty line that ends the request
                    self._cstate = _C_SIZE
                    return pos, True, None
                self._tline = 0
                self._tcount += 1
                if self._tcount > limits.max_headers:
                    return pos, False, EdgeError(431, "too many trailer fields")
        return pos, False, None

    def _parse(self, data: memoryview) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._after_upgrade()
        except httptools.HttpParserInvalidMethodError:
            raise EdgeError(400, "invalid method") from None
        except httptools.HttpParserInvalidURLError:
            raise EdgeError(400, "invalid request target") from None
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, EdgeError):
                raise cause from None
            if self._parser.get_method() == b"PRI":
                raise EdgeError(505, "HTTP/2 is not supported") from None
            raise EdgeError(400, parse_error_reason(exc)) from None

    def _after_upgrade(self) -> None:
        # llhttp stops after a head offering Upgrade (and at CONNECT, refused in on_headers_complete).
        # A WebSocket upgrade is accepted: what follows its head is the tunnel's, never HTTP again.
        # Any other offer (h2c, unknown) is declined, as RFC 9110 7.8 lets a server: the request is
        # forwarded without Upgrade and parsing resumes on a fresh parser.
        websocket = self._upgrade == _ACCEPTED
        if not self._complete:
            self.on_message_complete()
        self._hbuf.clear()
        if websocket:
            self._state = _TUNNEL
            return
        self._parser = httptools.HttpRequestParser(self)
        self._state = _HEAD

    # --- llhttp callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_head = True
        self._complete = False
        self._head = RequestHead()
        self._url = b""
        self._te = None
        self._conn_tokens = []
        self._nfields = 0
        self._host_seen = False
        self._body_seen = 0
        self._upgrade = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer field: bounded by the chunk scanner, not forwarded
        head = self._head
        assert head is not None
        self._nfields += 1
        if self._nfields > self.limits.max_headers:
            raise EdgeError(431, "too many header fields")
        lname = name.lower()
        kind = _SPECIAL.get(lname)
        if kind is None:
            head.headers.append((lname, value))
            return
        if kind == _F_HOP:
            if lname == b"transfer-encoding":
                self._te = value if self._te is None else self._te + b"," + value
            elif lname == b"connection":
                self._conn_tokens.extend(t.strip().lower() for t in value.split(b","))
            elif lname == b"upgrade":
                self._upgrade = value if self._upgrade is None else self._upgrade + b"," + value
            return
        if kind == _F_HOST:
            if self._host_seen:
                raise EdgeError(400, "more than one Host header")
            value = value.strip()
            if not _HOST.match(value):
                raise EdgeError(400, "invalid Host header")
            self._host_seen = True
            head.host = value
        elif kind == _F_LENGTH:
            head.content_length = int(value)  # llhttp has checked it is plain decimal and unique
            if head.content_length > self.limits.max_body:
                raise EdgeError(413, "request body too large")
        elif value.strip().lower() == b"100-continue":  # Expect
            head.expect_continue = True
        else:
            raise EdgeError(417, "unsupported expectation")
        head.headers.append((lname, value))

    def on_headers_complete(self) -> None:
        head = self._head
        assert head is not None
        parser = self._parser
        self._in_head = False
        version = parser.get_http_version()
        head.method = parser.get_method()
        self._check_request_line(head.method, version)
        # RFC 9110 2.5: a higher minor version is processed as the highest this server speaks.
        vbytes = _VERSIONS.get(version) or (b"1.1" if version[:2] == "1." else None)
        if vbytes is None:
            raise EdgeError(505, "HTTP version not supported")
        head.version = vbytes
        if head.method == b"CONNECT":
            raise EdgeError(501, "CONNECT is not supported")
        head.target = self._url
        if b"#" in head.target:
            raise EdgeError(400, "invalid request target")  # RFC 9112 3.2: no fragment on the wire
        if self._te is not None:
            if version == "1.0":
                # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message means the framing is faulty.
                raise EdgeError(400, "transfer coding in an HTTP/1.0 request")
            check_transfer_codings(self._te)
            head.chunked = True
        if version == "1.1" and not self._host_seen:
            raise EdgeError(400, "missing Host header")
        if head.target[:1] != b"/":
            self._absolute_to_origin(head)
        if parser.should_upgrade():
            if head.has_body:
                # llhttp would skip the body of an upgrade and parse it as the next request.
                raise EdgeError(501, "protocol upgrade with a request body is not supported")
            head.websocket = _is_websocket(head.method, vbytes, self._upgrade)
            if head.websocket:
                self._upgrade = _ACCEPTED
        head.keep_alive = bool(parser.should_keep_alive())
        if vbytes == b"1.0":
            head.expect_continue = False  # RFC 9110 10.1.1: no 1xx to an HTTP/1.0 client; ignore it
        if self._conn_tokens:
            drop = set(self._conn_tokens) - _PROTECTED
            head.headers = [(k, v) for k, v in head.headers if k not in drop or k[:12] == b"x-forwarded-"]
        framing = body_framing(head.method, None, head.chunked, head.content_length)
        if framing == CHUNKED:
            self._state, self._cstate = _CHUNKED, _C_SIZE
            self._cline.clear()
        elif framing == LENGTH:
            self._state, self._remaining = _FIXED, head.content_length or 0
        if self._hbuf:
            self._hbuf.clear()
        self._events.append((_EV_HEAD, head))

    def _check_request_line(self, method: bytes, version: str) -> None:
        # llhttp tolerates repeated spaces, RTSP/ICE versions and a missing version (HTTP/0.9);
        # RFC 9112 3 allows exactly METHOD SP target SP HTTP-version.
        src, at = (self._src, self._src_pos) if self._src is not None else (bytes(self._hbuf), 0)
        self._src = None
        if src[at] in (13, 10):  # blank lines before the request line
            src, at = src[at:].lstrip(b"\r\n"), 0
        line = src[at : src.find(b"\r\n", at)]
        if version == "0.9" or line != b"%s %s HTTP/%s" % (method, self._url, version.encode()):
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
        if not authority or b"@" in authority or not _HOST.match(authority):
            raise EdgeError(400, "invalid request target")
        # RFC 9112 3.2.2: the authority of an absolute-form target replaces Host.
        head.host = authority
        head.headers = [(k, v) for k, v in head.headers if k != b"host"]
        head.headers.append((b"host", authority))
        head.target = path

    def on_body(self, data: bytes) -> None:
        if not data:
            return
        self._body_seen += len(data)
        if self._body_seen > self.limits.max_body:
            raise EdgeError(413, "request body too large")
        self._events.append((_EV_BODY, data))

    def on_message_complete(self) -> None:
        self._head = None
        self._complete = True
        self._events.append((_EV_END, None))
        self._mark = len(self._events)


def _is_websocket(method: bytes, version: bytes, upgrade: bytes | None) -> bool:
    # RFC 6455 4.1: a GET over HTTP/1.1 whose Upgrade names websocket (llhttp has checked Connection).
    if method != b"GET" or version != b"1.1" or upgrade is None:
        return False
    return b"websocket" in (t.strip().lower().split(b"/", 1)[0] for t in upgrade.split(b","))


def _as_http11(head: bytes) -> bytes:
    """The head so far with an HTTP/1.x (x > 1) request line respelled as HTTP/1.1, else unchanged."""
    start = 0
    while start < len(head) and head[start] in (13, 10):
        start += 1
    nl = head.find(b"\n", start)
    end = len(head) if nl == -1 else nl - (head[nl - 1 : nl] == b"\r")
    line = head[start:end]
    if len(line) > 9 and line[-8:-1] == b"HTTP/1." and 50 <= line[-1] <= 57:
        return head[: end - 1] + b"1" + head[end:]
    return head
