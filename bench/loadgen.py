"""Open-loop Poisson load generator (T4).

Arrival times are precomputed from a fixed seed so every proxy in a run sees the
exact same request stream.  Each request uses its own connection, so a slow
response never delays the next arrival (no coordinated omission), and latency is
measured from the *scheduled* arrival time.

Usable standalone:  python3 bench/loadgen.py --port 19001 --duration 10 \\
    --class fast:/fast:20 --class slow:/sleep?ms=2000:1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from stats import percentile

REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class TrafficClass:
    name: str
    path: str
    rate: float  # requests per second


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start of the run
    cls: str
    path: str


@dataclass
class Outcome:
    cls: str
    scheduled: float  # seconds after start
    sent_lag: float  # how late the request actually left (event-loop lag)
    latency: float  # seconds from scheduled arrival to full response
    status: int  # HTTP status, 0 on a socket error or timeout
    error: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def poisson_schedule(classes: Sequence[TrafficClass], duration_s: float, seed: int) -> list[Arrival]:
    """Independent Poisson processes per class, merged and sorted by time."""
    rng = random.Random(seed)
    arrivals: list[Arrival] = []
    for c in classes:
        t = rng.expovariate(c.rate)
        while t < duration_s:
            arrivals.append(Arrival(t, c.name, c.path))
            t += rng.expovariate(c.rate)
    arrivals.sort(key=lambda a: a.at)
    return arrivals


async def _http_get(host: str, port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = _content_length(head)
        if length is None:
            await reader.read()  # close-delimited (or chunked) body: read to EOF
        else:
            await reader.readexactly(length)
        return status
    finally:
        writer.close()


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


async def _one(host: str, port: int, a: Arrival, t0: float, timeout: float) -> Outcome:
    delay = t0 + a.at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    sent = time.monotonic()
    try:
        status = await asyncio.wait_for(_http_get(host, port, a.path), timeout)
        error = ""
    except TimeoutError:
        status, error = 0, "timeout"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        status, error = 0, type(exc).__name__
    end = time.monotonic()
    return Outcome(a.cls, a.at, sent - (t0 + a.at), end - (t0 + a.at), status, error)


async def run_schedule(
    host: str, port: int, schedule: Sequence[Arrival], timeout: float = REQUEST_TIMEOUT_S
) -> list[Outcome]:
    t0 = time.monotonic() + 0.2  # let every task get scheduled before the first arrival
    tasks = [asyncio.create_task(_one(host, port, a, t0, timeout)) for a in schedule]
    return list(await asyncio.gather(*tasks))


def run(host: str, port: int, schedule: Sequence[Arrival], timeout: float = REQUEST_TIMEOUT_S) -> list[Outcome]:
    """Blocking wrapper; total time is bounded by the schedule length plus `timeout`."""
    try:
        import uvloop

        return uvloop.run(run_schedule(host, port, schedule, timeout))
    except ImportError:
        return asyncio.run(run_schedule(host, port, schedule, timeout))


def summarize(outcomes: Sequence[Outcome]) -> dict[str, dict[str, float]]:
    """Per class: count, errors (non-2xx or socket), p50/p99 latency in ms of all requests."""
    out: dict[str, dict[str, float]] = {}
    for cls in sorted({o.cls for o in outcomes}):
        mine = [o for o in outcomes if o.cls == cls]
        lat_ms = [o.latency * 1e3 for o in mine]
        out[cls] = {
            "count": len(mine),
            "errors": sum(not o.ok for o in mine),
            "p50_ms": percentile(lat_ms, 50),
            "p99_ms": percentile(lat_ms, 99),
            "max_sent_lag_ms": max(o.sent_lag for o in mine) * 1e3,
        }
    return out


def _parse_class(text: str) -> TrafficClass:
    name, rest = text.split(":", 1)
    path, rate = rest.rsplit(":", 1)
    return TrafficClass(name, path, float(rate))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals (max 600)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--class", dest="classes", action="append", type=_parse_class, required=True,
                    help="NAME:PATH:RATE, repeatable")  # fmt: skip
    ap.add_argument("--raw", action="store_true", help="print every outcome as JSON lines")
    args = ap.parse_args(argv)
    if args.host != "127.0.0.1":
        ap.error("load may only target 127.0.0.1")
    schedule = poisson_schedule(args.classes, min(args.duration, 600.0), args.seed)
    outcomes = run(args.host, args.port, schedule)
    if args.raw:
        for o in outcomes:
            print(json.dumps(asdict(o)))
    print(json.dumps(summarize(outcomes), indent=2))


if __name__ == "__main__":
    main()
