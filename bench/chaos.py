#!/usr/bin/env python3
"""Chaos run (issue 3): corral supervising its own plumber workers under load while workers are SIGKILLed.

    bench/chaos.py [--duration 40] [--every 2] [--workers 4] [--stub]

Load: wrk on 127.0.0.1 (bounded by --duration). Every --every seconds a random worker process of this
corral (a child of the corral process we started, found with psutil) gets SIGKILL. Reports requests
sent, failed (non-2xx + socket errors), kills, and failures per kill. Since issue 23 (part 2) a GET whose worker
is killed from outside goes to another worker: the run passes with 0 failed.
The same kills against nginx and HAProxy over harness-restarted workers are scenario T6 of bench/compare.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from procs import terminate
from wrk import parse, wrk_argv

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "bench" / "app" / "plumber.R"
STUB = ROOT / "tests" / "support" / "stub_worker.py"
PORT = 19050


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--every", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--stub", action="store_true", help="use the Python stub worker instead of plumber")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    if args.stub:
        app, path = ["--", sys.executable, str(STUB), "{port}"], "/sleep?s=0.02"
    else:
        app, path = [str(APP)], "/sleep?ms=20"
    log = open("/tmp/corral-chaos.log", "w")  # noqa: SIM115
    corral = subprocess.Popen(
        [sys.executable, "-m", "corral", "run", "-p", str(PORT), "-w", str(args.workers), *app],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(args.workers)
        rng = random.Random(args.seed)
        wrk = subprocess.Popen(
            wrk_argv(f"http://127.0.0.1:{PORT}{path}", 8, args.duration), stdout=subprocess.PIPE, text=True
        )
        kills = 0
        start = time.monotonic()
        while time.monotonic() - start < args.duration - args.every:
            time.sleep(args.every)
            victims = workers(corral.pid)
            if victims:
                rng.choice(victims).send_signal(signal.SIGKILL)
                kills += 1
        out, _ = wrk.communicate(timeout=args.duration + 30)
        report = parse(out)
        failed = report.failed
        result = {
            "requests": report.requests,
            "failed": failed,
            "kills": kills,
            "failed_per_kill": round(failed / max(kills, 1), 3),
            "duration_s": args.duration,
            "workers": args.workers,
            "app": "stub" if args.stub else "plumber",
        }
        print(json.dumps(result))
        return 0 if failed == 0 else 1  # issue 23: GETs whose worker is killed go to another worker
    finally:
        terminate(corral)


def workers(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.Error:
        return []


def wait_ready(n: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if "all workers ready" in Path("/tmp/corral-chaos.log").read_text():
            return
        time.sleep(0.2)
    raise SystemExit("corral did not become ready")


if __name__ == "__main__":
    sys.exit(main())
