"""Per-client fair queueing: whose request a job is, the lane that serves clients in turn, and what each uses.

One busy client (a batch job, a retry storm, a dashboard with many tiles) must not make every other client
wait behind all of its requests. So each request carries a *key* (`fair_key`: the client's address, a
header's value, or nothing), and within each of the scheduler's class lanes the keys take turns:

* `FairLane`: FIFO per key, keys served by deficit round robin (Shreedhar & Varghese) weighted by each
  request's predicted cost (costs.py), so a client of cheap requests gets as much worker time as one of dear
  ones, not as many requests. A key that was idle goes ahead of the busy ones with one quantum (FQ-CoDel's
  "new flows", in arrival order among themselves): a client that sends now and then is served next, not
  after a turn of everyone else. A key whose queue empties is dropped: memory follows what is queued.
* `KeyCounter`: per-key totals over a sliding window (arrivals, worker seconds), bounded, for the reserve
  kept for other clients and for what status shows.
* `ip_key`, `header_key`, `origin`, `shown`: the key of an address or a header value, the client a trusted
  proxy forwarded for, and a key as status shows it (truncated and hashed, never a whole address).

Pure: no sockets, no clock (callers pass `now`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
from collections import deque
from collections.abc import Callable, Hashable
from typing import Protocol

MAX_KEY_BYTES = 64  # a longer header value is keyed by its digest: bounded memory whatever clients send
MAX_COUNTED_KEYS = 4096  # keys a KeyCounter tracks per window; the rest share one entry
OTHERS = "(other clients)"  # that shared entry
_SALT = os.urandom(16)  # per process: a shown hash cannot be reversed by hashing every IPv4 address


class FairJob(Protocol):
    """What a lane needs of a queued request (the scheduler's Job)."""

    sched_state: int
    queued_at: float
    cost: float  # predicted seconds; 0 when unknown
    fair_key: Hashable


class FairLane:
    """One class lane of the queue: FIFO per key, keys in deficit-round-robin order.

    Keys that were idle wait in `fresh` (FIFO), served before the busy ones in `ring` until they have spent
    their first quantum (FQ-CoDel's new and old flows). `head()` names the job to dispatch next and leaves its
    key at the front of its deque; `pop_head()` takes it once it has a worker. Jobs the scheduler dropped
    (cancelled, expired) stay in their key's deque until they reach its front, as in the plain FIFO lane.
    `quantum` (seconds of worker time a key earns per turn) is set by the scheduler from its learned mean
    service time; a job of unknown cost costs one quantum.
    """

    __slots__ = ("_charge", "_from", "deficit", "fresh", "live", "quantum", "queues", "ring")

    def __init__(self, live: int, quantum: float = 0.05) -> None:
        self.live = live  # the scheduler's QUEUED state: a job in any other state is dropped when met
        self.quantum = quantum
        self.queues: dict[Hashable, deque[FairJob]] = {}  # a key is here exactly while it is in fresh or ring
        self.fresh: deque[Hashable] = deque()  # keys that were idle, in arrival order: first turn, served first
        self.ring: deque[Hashable] = deque()  # busy keys in turn order; ring[0] is served next
        self.deficit: dict[Hashable, float] = {}  # worker seconds each key may still spend this turn
        self._charge = 0.0  # what the job head() returned costs its key
        self._from = self.ring  # the deque whose front key head() returned

    def push(self, job: FairJob) -> None:
        q = self.queues.get(job.fair_key)
        if q is None:
            self._new_key(job.fair_key).append(job)
        else:
            q.append(job)

    def push_front(self, job: FairJob) -> None:
        """A job whose worker could not be reached: first in its key's line."""
        q = self.queues.get(job.fair_key)
        if q is None:
            self._new_key(job.fair_key).append(job)
        else:
            q.appendleft(job)

    def _new_key(self, key: Hashable) -> deque[FairJob]:
        # An idle key gets one quantum ahead of the busy ones: a client that sends now and then is not queued
        # behind a turn of every busy one. A busy key never comes here: its deque stays until it is empty.
        q = self.queues[key] = deque()
        self.fresh.append(key)
        self.deficit[key] = self.quantum
        return q

    def ahead(self, job: FairJob) -> bool:
        """Whether a job of the same key waits in this lane (order stays FIFO within a key)."""
        q = self.queues.get(job.fair_key)
        if not q:
            return False
        live = self.live
        while q and q[0].sched_state != live:
            q.popleft()
        return bool(q)  # an emptied deque stays until head() meets its key

    def __bool__(self) -> bool:
        return bool(self.queues)

    def head(self, now: float, may_take: Callable[[Hashable, float], bool] | None = None) -> FairJob | None:
        """The job to dispatch next, or None. Keys `may_take` refuses (the reserve kept for other clients) are
        passed over this time, without losing what they earned."""
        if self.fresh:
            job = self._fresh_head(now, may_take)
            if job is not None:
                return job
        # The busy keys in turn (inline, not a call of its own: this runs on every dispatch).
        ring, deficit, quantum = self.ring, self.deficit, self.quantum
        skipped = 0  # refused keys in a row
        unserved = 0  # keys that earned a quantum in a row without being able to spend it
        live = self.live
        while ring:
            key = ring[0]
            q = self.queues[key]
            while q and q[0].sched_state != live:
                q.popleft()
            if not q:
                self._forget(ring.popleft())
                continue
            if may_take is not None and not may_take(key, now):
                skipped += 1
                if skipped >= len(ring):
                    return None
                ring.rotate(-1)
                continue
            skipped = 0
            job = q[0]
            cost = job.cost or quantum
            if len(ring) == 1 and not self.fresh:  # alone: turns would only add bookkeeping
                self._charge, self._from = 0.0, ring
                return job
            if deficit[key] >= cost:
                self._charge, self._from = cost, ring
                return job
            unserved += 1
            if unserved > len(ring):
                self._skip_rounds(may_take, now)  # every key visited, none could spend: jump ahead
                unserved = 0
            deficit[key] += quantum
            ring.rotate(-1)
        return None

    def _fresh_head(self, now: float, may_take: Callable[[Hashable, float], bool] | None) -> FairJob | None:
        fresh, deficit = self.fresh, self.deficit
        skipped = 0
        while len(fresh) > skipped:
            key = fresh[0]
            q = self._trimmed(key)
            if not q:
                self._forget(fresh.popleft())
                continue
            if may_take is not None and not may_take(key, now):
                skipped += 1
                fresh.rotate(-1)
                continue
            job = q[0]
            cost = job.cost or self.quantum
            if deficit[key] >= cost:
                self._charge, self._from = cost, fresh
                return job
            deficit[key] += self.quantum  # its first turn is spent: it joins the busy keys
            self.ring.append(fresh.popleft())
        return None

    def _trimmed(self, key: Hashable) -> deque[FairJob]:
        q = self.queues[key]
        live = self.live
        while q and q[0].sched_state != live:
            q.popleft()
        return q

    def _skip_rounds(self, may_take: Callable[[Hashable, float], bool] | None, now: float) -> None:
        """Add at once the quanta of the rounds in which no key could have been served (a dear job among cheap
        ones would otherwise take cost / quantum laps of the ring)."""
        quantum, deficit = self.quantum, self.deficit
        eligible = [k for k in self.ring if may_take is None or may_take(k, now)]
        rounds = math.inf
        for key in eligible:
            q = self._trimmed(key)
            if q:
                rounds = min(rounds, math.ceil(((q[0].cost or quantum) - deficit[key]) / quantum))
        if 1 < rounds < math.inf:
            for key in eligible:
                deficit[key] += (rounds - 1) * quantum

    def pop_head(self, job: FairJob) -> None:
        """The job head() returned has a worker: it leaves, and its key pays for it."""
        key = job.fair_key
        q = self.queues[key]
        q.popleft()
        if q:
            self.deficit[key] -= self._charge
            return
        keys = self._from
        if keys and keys[0] == key:
            self._forget(keys.popleft())
        else:
            self._drop(key)

    def _forget(self, key: Hashable) -> None:
        """A key with nothing queued: gone (it starts afresh when it sends again)."""
        del self.queues[key]
        del self.deficit[key]

    def _drop(self, key: Hashable) -> None:
        (self.fresh if key in self.fresh else self.ring).remove(key)
        self._forget(key)

    def expire(self, limit: float) -> list[FairJob]:
        """Live jobs queued at or before `limit` (each key's deque is in arrival order); empty keys go."""
        out: list[FairJob] = []
        live = self.live
        emptied = False
        for q in self.queues.values():
            while q and (q[0].sched_state != live or q[0].queued_at <= limit):
                job = q.popleft()
                if job.sched_state == live:
                    out.append(job)
            emptied = emptied or not q
        if emptied:
            gone = {k for k, q in self.queues.items() if not q}
            for keys in (self.fresh, self.ring):  # in place: one pass, however many keys went
                kept = [k for k in keys if k not in gone]
                keys.clear()
                keys.extend(kept)
            for key in gone:
                self._forget(key)
        return out

    def oldest(self) -> float | None:
        """When the longest-waiting live job was queued (None: nothing queued)."""
        live = self.live
        oldest: float | None = None
        for q in self.queues.values():
            while q and q[0].sched_state != live:
                q.popleft()
            if q and (oldest is None or q[0].queued_at < oldest):
                oldest = q[0].queued_at
        return oldest


class KeyCounter:
    """Per-key totals over the last one to two `window`s: the current window and the one before it.

    Bounded: at most MAX_COUNTED_KEYS keys per window, the rest are summed under OTHERS. Reads roll the
    windows forward too, so a total never includes what is older than two windows.
    """

    __slots__ = ("cur", "cur_total", "ends", "max_keys", "prev", "prev_total", "window")

    def __init__(self, window: float, max_keys: int = MAX_COUNTED_KEYS) -> None:
        self.window = window
        self.max_keys = max_keys
        self.cur: dict[Hashable, float] = {}
        self.prev: dict[Hashable, float] = {}
        self.cur_total = 0.0
        self.prev_total = 0.0
        self.ends = -math.inf  # the first add() starts the first window

    def add(self, key: Hashable, amount: float, now: float) -> bool:
        """Count `amount` for `key`; True when the keys counted may have changed (a new window, or a key new to
        this one), so a caller that watches how many there are knows when to look (several())."""
        rolled = now >= self.ends
        if rolled:
            self._roll(now)
        cur = self.cur
        n = cur.get(key)
        if n is None:
            if len(cur) >= self.max_keys:
                key = OTHERS
            cur[key] = cur.get(key, 0.0) + amount
            self.cur_total += amount
            return True
        cur[key] = n + amount
        self.cur_total += amount
        return rolled

    def several(self, now: float) -> bool:
        """Whether two keys or more were counted in the window (O(1))."""
        if now >= self.ends:
            self._roll(now)
        cur, prev = self.cur, self.prev
        if len(cur) > 1 or len(prev) > 1:
            return True
        return bool(cur) and bool(prev) and next(iter(cur)) not in prev

    def _roll(self, now: float) -> None:
        recent = now < self.ends + self.window  # the window that just ended is still the previous one
        self.prev, self.prev_total = (self.cur, self.cur_total) if recent else ({}, 0.0)
        self.cur, self.cur_total = {}, 0.0
        self.ends = now + self.window

    def of(self, key: Hashable, now: float) -> float:
        if now >= self.ends:
            self._roll(now)
        return self.cur.get(key, 0.0) + self.prev.get(key, 0.0)

    def total(self, now: float) -> float:
        if now >= self.ends:
            self._roll(now)
        return self.cur_total + self.prev_total

    def others(self, key: Hashable, now: float) -> float:
        """The total of every key but `key` (one call: the scheduler asks on every dispatch of a busy key)."""
        if now >= self.ends:
            self._roll(now)
        return self.cur_total + self.prev_total - self.cur.get(key, 0.0) - self.prev.get(key, 0.0)

    def top(self, n: int, now: float) -> list[tuple[Hashable, float]]:
        """The n largest keys, largest first."""
        self.total(now)
        merged = dict(self.prev)
        for key, v in self.cur.items():
            merged[key] = merged.get(key, 0.0) + v
        return sorted(merged.items(), key=lambda kv: -kv[1])[:n]


# --- keys ---------------------------------------------------------------------------------------------------
def header_key(value: bytes) -> bytes:
    """A header value's key: `=` + the value (no address starts with `=`), or its digest when long."""
    if len(value) > MAX_KEY_BYTES:
        value = b"#" + hashlib.blake2b(value, digest_size=16).digest()
    return b"=" + value


def ip_key(addr: bytes, cache: dict[bytes, bytes]) -> bytes:
    """An address's key: an IPv4 address itself; an IPv6 address's /64, which one host holds whole (so it cannot
    take a key per address). `cache` remembers IPv6 answers (the caller bounds it)."""
    if b":" not in addr:
        return addr
    key = cache.get(addr)
    if key is None:
        key = cache[addr] = _v6_key(addr)
    return key


def _v6_key(addr: bytes) -> bytes:
    try:
        ip = ipaddress.ip_address(addr.decode("latin-1"))
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped).encode()
        return str(ipaddress.IPv6Network((ip, 64), strict=False)).encode()
    return str(ip).encode()


