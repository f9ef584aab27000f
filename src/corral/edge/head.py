"""RequestHead: a request head as the edge validated it.

RequestReader (request.py) makes one per request; forward_head (forwarding.py) and the data path read it.
"""

from __future__ import annotations


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
        "websocket",
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
        self.websocket = False  # an RFC 6455 upgrade request: after the worker's 101, a tunnel

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None
