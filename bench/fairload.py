"""Two clients at once (T8): a busy one that keeps many requests in flight, and a polite one that sends one
request now and then, from two source addresses so that a proxy can tell them apart.

The busy client is closed-loop: `concurrency` connections, each sending its next request as soon as the
previous one is answered. The polite client is open-loop: one request every `period` seconds on a fixed
schedule, each on its own connection, its latency measured from when it was due (no coordinated omission).
Both target 127.0.0.1; the polite client's socket is bound to 127.0.0.2 (loopback: the kernel routes
127/8 to lo), so corral's `fair_key ip` sees two clients. Every run stops by itself after its duration
(plus at most REQUEST_TIMEOUT_S for the last answers).

Standalone:  python3 bench/fairload.py --port 19000 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from loadgen import _content_length
from stats import percentile

BUSY_SOURCE, POLITE_SOURCE = "127.0.0.1", "127.0.0.2"
REQUEST_TIMEOUT_S = 60.0


@dataclass
class Sample:
    due: float  # seconds after the polite phase began
    latency: float  # seconds from due to the whole response
    status: int  # 0: socket error or timeout


@dataclass
class Outcome:
    polite: list[Sample] = field(default_factory=list)
    busy_done: int = 0  # busy requests answered 2xx within the polite phase
    busy_errors: int = 0  # busy requests answered otherwise, or failed, within the polite phase
    busy_latencies: list[float] = field(default_factory=list)  # seconds, within the polite phase
    phase_s: float = 0.0

    def summary(self) -> dict[str, float]:
        ok = [s.latency * 1e3 for s in self.polite if 200 <= s.status < 300]
        nan = float("nan")
        return {
            "polite_count": len(self.polite),
            "polite_errors": sum(not 200 <= s.status < 300 for s in self.polite),
            "polite_p50_ms": percentile(ok, 50) if ok else nan,
            "polite_p99_ms": percentile(ok, 99) if ok else nan,
            "polite_max_ms": max(ok) if ok else nan,
            "busy_rps": self.busy_done / self.phase_s if self.phase_s else nan,
            "busy_errors": self.busy_errors,
            "busy_p50_ms": percentile([x * 1e3 for x in self.busy_latencies], 50) if self.busy_latencies else nan,
        }


async def get(host: str, port: int, path: str, source: str) -> int:
    """One GET on its own connection from `source`; the status (the body is read whole)."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = _content_length(head)
        if length is None:
            await reader.read()
        else:
            await reader.readexactly(length)
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()


async def _timed(host: str, port: int, path: str, source: str) -> int:
    try:
        return await asyncio.wait_for(get(host, port, path, source), REQUEST_TIMEOUT_S)
    except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        return 0


async def _busy_loop(host: str, port: int, path: str, stop: float, phase: list[float], out: Outcome) -> None:
    while time.monotonic() < stop:
        start = time.monotonic()
        status = await _timed(host, port, path, BUSY_SOURCE)
        end = time.monotonic()
        if phase[0] <= end <= phase[1]:
            if 200 <= status < 300:
                out.busy_done += 1
                out.busy_latencies.append(end - start)
            else:
                out.busy_errors += 1
        if status == 0:
            await asyncio.sleep(0.01)  # a refused connection must not spin


async def _polite_one(host: str, port: int, path: str, t0: float, due: float, out: Outcome) -> None:
    delay = t0 + due - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    status = await _timed(host, port, path, POLITE_SOURCE)
    out.polite.append(Sample(due, time.monotonic() - (t0 + due), status))


async def run_async(
    host: str,
    port: int,
    duration: float,
    busy_path: str = "/sleep?ms=100",
    polite_path: str = "/sleep?ms=10",
    concurrency: int = 64,
    period: float = 0.2,
    warm: float = 2.0,
) -> Outcome:
    """The busy client alone for `warm` seconds (its queue fills, costs are learned), then the polite one for
    `duration` seconds next to it. concurrency=0: the polite client alone (its unloaded latency)."""
    out = Outcome(phase_s=duration)
    start = time.monotonic()
    t0 = start + (warm if concurrency else 0.2)
    phase = [t0, t0 + duration]
    stop = t0 + duration
    busy = [asyncio.create_task(_busy_loop(host, port, busy_path, stop, phase, out)) for _ in range(concurrency)]
    n = int(duration / period)
    polite = [asyncio.create_task(_polite_one(host, port, polite_path, t0, i * period, out)) for i in range(n)]
    await asyncio.gather(*polite, *busy)
    out.polite.sort(key=lambda s: s.due)
    return out


def run(host: str, port: int, duration: float, **kw: object) -> Outcome:
    try:
        import uvloop

        return uvloop.run(run_async(host, port, duration, **kw))  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(run_async(host, port, duration, **kw))  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of the polite client (max 600)")
    ap.add_argument("--concurrency", type=int, default=64, help="the busy client's requests in flight (0: none)")
    ap.add_argument("--busy-path", default="/sleep?ms=100")
    ap.add_argument("--polite-path", default="/sleep?ms=10")
    ap.add_argument("--period", type=float, default=0.2)
    args = ap.parse_args(argv)
    if args.host != "127.0.0.1":
        ap.error("load may only target 127.0.0.1")
    out = run(
        args.host,
        args.port,
        min(args.duration, 600.0),
        busy_path=args.busy_path,
        polite_path=args.polite_path,
        concurrency=args.concurrency,
        period=args.period,
    )
    print(json.dumps(out.summary(), indent=2))


if __name__ == "__main__":
    main()
