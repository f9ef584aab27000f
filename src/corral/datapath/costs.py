"""What each route costs, learned from live traffic, so the scheduler can tell long requests from short.

A route is method + path with id-like segments collapsed (`GET /users/:id`). Memory is bounded: at
most MAX_ROUTES routes are tracked, the rest share one overflow bucket per method. Each route keeps
an exponentially weighted mean (so a route that changes speed is re-learned within a few dozen
requests) and a small ring of recent samples for p50/p99. Pure: no clock, no I/O.
"""

from __future__ import annotations

import fnmatch
import re

SHORT, LONG = 0, 1
MAX_ROUTES = 512
RING = 128
MIN_SAMPLES = 3  # a route is "unknown" (treated as short) until seen this many times
ALPHA = 0.2  # EWMA weight of the newest sample: ~90 % re-learned after 10 requests

_ID = re.compile(
    r"^(\d+|[0-9a-fA-F]{8,}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|[A-Za-z0-9_-]*\d[A-Za-z0-9_-]*)$"
)


def route_key(method: bytes, target: bytes) -> str:
    """`GET /users/42/orders?x=1` -> `GET /users/:id/orders`."""
    path = target.split(b"?", 1)[0].decode("latin-1")
    segs = [(":id" if _ID.match(s) and len(s) >= 1 and not s.isalpha() else s) for s in path.split("/")]
    return method.decode("latin-1") + " " + ("/".join(segs) or "/")


class RouteStats:
    __slots__ = ("cls", "count", "ewma", "pinned", "ring", "ring_pos")

    def __init__(self) -> None:
        self.count = 0
        self.ewma = 0.0
        self.ring: list[float] = []
        self.ring_pos = 0
        self.cls = SHORT
        self.pinned = False  # class declared in config, not learned

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.ewma = seconds if self.count == 1 else self.ewma + ALPHA * (seconds - self.ewma)
        if len(self.ring) < RING:
            self.ring.append(seconds)
        else:
            self.ring[self.ring_pos] = seconds
            self.ring_pos = (self.ring_pos + 1) % RING

    def percentile(self, q: float) -> float:
        if not self.ring:
            return 0.0
        ordered = sorted(self.ring)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class RouteCosts:
    def __init__(self, long_threshold: float, long_routes: list[str] = (), short_routes: list[str] = ()) -> None:
        self.long_threshold = long_threshold
        self.long_patterns = [route_pattern(p) for p in long_routes]
        self.short_patterns = [route_pattern(p) for p in short_routes]
        self.routes: dict[str, RouteStats] = {}

    def stats(self, key: str) -> RouteStats:
        st = self.routes.get(key)
        if st is None:
            if len(self.routes) >= MAX_ROUTES:
                key = key.split(" ", 1)[0] + " (other)"
                st = self.routes.get(key)
                if st is not None:
                    return st
            st = self.routes[key] = RouteStats()
            self._pin(key, st)
        return st

    def _pin(self, key: str, st: RouteStats) -> None:
        for cls, patterns in ((LONG, self.long_patterns), (SHORT, self.short_patterns)):
            if any(p(key) for p in patterns):
                st.cls, st.pinned = cls, True
                return

    def classify(self, key: str) -> tuple[int, float]:
        """(class, predicted seconds). Unknown routes are short and cost nothing until learned."""
        st = self.stats(key)
        return st.cls, (st.ewma if st.count >= MIN_SAMPLES else 0.0)

    def observe(self, key: str, seconds: float) -> None:
        st = self.stats(key)
        st.observe(seconds)
        if not st.pinned and (st.count >= MIN_SAMPLES or seconds >= self.long_threshold):
            st.cls = LONG if st.ewma >= self.long_threshold else SHORT

    def running_long(self, key: str, elapsed: float) -> None:
        """A request of this route has run `elapsed` seconds and is not done: evidence enough that the
        route is long now, without waiting for MIN_SAMPLES to finish (a cold start would otherwise let
        the first burst of slow requests take every worker). Later samples correct it either way."""
        st = self.stats(key)
        if not st.pinned and st.cls == SHORT and elapsed >= self.long_threshold:
            st.cls = LONG
            st.ewma = max(st.ewma, elapsed)

    def table(self) -> list[dict[str, object]]:
        """Per-route count, p50/p99 and class, for status, the dashboard and metrics."""
        return [
            {
                "route": key,
                "count": st.count,
                "p50_s": round(st.percentile(0.5), 6),
                "p99_s": round(st.percentile(0.99), 6),
                "mean_s": round(st.ewma, 6),
                "class": "long" if st.cls == LONG else "short",
                "declared": st.pinned,
            }
            for key, st in sorted(self.routes.items(), key=lambda kv: -kv[1].count)
        ]


def route_pattern(spec: str):
    """`/model/*` matches any method; `POST /fit*` matches that method only (fnmatch globbing)."""
    method, sep, path = spec.partition(" ")
    if not sep:
        method, path = "*", spec
    return lambda key: fnmatch.fnmatchcase(key, f"{method} {path}")
