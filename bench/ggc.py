"""Ideal reference for T4: a zero-overhead central FIFO queue in front of c servers.

Replays the exact arrival times a run used, with per-class service times measured
directly against an idle worker.  Because it is FCFS with identical servers, the
next job in arrival order always starts on whichever server frees up first, so a
heap of server free-times is an exact simulation.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

from loadgen import Arrival
from stats import percentile


def simulate(arrivals: Sequence[Arrival], service_s: Mapping[str, float], servers: int) -> list[tuple[str, float]]:
    """(class, response time in seconds) per arrival, in arrival order."""
    free_at = [0.0] * servers
    heapq.heapify(free_at)
    out: list[tuple[str, float]] = []
    for a in sorted(arrivals, key=lambda x: x.at):
        start = max(a.at, heapq.heappop(free_at))
        end = start + service_s[a.cls]
        heapq.heappush(free_at, end)
        out.append((a.cls, end - a.at))
    return out


def summarize(responses: Sequence[tuple[str, float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for cls in sorted({c for c, _ in responses}):
        lat_ms = [t * 1e3 for c, t in responses if c == cls]
        out[cls] = {"count": len(lat_ms), "errors": 0, "p50_ms": percentile(lat_ms, 50),
                    "p99_ms": percentile(lat_ms, 99)}  # fmt: skip
    return out
