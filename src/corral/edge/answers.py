"""What corral answers itself: the status line every head it writes uses, whole responses, 100 Continue."""

from __future__ import annotations

import json as _json
from http import HTTPStatus

_STATUS_LINES: dict[int, bytes] = {}


def status_line(status: int) -> bytes:
    """`200 OK` and its CRLF, built once per status: every head corral writes starts with one."""
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        line = _STATUS_LINES[status] = f"{status} {phrase}\r\n".encode()
    return line


def answer(
    status: int,
    body: bytes,
    ctype: bytes = b"text/plain; charset=utf-8",
    connection: bytes | None = b"close",
    headers: bytes = b"",
    head_only: bool = False,
) -> bytes:
    """A whole response corral writes itself (an error page, a probe, an admin answer): one builder, so
    every one has the same status line, Content-Length and Connection. `headers`: more header lines, each
    ending CRLF. `head_only`: the answer to a HEAD request, its Content-Length and no body (a body would be
    read as the start of the next response)."""
    parts = [b"HTTP/1.1 ", status_line(status), b"content-type: ", ctype, b"\r\ncontent-length: "]
    parts += [str(len(body)).encode(), b"\r\n", headers]
    if connection is not None:
        parts += [b"connection: ", connection, b"\r\n"]
    parts += [b"\r\n", b"" if head_only else body]
    return b"".join(parts)


def error_response(
    status: int,
    message: str,
    request_id: bytes = b"",
    connection: bytes | None = b"close",
    retry_after: int | None = None,
    json: bool = False,
    head_only: bool = False,
) -> bytes:
    """A short plain error page: no paths, versions or traces."""
    if json:
        body = _json.dumps({"error": message, "status": status}).encode() + b"\n"
        ctype = b"application/json"
    else:
        body = f"{status} {message}\n".encode()
        ctype = b"text/plain; charset=utf-8"
    headers = b""
    if retry_after is not None:
        headers += b"retry-after: %d\r\n" % retry_after
    if request_id:
        headers += b"x-request-id: " + request_id + b"\r\n"
    return answer(status, body, ctype, connection, headers, head_only)


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
