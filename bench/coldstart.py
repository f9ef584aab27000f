#!/usr/bin/env python3
"""Issue 23, part 3: what a cold start costs, and what scale to zero saves.

The example plumber app (examples/plumber/plumber.R) under `corral run --min-workers 0 --idle-timeout 3`:
each run waits until the app is idle (scaled to zero, its R process gone), then times one request
from the client (GET /echo), reads corral's own line (`cold start: worker ready in X s`), and times a
second request at once (warm). Next to it, `--direct`: the same R command started by hand, polled every
10 ms until it answers, which is what R itself takes to start and load the app, with no corral.
Memory: the worker's process tree RSS (corral's /status) while it runs, and corral's own RSS, running
and at zero: an app at zero costs the first and nothing else.

    .venv/bin/python bench/coldstart.py              # 7 runs each (about a minute)
    .venv/bin/python bench/coldstart.py --runs 3 --transport tcp

Raw: bench/out/coldstart-YYYYmmdd-HHMMSS.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from corral.cli.verbs import AdminClient, locate

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "examples" / "plumber" / "plumber.R"
PORT = 19300


def corral_argv(port: int, transport: str) -> list[str]:
    return [
        sys.executable, "-m", "corral", "run", "-p", str(port), "--worker-transport", transport,
        "--min-workers", "0", "--max-workers", "1", "--idle-timeout", "3", "--scale-up-wait", "30", str(APP),
    ]  # fmt: skip


def status(port: int) -> dict:
    """GET /status on the admin socket, in process (a `corral status` subprocess takes a second under load)."""
    return AdminClient(locate(port, None)).ok("GET", "/status")


def timed_get(port: int, path: str) -> tuple[float, int, bytes]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=120) as r:
        body = r.read()
        code = r.status
    return time.perf_counter() - t0, code, body


def wait_for(what: str, check, timeout: float = 60.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise SystemExit(f"coldstart: timed out waiting for {what}")
        time.sleep(every)


def run_corral(runs: int, transport: str) -> dict:
    log = Path(tempfile.mkdtemp()) / "corral.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(corral_argv(PORT, transport), stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_for("corral to start", lambda: "all workers ready" in log.read_text(), timeout=120)
        # Memory while it runs: the worker's tree (as /status reads it) and corral's own process.
        worker_rss: list[int] = []  # just after each cold start and one more request
        corral_rss_running = psutil.Process(proc.pid).memory_info().rss
        cold, reported, warm, direct = [], [], [], []
        for i in range(runs):
            wait_for("zero", lambda: status(PORT)["apps"][0]["scale_to_zero"]["state"] == "idle (scaled to zero)")
            if i == 0:
                at_zero = status(PORT)["apps"][0]
                corral_rss_zero = psutil.Process(proc.pid).memory_info().rss
                assert at_zero["workers"] == [], at_zero["workers"]
            time.sleep(0.3)
            took, code, body = timed_get(PORT, f"/echo?msg=cold{i}")
            assert code == 200 and f"cold{i}".encode() in body, body
            cold.append(took)
            warm.append(timed_get(PORT, "/echo?msg=warm")[0])
            worker_rss += [w["rss_bytes"] for w in status(PORT)["apps"][0]["workers"] if w["rss_bytes"]][:1]
            lines = wait_for(
                "the cold start line",
                lambda n=i + 1: (
                    (m := re.findall(r"cold start: worker ready in ([\d.]+) s", log.read_text())) and len(m) >= n and m
                ),
            )
            reported.append(float(lines[i]))
            direct += run_direct(1)  # interleaved: the same machine load for both
        return {
            "transport": transport,
            "client_cold_s": cold,
            "corral_reported_s": reported,
            "client_warm_s": warm,
            "worker_rss_bytes": worker_rss,
            "corral_rss_running_bytes": corral_rss_running,
            "corral_rss_zero_bytes": corral_rss_zero,
            "direct_s": direct,
        }
    finally:
        proc.terminate()
        proc.wait(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_direct(runs: int) -> list[float]:
    """R started by hand, as corral starts a TCP worker (same Rscript expression, in the app's directory),
    polled every 10 ms: R's own start, with no corral."""
    out = []
    for _ in range(runs):
        port = free_port()
        expr = (
            "suppressPackageStartupMessages(library(plumber)); pr <- plumb(file = 'plumber.R'); "
            f"pr$run(host = '127.0.0.1', port = {port}L, docs = FALSE, quiet = TRUE)"
        )
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            ["Rscript", "--no-save", "--no-restore", "-e", expr],
            cwd=APP.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                        s.sendall(b"GET /echo?msg=x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        if s.recv(16).startswith(b"HTTP/1.1 200"):
                            break
                except OSError:
                    pass
                time.sleep(0.01)
            out.append(time.perf_counter() - t0)
        finally:
            proc.terminate()
            proc.wait(30)
        time.sleep(0.3)
    return out


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s ({min(xs):.2f}..{max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    args = ap.parse_args()
    started = dt.datetime.now(dt.UTC)
    load = os.getloadavg()
    res = run_corral(args.runs, args.transport)
    res.update(
        started=started.isoformat(timespec="seconds"),
        load_at_start=load,
        load_at_end=os.getloadavg(),
        nproc=os.cpu_count(),
        python=platform.python_version(),
        kernel=platform.release(),
    )
    out_dir = REPO / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"coldstart-{started:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(res, indent=2))
    mb = 1048576
    print(f"runs {args.runs}, workers on {args.transport}; load {load[0]:.1f} -> {res['load_at_end'][0]:.1f}")
    print(f"| cold request, client (GET /echo from zero) | {summary(res['client_cold_s'])} |")
    print(f"| corral's line: worker ready in | {summary(res['corral_reported_s'])} |")
    print(f"| R alone: spawn to first answer, polled every 10 ms | {summary(res['direct_s'])} |")
    print(f"| warm request right after | {statistics.median(res['client_warm_s']) * 1000:.1f} ms |")
    rss = res["worker_rss_bytes"]
    print(f"| worker RSS while running (tree) | {statistics.median(rss) / mb:.0f} MB ({len(rss)} samples) |")
    print(
        f"| corral's RSS running / at zero | {res['corral_rss_running_bytes'] / mb:.0f} MB / "
        f"{res['corral_rss_zero_bytes'] / mb:.0f} MB |"
    )
    print(f"raw: {path}")


if __name__ == "__main__":
    main()
