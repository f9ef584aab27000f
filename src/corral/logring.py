"""What one log line looks like, and the recent ones kept in memory for `corral logs`.

Every line corral prints or relays (logs.say / warn / WorkerOutput) gets a UTC timestamp, the same
format as the access log's, and colour only when its stream is a terminal and NO_COLOR is not set
(https://no-color.org). A copy goes into a bounded ring that the admin channel serves as
`GET /logs?after=SEQ&n=N&worker=W`: each entry has a sequence number, so a follower asks only for
what is newer than the last one it saw.

No corral imports: the bottom layer, below logs.py which owns the writing.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import IO, Any

DEFAULT_CAPACITY = 2000
MAX_TEXT = 4096  # a longer line is cut in the ring (stdout and log files get it whole): memory is lines x this

# SGR codes: dim timestamps, a colour per worker index, the state words of worker events.
DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"
RED, GREEN, YELLOW, BLUE, MAGENTA, CYAN = (f"\x1b[{n}m" for n in range(31, 37))
WORKER_COLOURS = (CYAN, MAGENTA, BLUE, GREEN, YELLOW, "\x1b[96m", "\x1b[95m", "\x1b[94m")
STATE_COLOURS = {
    "starting": YELLOW,
    "ready": GREEN,
    "draining": MAGENTA,
    "unhealthy": BOLD + RED,
    "stopping": DIM,
    "stopped": RED,
}


def stamp(t: float) -> str:
    """2026-11-26T16:03:12.345Z: UTC with milliseconds, as in the access log."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


_tty: dict[int, bool] = {}


def coloured(stream: IO[str]) -> bool:
    """Colour for this stream: a terminal, and NO_COLOR unset or empty. Decided once per stream."""
    if os.environ.get("NO_COLOR"):
        return False
    key = id(stream)
    got = _tty.get(key)
    if got is None:
        try:
            got = stream.isatty()
        except (OSError, ValueError, AttributeError):
            got = False
        _tty[key] = got
    return got


def paint(text: str, code: str, on: bool) -> str:
    return f"{code}{text}{RESET}" if on and code else text


def worker_colour(index: int) -> str:
    return WORKER_COLOURS[index % len(WORKER_COLOURS)]


class Ring:
    """The last `capacity` lines, each with a sequence number that only grows (0: keep none)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=max(capacity, 0))
        self.seq = 0

    def resize(self, capacity: int) -> None:
        """Keep the newest lines that fit (the server sets log_buffer once the config is read)."""
        self.entries = deque(self.entries, maxlen=max(capacity, 0))

    def add(
        self,
        source: str,
        line: str,
        *,
        app: str | None = None,
        worker: int | None = None,
        stream: str = "stdout",
        when: float | None = None,
    ) -> dict[str, Any] | None:
        """Record one line. `source` is "corral" or a worker's name ("api:2"); a corral line about a
        worker (its state changes) carries that worker's app and index, so `corral logs --worker`
        shows them with its output."""
        if self.entries.maxlen == 0:
            return None
        self.seq += 1
        entry = {
            "seq": self.seq,
            "time": time.time() if when is None else when,
            "source": source,
            "app": app,
            "worker": worker,
            "stream": stream,
            "line": line if len(line) <= MAX_TEXT else line[:MAX_TEXT] + "...",
        }
        self.entries.append(entry)
        return entry

    def read(self, after: int, n: int, worker: str | None = None, app: str | None = None) -> list[dict[str, Any]]:
        """The newest `n` entries with seq > `after` that match: `worker` is an index ("2") or a name
        ("api:2"); `app` an app name."""
        out: list[dict[str, Any]] = []
        if n <= 0:
            return out
        for entry in reversed(self.entries):  # newest first: stop as soon as n are found or `after` is reached
            if entry["seq"] <= after:
                break
            if matches(entry, worker, app):
                out.append(entry)
                if len(out) >= n:
                    break
        out.reverse()
        return out


def matches(entry: dict[str, Any], worker: str | None, app: str | None) -> bool:
    """Whether an entry is of `app` and of `worker` (an index, or APP:INDEX); None matches all."""
    if app is not None and entry["app"] != app:
        return False
    if worker is None:
        return True
    if entry["worker"] is None:
        return False
    wapp, _, index = worker.rpartition(":")
    return str(entry["worker"]) == index and (not wapp or entry["app"] == wapp)


def render(entry: dict[str, Any], colour: bool = False) -> str:
    """An entry as corral printed it: `TIME corral: ...` or `TIME [app:i] ...`."""
    ts = paint(stamp(entry["time"]), DIM, colour)
    if entry["source"] == "corral":
        return f"{ts} {entry['line']}"
    prefix = f"[{entry['source']}]"
    if colour and entry["worker"] is not None:
        prefix = paint(prefix, worker_colour(int(entry["worker"])), True)
    return f"{ts} {prefix} {entry['line']}"
