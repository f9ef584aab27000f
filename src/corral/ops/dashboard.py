"""The dashboard: one self-contained page (dashboard.html), and the /series history it draws.

The page polls /status and /series. /series is the last minutes of queue depth, busy and ready workers,
request rate and latency quantiles per app, sampled once a second here: enough to draw the charts
without a time-series store.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from importlib import resources
from typing import Any

from . import metrics, snapshot

SERIES_POINTS = 300  # one a second: five minutes of history for the dashboard
QUANTILE_WINDOW = 10  # seconds of history behind each p50/p99 point


@functools.cache
def page() -> bytes:
    """The page, read once: a static shell that sends the token itself (so GET / needs none)."""
    return resources.files("corral.ops").joinpath("dashboard.html").read_bytes()


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile of a non-cumulative bucket histogram (metrics.BUCKETS), linearly interpolated."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    lower = 0.0
    for bound, n in zip(metrics.BUCKETS, counts, strict=False):
        if n and seen + n >= rank:
            return lower + (bound - lower) * (rank - seen) / n
        seen += n
        lower = bound
    return metrics.BUCKETS[-1]  # in the +Inf bucket: the largest finite bound is all we know


class Series:
    """One sample a second per app: enough to draw the last minutes without a time-series store."""

    def __init__(self, corral: snapshot.Fleet, stats: dict[str, metrics.PoolStats]) -> None:
        self.corral = corral
        self.stats = stats
        self.samples: dict[str, deque[tuple[Any, ...]]] = {}

    async def run(self) -> None:
        """Sample every second until cancelled (the admin channel's stop)."""
        while True:
            self.sample()
            await asyncio.sleep(1.0)

    def sample(self) -> None:
        now = time.time()  # the charts' x axis is wall time; the snapshot runs on the scheduler's clock
        for app in snapshot.take(self.corral, time.monotonic(), routes=0).apps:
            st = self.stats[app.name]
            row = (
                now,
                app.queue.depth,
                app.busy,
                app.ready,
                st.total,
                list(st.queue_wait.counts),
                list(st.service.counts),
            )
            self.samples.setdefault(app.name, deque(maxlen=SERIES_POINTS)).append(row)

    def document(self) -> dict[str, Any]:
        apps = {}
        for name, rows in self.samples.items():
            pts = list(rows)
            out: dict[str, list[Any]] = {
                k: []
                for k in ("t", "depth", "busy", "ready", "rate", "wait_p50", "wait_p99", "service_p50", "service_p99")
            }
            for i, (t, depth, busy, ready, total, wait, svc) in enumerate(pts):
                prev = pts[i - 1] if i else None
                back = pts[max(0, i - QUANTILE_WINDOW)]
                out["t"].append(round(t, 3))
                out["depth"].append(depth)
                out["busy"].append(busy)
                out["ready"].append(ready)
                out["rate"].append(round((total - prev[4]) / max(1e-3, t - prev[0]), 2) if prev else 0)
                dw = [a - b for a, b in zip(wait, back[5], strict=True)]
                ds = [a - b for a, b in zip(svc, back[6], strict=True)]
                for key, counts, q in (
                    ("wait_p50", dw, 0.5),
                    ("wait_p99", dw, 0.99),
                    ("service_p50", ds, 0.5),
                    ("service_p99", ds, 0.99),
                ):
                    v = quantile(counts, q)
                    out[key].append(None if v is None else round(v, 6))
            apps[name] = out
        return {"interval_s": 1, "quantile_window_s": QUANTILE_WINDOW, "apps": apps}
