"""Message framing (RFC 9112 6, 9.3): where a body ends, the transfer codings a request may use, chunks,
and the Connection field that says whether the connection outlives the message."""

from __future__ import annotations

from .errors import EdgeError

# How a message body is delimited (RFC 9112 6.3). Every reader and writer asks body_framing, so no
# part of corral holds its own idea of "has a body" (h11's _body_framing).
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2, 3


def body_framing(method: bytes, status: int | None, chunked: bool, length: int | None) -> int:
    """The framing of a request (status None) or of the response to `method` with `status`."""
    if status is not None and (method == b"HEAD" or status < 200 or status in (204, 304)):
        return NO_BODY  # whatever Content-Length says: it describes a body that is not sent
    if chunked:
        return CHUNKED
    if length is not None:
        return LENGTH if length else NO_BODY
    return NO_BODY if status is None else UNTIL_CLOSE


def client_framing(framing: int, version: bytes) -> tuple[bool, bool]:
    """How a response with `framing` goes to a client speaking `version`: (re-chunk it, close to end it).

    A length-delimited or bodyless response goes as it is; a chunked or close-delimited one is chunked
    for HTTP/1.1 clients and delimited by closing the connection for HTTP/1.0 ones (which know no chunks).
    """
    if framing in (NO_BODY, LENGTH):
        return False, False
    return (True, False) if version == b"1.1" else (False, True)


def connection_token(version: bytes, keep_alive: bool) -> bytes | None:
    """The Connection field a response needs (RFC 9112 9.3): HTTP/1.1 persists unless told, 1.0 the opposite."""
    if not keep_alive:
        return b"close"
    return b"keep-alive" if version == b"1.0" else None


def chunk(data: bytes) -> bytes:
    # An empty chunk would be the last chunk: it must never end a body by accident.
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


LAST_CHUNK = b"0\r\n\r\n"


_KNOWN_CODINGS = frozenset({b"chunked", b"gzip", b"x-gzip", b"deflate", b"compress", b"x-compress"})


def check_transfer_codings(te: bytes) -> None:
    """Refuses a request's Transfer-Encoding (EdgeError) unless its body is plain chunked."""
    # RFC 9112 6.1/6.3: a final coding other than chunked leaves the length unknowable (400);
    # a coding corral cannot decode is 501, and chunked is the only one it passes through.
    codings = [c for c in (c.strip().lower() for c in te.split(b",")) if c]
    if any(c not in _KNOWN_CODINGS for c in codings):
        raise EdgeError(501, "unknown transfer coding")
    if not codings or codings[-1] != b"chunked" or b"chunked" in codings[:-1]:
        raise EdgeError(400, "transfer coding must end in chunked")
    if len(codings) > 1:
        raise EdgeError(501, "unsupported transfer coding")
