"""The worker's side of an exchange: parsing its response, and the head relayed to the client."""

from __future__ import annotations

from typing import Protocol

import httptools

from .answers import status_line
from .errors import UpstreamError, parse_error_reason
from .forwarding import HOP_BY_HOP
from .framing import NO_BODY, UNTIL_CLOSE, body_framing


class ResponseHandler(Protocol):
    def on_response(self, status: int, headers: list[tuple[bytes, bytes]], framing: int) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_end(self, reusable: bool) -> None: ...
    def on_surplus(self) -> None: ...
    def on_upgrade(self, headers: list[tuple[bytes, bytes]], rest: bytes) -> None: ...


RESPONSE_HEAD_MAX = 1 << 20  # bytes of one worker response head (counted per read, so generous)
SURPLUS = "upstream sent more data than specified"


class ResponseReader:
    """Parses the response to one request at a time; anything malformed raises UpstreamError.

    Where a response ends is body_framing's decision. Any byte after that end and before corral sends
    the next request is surplus: the response itself is delivered, the connection is not reused, and
    the bytes are never read as another exchange's response (nginx: "upstream sent more data than
    specified"). `on_response_end` is called only after the whole read was parsed, so no next request
    can be sent on this connection while surplus bytes of the same read are still unparsed.
    """

    __slots__ = (
        "_done",
        "_finals",
        "_hbuf",
        "_head_bytes",
        "_headers",
        "_in_head",
        "_keep",
        "_length",
        "_parser",
        "_switched",
        "_te",
        "_tokens",
        "framing",
        "handler",
        "method",
        "upgrade",
    )

    def __init__(self, handler: ResponseHandler) -> None:
        self.handler = handler
        self._parser = httptools.HttpResponseParser(self)
        self.method = b"GET"
        self.framing = NO_BODY
        self._headers: list[tuple[bytes, bytes]] = []
        self._length: int | None = None
        self._te = False
        self._tokens: list[bytes] = []
        self._in_head = True
        self._head_bytes = 0
        self._hbuf = bytearray()  # a HEAD answer's bytes: llhttp cannot be told where it ends
        self._finals = 0  # heads completed for the current request (interim ones included)
        self._keep = False
        self._done = True  # no request outstanding: any byte is surplus
        self.upgrade = False  # the request asked for a WebSocket: a 101 switches the connection
        self._switched: list[tuple[bytes, bytes]] | None = None

    def start(self, method: bytes, upgrade: bool = False) -> None:
        """A request was sent on this connection: its response comes next."""
        self.method = method
        self.upgrade = upgrade
        self._done = False
        self._in_head = True
        self._head_bytes = 0
        self._finals = 0
        self._hbuf.clear()

    def feed(self, data: bytes) -> None:
        if self._done:
            raise UpstreamError(SURPLUS)
        if self._in_head:
            # A worker is trusted with bodies, not with an endless head: that would grow without bound.
            self._head_bytes += len(data)
            if self._head_bytes > RESPONSE_HEAD_MAX:
                raise UpstreamError("response head too large")
            if self.method == b"HEAD":
                self._hbuf += data
        surplus = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            headers = self._switched
            if headers is None:
                raise UpstreamError("worker switched protocols") from None
            self._switched = None
            self._done = True
            self.handler.on_upgrade(headers, data[int(exc.args[0]) :])  # the rest is the tunnel's
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadDone):
                surplus = self._head_answer_surplus()
                self._parser = httptools.HttpResponseParser(self)  # llhttp still expects the body
            elif isinstance(cause, _Surplus):
                surplus = True
            else:
                raise UpstreamError(parse_error_reason(exc)) from None
        if self._done:
            if surplus:
                self.handler.on_surplus()
            self.handler.on_response_end(self._keep and not surplus)

    def _head_answer_surplus(self) -> bool:
        end = -1
        for _ in range(self._finals):
            end = self._hbuf.find(b"\r\n\r\n", end + 1)
            if end == -1:
                return True  # not framed the way llhttp read it: do not trust the rest
        return len(self._hbuf) > end + 4

    def on_message_begin(self) -> None:
        if self._done:
            raise _Surplus  # a second message where one response was due
        self._in_head = True
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
        self._in_head = False
        self._finals += 1
        parser = self._parser
        status = parser.get_status_code()
        headers = self._headers
        if self._tokens:
            drop = set(self._tokens)
            headers = [(k, v) for k, v in headers if k not in drop]
        if 100 <= status < 200:
            if status == 101 and self.upgrade:
                self._switched = headers  # llhttp stops at the switch; feed() hands over the rest
            return  # interim responses are not relayed (Expect is answered by corral itself)
        self.framing = body_framing(self.method, status, self._te, self._length)
        # A bodyless answer that still declares a body (a HEAD answer's Content-Length, a 304 with one)
        # may be followed by that body from a server that sends it anyway, maybe in a later segment
        # (httpuv writes head and body separately): too late to tell from the next response. Such a
        # connection is not reused; only then can no late byte ever be read as another answer.
        declared = self._te or bool(self._length)
        self._keep = bool(parser.should_keep_alive()) and self.framing != UNTIL_CLOSE
        self._keep = self._keep and not (self.framing == NO_BODY and declared)
        self.handler.on_response(status, headers, self.framing)
        if self.method == b"HEAD":
            self._done = True
            raise _HeadDone

    def on_body(self, data: bytes) -> None:
        if data:
            self.handler.on_response_body(data)

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() >= 200:
            self._done = True

    def eof(self) -> bool:
        """The worker closed; True when that ends a close-delimited body cleanly (then the response ends).

        A chunked or Content-Length body cut short by EOF is a truncation, never a clean end.
        """
        if self._done or self._in_head or self.framing != UNTIL_CLOSE:
            return False
        self._done = True
        self.handler.on_response_end(False)
        return True


class _HeadDone(Exception):
    pass


class _Surplus(Exception):
    pass


def response_head(
    status: int,
    headers: list[tuple[bytes, bytes]],
    request_id: bytes,
    chunked: bool,
    connection: bytes | None,
) -> bytes:
    parts = [b"HTTP/1.1 ", status_line(status)]
    has_rid = False
    via = -1
    for name, value in headers:
        if name == b"x-request-id":
            has_rid = True
        elif name == b"via":
            via = len(parts) + 2
        parts += [name, b": ", value, b"\r\n"]
    if not has_rid:
        parts += [b"x-request-id: ", request_id, b"\r\n"]
    if via >= 0:
        parts[via] += b", 1.1 corral"
    else:
        parts.append(b"via: 1.1 corral\r\n")
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    if connection is not None:
        parts += [b"connection: ", connection, b"\r\n"]
    parts.append(b"\r\n")
    return b"".join(parts)
