"""How an exchange fails at the edge: a client's request refused, or a worker's answer that is not HTTP."""

from __future__ import annotations


class EdgeError(Exception):
    """A request the edge refuses: answered with `status` and the connection closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class UpstreamError(Exception):
    """A worker answered something that is not valid HTTP/1.1."""


def parse_error_reason(exc: Exception) -> str:
    """llhttp's words for a parse error, short enough for a log line and an error page."""
    text = str(exc).strip() or "malformed request"
    return text[:120]
