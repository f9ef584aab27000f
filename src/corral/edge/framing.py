"""Message framing (RFC 9112 6, 9.3): where a body ends, the transfer codings a request may use, chunks,
and the Connection field that says whether the connection outlives the message."""

from __future__ import annotations

from collections import deque

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

# Chunks a ledger keeps while the client's socket has not taken them; past that it stops recording (below).
LEDGER_MAX = 4096


class ChunkLedger:
    """Where the body bytes sit in a re-chunked body on the wire, so that a cut response counts the body bytes
    the client's socket took (its $body_bytes_sent), not their chunk framing.

    Offsets count from the end of the response head. A chunk is forgotten once the socket has taken it whole
    (`taken`), so the ledger holds only the chunks still in corral's buffers. A client that takes nothing while
    more than LEDGER_MAX chunks pile up for it stops the recording: a cut past the last recorded chunk then
    counts only the chunks recorded, an undercount, never more than the client could have."""

    __slots__ = ("body", "marks", "recording", "settled_body", "settled_wire", "wire")

    def __init__(self) -> None:
        self.marks: deque[tuple[int, int, int, int]] = deque()  # (wire offset, prefix length, body offset, size)
        self.wire = 0  # framed bytes recorded so far
        self.body = 0  # body bytes recorded so far
        self.recording = True
        self.settled_wire = 0  # the chunks forgotten (taken whole) end here ...
        self.settled_body = 0  # ... holding this many body bytes

    def add(self, size: int) -> None:
        """A chunk of `size` body bytes, framed by chunk(), goes toward the client."""
        if not self.recording or len(self.marks) >= LEDGER_MAX:
            self.recording = False
            return
        prefix = len(b"%x" % size) + 2
        self.marks.append((self.wire, prefix, self.body, size))
        self.wire += prefix + size + 2
        self.body += size

    def taken(self, wire: int) -> None:
        """The client's socket has taken `wire` bytes of the body: forget the chunks wholly inside them."""
        marks = self.marks
        while marks:
            start, prefix, body, size = marks[0]
            end = start + prefix + size + 2
            if end > wire:
                return
            marks.popleft()
            self.settled_wire, self.settled_body = end, body + size

    def body_within(self, wire: int) -> int:
        """Body bytes in the first `wire` bytes of the framed body."""
        for start, prefix, body, size in reversed(self.marks):
            if start <= wire:
                return body + min(size, max(0, wire - start - prefix))
        return self.settled_body if wire >= self.settled_wire else 0


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
