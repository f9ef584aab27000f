"""How a request ends, as corral counts and logs it.

Every request ends as exactly one outcome; a response whose head went out but did not reach its client
whole also has a cut (why). An Exchange (exchange.py) settles both as it ends; a request the edge refused
before it became an exchange is a Refusal, with the same fields. The pool counts each once (Pool.outcomes,
Pool.cuts, via Pool.finished) and hands it to its observers: the metrics and one access-log line.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .. import edge
from . import tracing

if TYPE_CHECKING:
    from .interfaces import Client
    from .worker import Worker

# How an exchange ended: each is exactly one of these (status, metrics and the access log count them).
SERVED = "served"  # the client took the worker's whole response
FAILED = "failed"  # the worker failed it (502, 504, or a response cut by the worker)
REFUSED = "refused"  # corral answered itself: the edge (4xx), the queue (503), no app (404)
ABANDONED = "abandoned"  # the client left before it had the whole response
OUTCOMES = (SERVED, FAILED, REFUSED, ABANDONED)

# Why a response with a head sent did not reach its client whole (`Exchange.cut`).
CUT_CLIENT = "client closed"
CUT_SEND_TIMEOUT = "send_timeout"
CUT_WORKER = "worker failed"
CUT_REQUEST_TIMEOUT = "request_timeout"
CUTS = (CUT_CLIENT, CUT_SEND_TIMEOUT, CUT_WORKER, CUT_REQUEST_TIMEOUT)

CLIENT_CLOSED = 499  # the status logged when the client left before its response was complete (nginx's code)


class Refusal:
    """A request the edge refused before it became an exchange (its head was malformed, too large, or too
    slow; too many connections): counted and logged like one, with what little is known of it."""

    __slots__ = (
        "bytes_out",
        "client",
        "created",
        "cut",
        "dispatched_at",
        "head",
        "outcome",
        "request_id",
        "served_by",
        "status",
        "traceparent",
    )

    def __init__(self, client: Client, status: int) -> None:
        self.client = client
        self.status = status
        self.head = edge.RequestHead()
        self.head.method = self.head.target = b"-"
        self.created = time.monotonic()
        self.dispatched_at = 0.0
        self.served_by: Worker | None = None
        self.bytes_out = 0
        self.traceparent = tracing.start()
        self.request_id = tracing.trace_id(self.traceparent)
        self.outcome = REFUSED
        self.cut = ""