def origin(forwarded: bytes, trusted: Callable[[str], bool]) -> bytes:
    """The client behind a trusted proxy: X-Forwarded-For read from the right, past the proxies we trust.

    The right-most entries were appended by proxies corral trusts; the first one from an address it does not
    trust is the client they saw. The left-most entry is whatever the client wrote, so taking it would let a
    client pick a new key per request. All trusted: the left-most.
    """
    hops = [h.strip() for h in forwarded.split(b",")]
    for hop in reversed(hops):
        if hop and not trusted(hop.decode("latin-1")):
            return hop
    return hops[0]


def shown(key: Hashable) -> str:
    """A key as status, metrics and the dashboard show it: never a whole address or header value. The network
    part of an address (or the first characters of a value) and a salted hash that tells keys apart."""
    if key is OTHERS or not isinstance(key, bytes):
        return str(key)
    tag = hashlib.blake2b(key, digest_size=3, key=_SALT).hexdigest()
    text = key.decode("latin-1")
    if text.startswith("="):
        value = text[1:]
        return f"{_part(value)}... #{tag}" if not value.startswith("#") else f"(long value) #{tag}"
    if ":" in text:  # an IPv6 /64: its first 48 bits
        groups = text.split("/")[0].split(":")
        return ":".join(groups[:3]) + ":*/64 #" + tag
    parts = text.split(".")
    if len(parts) == 4:
        return ".".join(parts[:3]) + ".* #" + tag
    return f"{_part(text)}... #{tag}"


def _part(text: str) -> str:
    """The start of a value: at most 4 characters, and never more than half of it."""
    return text[: min(4, len(text) // 2)]
