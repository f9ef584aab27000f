#!/usr/bin/env python3
"""Issue 8's "no regression elsewhere": T1 and T5 with cost-aware dispatch vs `--dispatch fifo`.

    bench/fifo_vs_cost.py [--runs 3] [--duration 8]

corral supervises the bench plumber app itself; the two policies alternate (fifo, cost, fifo, ...) so
drift on this noisy 2-core machine hits both alike. T1: 2 workers, /fast, wrk -c32. T5: N workers in
1, 2, 4, 8 on /sleep?ms=50, wrk -c2N. Prints req/s per run, the medians, and cost / fifo.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from procs import terminate
from wrk import run_wrk

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "bench" / "app" / "plumber.R"
PORT = 19060
LOG = Path("/tmp/corral-fifo-vs-cost.log")


def measure(dispatch: str, workers: int, path: str, conns: int, duration: float) -> float:
    with LOG.open("w") as log:
        corral = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "corral",
                "run",
                "-p",
                str(PORT),
                "-w",
                str(workers),
                "--dispatch",
                dispatch,
                str(APP),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while "all workers ready" not in LOG.read_text():
            if time.monotonic() > deadline or corral.poll() is not None:
                raise SystemExit(f"corral did not start:\n{LOG.read_text()[-2000:]}")
            time.sleep(0.2)
        url = f"http://127.0.0.1:{PORT}{path}"
        run_wrk(url, conns, 2)  # warm-up
        return run_wrk(url, conns, duration).rps
    finally:
        terminate(corral)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0)
    args = ap.parse_args()
    cases = [("T1", 2, "/fast", 32)] + [(f"T5 N={n}", n, "/sleep?ms=50", 2 * n) for n in (1, 2, 4, 8)]
    results: dict[str, dict[str, list[float]]] = {}
    for name, workers, path, conns in cases:
        for run in range(args.runs):
            for dispatch in ("fifo", "cost") if run % 2 == 0 else ("cost", "fifo"):
                rps = measure(dispatch, workers, path, conns, args.duration)
                results.setdefault(name, {}).setdefault(dispatch, []).append(rps)
                print(f"{name} run {run + 1} {dispatch}: {rps:.0f} req/s", flush=True)
    print("\n| case | fifo req/s (median, min..max) | cost req/s | cost / fifo |\n|---|---|---|---|")
    for name, by in results.items():
        f, c = statistics.median(by["fifo"]), statistics.median(by["cost"])
        print(
            f"| {name} | {f:.0f} ({min(by['fifo']):.0f}..{max(by['fifo']):.0f}) "
            f"| {c:.0f} ({min(by['cost']):.0f}..{max(by['cost']):.0f}) | {c / f:.3f} |"
        )
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / f"fifo-vs-cost-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
