"""Strict HTTP/1.1 at the edge, sans I/O: parsing, framing, forwarding rules and corral's own answers.

Everything here takes bytes and calls a handler or returns bytes (h11's style): no sockets, no clock.
The modules, each importing only those before it:
  errors      EdgeError (a request refused), UpstreamError (a worker's answer unreadable)
  framing     body_framing, the one decision on where a body ends; chunks; the Connection field
  head        RequestHead, a validated request head
  forwarding  the hop-by-hop fields, and forward_head: the head a worker receives
  request     RequestReader: a client's bytes to RequestHandler calls, refusing what RFC 9112 forbids
  answers     the status line, and the responses corral writes itself (error pages, 100 Continue)
  response    ResponseReader: a worker's bytes to ResponseHandler calls; response_head, relayed to the client
The rest of corral uses this package's names (`edge.X`), never its modules.
"""

from .answers import CONTINUE, answer, error_response
from .errors import EdgeError, UpstreamError
from .forwarding import HOP_BY_HOP, forward_head
from .framing import (
    CHUNKED,
    LAST_CHUNK,
    LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    ChunkLedger,
    body_framing,
    chunk,
    client_framing,
    connection_token,
)
from .head import RequestHead
from .request import EdgeLimits, RequestHandler, RequestReader
from .response import RESPONSE_HEAD_MAX, SURPLUS, ResponseHandler, ResponseReader, response_head

__all__ = [
    "CHUNKED",
    "CONTINUE",
    "HOP_BY_HOP",
    "LAST_CHUNK",
    "LENGTH",
    "NO_BODY",
    "RESPONSE_HEAD_MAX",
    "SURPLUS",
    "UNTIL_CLOSE",
    "ChunkLedger",
    "EdgeError",
    "EdgeLimits",
    "RequestHandler",
    "RequestHead",
    "RequestReader",
    "ResponseHandler",
    "ResponseReader",
    "UpstreamError",
    "answer",
    "body_framing",
    "chunk",
    "client_framing",
    "connection_token",
    "error_response",
    "forward_head",
    "response_head",
]
