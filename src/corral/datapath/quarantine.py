"""The query-of-death quarantine: a request that keeps killing workers is refused at once. Pure: no I/O but
reading a body corral already holds, the clock passed in.

A request's fingerprint is its method, its path, and a hash of its query and body. A fingerprint has killed a
worker when the worker it was on exited on its own (an exit status, SIGSEGV, SIGABRT, ...: worker.DIED) while
holding it. Once one has killed two workers within DEATH_WINDOW, it is quarantined: requests with that
fingerprint are answered 502 at once, without reaching a worker, for `period` seconds. A request that was sent
again after its worker was killed from outside (pool.redispatch), and whose second worker died too, counts as
both deaths at once: whatever killed the first worker may have been the request (the OOM killer's SIGKILL).
A kill from outside alone counts for nothing: an operator's `kill -9` must not quarantine a route. Nor does a
request with a streamed body (request_buffering off): corral never held the body, so its fingerprint could not
tell one upload from another, and one client's crashing upload would refuse everyone's (pool.upstream_lost).

The hot path pays one test of `entries` per request while nothing is quarantined. While something is, a
request is hashed only when its method and path match a quarantined one (`paths`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Protocol

DEATH_WINDOW = 600.0  # seconds: two deaths of one fingerprint within this long quarantine it
MAX_TRACKED = 1024  # fingerprints with one death remembered (the oldest are forgotten beyond)
MAX_QUARANTINED = 256  # fingerprints quarantined at once (beyond: the one that lifts soonest goes)
HASHED_BODY = 1 << 20  # body bytes hashed; a longer body adds its size (a fingerprint, not a checksum)

Fingerprint = tuple[bytes, bytes, bytes]  # (method, path, digest of query and body)


class Body(Protocol):
    """A request body corral holds whole (buffers.RequestBody)."""

    size: int

    def read(self, pos: int, n: int = ...) -> bytes: ...


class Quarantined(Exception):
    """Refused at once: this request's fingerprint is quarantined (the caller answers 502)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("this request made workers exit; it is refused for a while")
        self.retry_after = retry_after


def fingerprint(method: bytes, target: bytes, body: Body | None, streamed: bool = False) -> Fingerprint:
    """(method, path, digest). `body`: the whole buffered body, or None for none. A streamed body
    (request_buffering off) is gone once sent: such a request's digest covers its query and the fact."""
    path, _, query = target.partition(b"?")
    h = hashlib.blake2b(query, digest_size=16)
    if streamed:
        h.update(b"\0streamed")
    elif body is not None and body.size:
        h.update(b"\0")
        pos = 0
        while pos < min(body.size, HASHED_BODY):
            data = body.read(pos, min(1 << 16, HASHED_BODY - pos))
            if not data:
                break
            h.update(data)
            pos += len(data)
        if body.size > HASHED_BODY:
            h.update(b"\0%d" % body.size)
    return method, path, h.digest()


class Entry:
    __slots__ = ("deaths", "route", "since", "until")

    def __init__(self, route: str, since: float, until: float, deaths: int) -> None:
        self.route = route  # method and path, as logged and shown
        self.since = since
        self.until = until
        self.deaths = deaths  # workers it killed


class Quarantine:
    """Fingerprints that killed workers: one death remembered per fingerprint (within DEATH_WINDOW), and the
    quarantined ones, each until it expires (or `clear()`: a reload, whose new code may not crash)."""

    def __init__(self, period: float) -> None:
        self.period = period  # seconds a fingerprint stays quarantined; 0: never quarantined
        self.deaths: OrderedDict[Fingerprint, float] = OrderedDict()  # fingerprint -> when it killed a worker
        self.entries: dict[Fingerprint, Entry] = {}
        self.paths: set[tuple[bytes, bytes]] = set()  # (method, path) of the entries: hashing only on a match
        self.refused = 0  # requests answered 502 because their fingerprint was quarantined
        self.total = 0  # fingerprints ever quarantined

    def death(self, fp: Fingerprint, now: float, weight: int = 1) -> Entry | None:
        """`fp` killed `weight` workers now. Returns the new entry when that quarantines it (the caller logs
        it, once); None otherwise (or when it is quarantined already)."""
        if not self.period or fp in self.entries:
            return None
        first = self.deaths.pop(fp, None)
        recent = first is not None and now - first <= DEATH_WINDOW
        if weight + (1 if recent else 0) < 2:
            self.deaths[fp] = now
            while len(self.deaths) > MAX_TRACKED:
                self.deaths.popitem(last=False)
            return None
        if len(self.entries) >= MAX_QUARANTINED:
            soonest = min(self.entries, key=lambda k: self.entries[k].until)
            del self.entries[soonest]
        route = f"{fp[0].decode('latin-1')} {fp[1].decode('latin-1')}"
        entry = self.entries[fp] = Entry(route, now, now + self.period, weight + (1 if recent else 0))
        self.total += 1
        self._index()
        return entry

    def check(self, method: bytes, target: bytes, body: Body | None, streamed: bool, now: float) -> None:
        """Raises Quarantined when this request's fingerprint is quarantined. Call only while `entries`."""
        path = target.split(b"?", 1)[0]
        if (method, path) not in self.paths:
            return
        entry = self.entries.get(fingerprint(method, target, body, streamed))
        if entry is None:
            return
        if entry.until <= now:
            self.expire(now)
            return
        self.refused += 1
        raise Quarantined(max(1, int(entry.until - now + 0.999)))

    def expire(self, now: float) -> None:
        gone = [fp for fp, e in self.entries.items() if e.until <= now]
        for fp in gone:
            del self.entries[fp]
        if gone:
            self._index()

    def clear(self) -> int:
        """Lift every quarantine and forget every death; returns how many were lifted."""
        n = len(self.entries)
        self.entries.clear()
        self.deaths.clear()
        self._index()
        return n

    def shown(self, now: float) -> list[tuple[str, str, int, float, float]]:
        """The live entries as (route, short digest, deaths, seconds quarantined, seconds left), soonest-lifted
        last."""
        self.expire(now)
        rows = [(e.route, fp[2].hex()[:12], e.deaths, now - e.since, e.until - now) for fp, e in self.entries.items()]
        rows.sort(key=lambda r: -r[4])
        return rows

    def _index(self) -> None:
        self.paths = {(fp[0], fp[1]) for fp in self.entries}
