#!/usr/bin/env python3
"""corral's data path in one process, with no sockets: what a proxied request costs in Python alone.

The real ClientConnection, edge, Exchange, Pool, scheduler and UpstreamConnection run on the fake
transports and loop of tests/support/exchange_rig.py; this script plays the clients and the workers. Each of
`--clients` keep-alive clients sends GET requests one after another; each of `--workers` workers answers
with a small 200 (`--split`: head and body in two reads, as httpuv sends them). More clients than worker
slots means a queue, as in bench/compare's T1; `--max-inflight 64` with 4 workers is T3's shape.

    bench/hotpath.py --requests 20000 --split               # wall-clock µs per request
    valgrind --tool=callgrind --callgrind-out-file=cg.out bench/hotpath.py --requests 2000
                                                            # where the instructions go (callgrind_annotate)

Run it several times: wall time on a busy machine is a hint, not a figure. callgrind counts instructions
exactly but not their cost (bench/instructions.py counts them per request, start-up excluded).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.exchange_rig import Conn, Rig, ok  # the fakes the exchange tests run on

from corral.config import AppConfig

REQUEST = b"GET /fast HTTP/1.1\r\nHost: bench\r\nUser-Agent: hotpath\r\n\r\n"
BODY = b'{"ok":true}'
HEAD = ok(BODY)[: -len(BODY)]


def run(requests: int, clients: int, workers: int, max_inflight: int, split: bool) -> int:
    """Serve `requests` requests; returns how many responses the clients received."""
    rig = Rig(workers=workers, max_inflight=max_inflight, dispatch=AppConfig().dispatch)
    conns = [Conn(rig) for _ in range(clients)]
    by_protocol = {c.conn: c for c in conns}
    for c in conns:
        c.send(REQUEST)
    answered = received = 0
    while answered < requests:
        busy = [u for u in rig.loop.upstreams if u.exchange is not None]
        if not busy:
            raise SystemExit(f"stalled after {answered} requests: no exchange reached a worker")
        for upstream in busy:
            client = by_protocol[upstream.exchange.client]
            upstream.transport.take()  # the worker read the request
            if split:
                upstream.data_received(HEAD)
                upstream.data_received(BODY)
            else:
                upstream.data_received(HEAD + BODY)
            answered += 1
            received += client.transport.take().count(b"HTTP/1.1 200")
            client.send(REQUEST)
        rig.loop.timers = [t for t in rig.loop.timers if not t.cancelled]
    return received


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-inflight", type=int, default=1)
    ap.add_argument("--split", action="store_true", help="the worker's head and body arrive in two reads")
    args = ap.parse_args()
    run(200, args.clients, args.workers, args.max_inflight, args.split)  # imports and first-call costs
    start = time.perf_counter()
    got = run(args.requests, args.clients, args.workers, args.max_inflight, args.split)
    took = time.perf_counter() - start
    if got < args.requests:
        raise SystemExit(f"only {got} of {args.requests} responses reached the clients")
    print(f"{args.requests} requests, {took / args.requests * 1e6:.1f} µs/request (wall)")


if __name__ == "__main__":
    main()
