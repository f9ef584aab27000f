#!/usr/bin/env python3
"""Issue 13's first step: corral's workers on TCP vs Unix sockets (`--worker-transport`), same run.

    bench/transport.py [--runs 3] [--duration 10] [--only T1,T2,T3] [--baseline-src DIR]

bench/compare measures corral over worker processes the harness starts on ports (`--upstream`), so it
cannot put them on sockets; here corral supervises its own workers. The tree under test is copied once at
start (others may edit src/ while this runs). Per run, in alternating order:

- T1 (2 plumber workers, bench/app, /fast, wrk -c32) and T2 (the same, -c1): corral `tcp` and `unix`;
  nginx least_conn (bench/peers) over the tcp corral's own worker ports; T2 `direct` (Connection: close).
- T3 (proxy ceiling, c=32, --max-inflight 64): one nginx backend (one worker process) listening on 4
  ports and 4 Unix sockets. `tcp` is corral `--upstream` to the ports, as bench/compare's T3; `unix`
  supervises 4 placeholder workers whose socket is a symlink to one of nginx's sockets. nginx-ka
  (upstream keep-alive) as the reference.
- `--baseline-src DIR`: one more corral (`base`, tcp) run from DIR (a directory holding the corral
  package, e.g. `git archive REV src | tar -x`), for a before/after of the data path itself.

CPU per request counts corral's own process (its workers are children, not counted), nginx's whole tree.
Prints medians with min..max and the load average at each run's start; raw figures go to
bench/out/transport-<timestamp>.json. Ports 19070-19090, 19300-19303; every process by its group.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from procs import HOST, Child, require_free, tree_usage, wait_http
from proxies import render
from wrk import WrkResult, run_wrk

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "bench" / "app" / "plumber.R"
OUT = ROOT / "bench" / "out"
CORRAL_PORT = 19070  # its tcp workers: 19071, 19072
NGINX_PORT = 19080
T3_PORTS = list(range(19300, 19304))
Results = dict[str, dict[str, dict[str, list[float]]]]  # scenario -> target -> metric -> per-run values


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.results: Results = {}
        self.loads: list[tuple[float, float, float]] = []
        self.src = tmp / "src"
        shutil.copytree(ROOT / "src", self.src)  # the tree under test, frozen for the whole run
        self.variants: dict[str, tuple[Path, list[str]]] = {
            "tcp": (self.src, ["--worker-transport", "tcp"]),
            "unix": (self.src, ["--worker-transport", "unix"]),
        }
        if args.baseline_src:
            self.variants["base"] = (Path(args.baseline_src).resolve(), [])

    def add(self, scenario: str, target: str, **values: float) -> None:
        for metric, value in values.items():
            self.results.setdefault(scenario, {}).setdefault(target, {}).setdefault(metric, []).append(value)

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    # --- processes --------------------------------------------------------------------------------
    @contextmanager
    def corral(self, variant: str, args: list[str], ready: str) -> Iterator[Child]:
        src, extra = self.variants[variant]
        argv = [sys.executable, "-m", "corral", "run", "--host", HOST, "-p", str(CORRAL_PORT), *extra, *args]
        env = {**os.environ, "PYTHONPATH": str(src)}
        require_free([CORRAL_PORT])
        child = Child(f"corral-{variant}", argv, self.tmp / f"corral-{variant}.log", env=env, cwd=self.tmp)
        try:
            deadline = time.monotonic() + 120
            while "all workers ready" not in child.log_path.read_text(errors="replace"):
                if not child.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"corral {variant} did not start:\n{child.log_tail()}")
                time.sleep(0.1)
            wait_http(child, CORRAL_PORT, ready, 30)
            yield child
        finally:
            child.stop(30)

    @contextmanager
    def nginx(self, name: str, template: str, ports: list[int], ready: str) -> Iterator[Child]:
        """nginx from a bench/peers template: a peer on NGINX_PORT in front of `ports`, or (backend-nginx.conf)
        T3's backend listening on `ports` and as many Unix sockets."""
        prefix = self.tmp / name
        prefix.mkdir(exist_ok=True)
        values = {
            "PREFIX": str(prefix),
            "HOST": HOST,
            "LISTEN": str(NGINX_PORT),
            "SERVERS": "\n".join(f"        server {HOST}:{p};" for p in ports),
            "HEALTH_PATH": ready,
        }
        backend = template == "backend-nginx.conf"
        if backend:
            listens = [f"{HOST}:{p}" for p in ports] + [f"unix:{self.backend_socket(i)}" for i in range(len(ports))]
            values = {"PREFIX": str(prefix), "LISTENS": "\n".join(f"        listen {x};" for x in listens)}
        conf = prefix / "nginx.conf"
        conf.write_text(render(template, values))
        argv = ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
                "-g", f"daemon off; pid {prefix}/nginx.pid;"]  # fmt: skip
        child = Child(name, argv, prefix / "out.log")
        try:
            wait_http(child, ports[0] if backend else NGINX_PORT, ready, 30)
            yield child
        finally:
            child.stop(10)

    def backend_socket(self, i: int) -> Path:
        return self.tmp / f"backend-{i}.sock"

    # --- one measurement ------------------------------------------------------------------------
    def wrk(self, port: int, path: str, conns: int, headers: tuple[str, ...] = ()) -> WrkResult:
        url = f"http://{HOST}:{port}{path}"
        run_wrk(url, conns, self.args.warm, headers=headers)
        return run_wrk(url, conns, self.args.duration, headers=headers)

    def measured(self, usage: Callable[[], float], port: int, path: str, conns: int) -> tuple[WrkResult, float]:
        url = f"http://{HOST}:{port}{path}"
        run_wrk(url, conns, self.args.warm)
        before = usage()
        r = run_wrk(url, conns, self.args.duration)
        cpu_us = (usage() - before) / max(r.requests, 1) * 1e6
        return r, cpu_us

    def t1_t2(self, target: str, port: int, usage: Callable[[], float]) -> None:
        if "T1" in self.args.only:
            r, cpu = self.measured(usage, port, "/fast", 32)
            self.add("T1", target, rps=r.rps, p50_ms=r.p50_ms, p99_ms=r.p99_ms, cpu_us=cpu, failed=r.failed)
            self.log(f"  T1 {target}: {r.rps:.0f} req/s, p99 {r.p99_ms:.1f} ms, {cpu:.0f} us/req, failed {r.failed}")
        if "T2" in self.args.only:
            r = self.wrk(port, "/fast", 1)
            self.add("T2", target, p50_ms=r.p50_ms, p99_ms=r.p99_ms)
            self.log(f"  T2 {target}: p50 {r.p50_ms:.3f} ms, p99 {r.p99_ms:.3f} ms")

    # --- scenarios ----------------------------------------------------------------------------------
    def plumber_run(self, order: list[str]) -> None:
        for variant in order:
            with self.corral(variant, ["-w", "2", "--health-path", "/fast", str(APP)], "/fast") as c:
                self.t1_t2(variant, CORRAL_PORT, lambda c=c: own_cpu(c.pid))
                if variant == "tcp":  # the peer and the direct figure over these same R processes
                    workers = [CORRAL_PORT + 1, CORRAL_PORT + 2]
                    with self.nginx("nginx", "nginx-least-conn.conf", workers, "/fast") as n:
                        self.t1_t2("nginx", NGINX_PORT, lambda n=n: tree_usage(n.pid).cpu_s)
                    if "T2" in self.args.only:
                        r = self.wrk(workers[0], "/fast", 1, headers=("Connection: close",))
                        self.add("T2", "direct", p50_ms=r.p50_ms, p99_ms=r.p99_ms)
                        self.log(f"  T2 direct: p50 {r.p50_ms:.3f} ms")

    def t3_run(self, order: list[str]) -> None:
        spec = f"{HOST}:{T3_PORTS[0]}-{T3_PORTS[-1]}"
        link = f'ln -s {self.tmp}/backend-"$CORRAL_WORKER_INDEX".sock "$CORRAL_WORKER_SOCKET" && exec sleep 86400'
        with self.nginx("backend", "backend-nginx.conf", T3_PORTS, "/"):
            r = self.wrk(T3_PORTS[0], "/", 32)
            self.add("T3", "direct", rps=r.rps, p99_ms=r.p99_ms)
            for variant in [*order, "nginx-ka"]:
                if variant == "nginx-ka":
                    with self.nginx("nginx-ka", "nginx-keepalive.conf", T3_PORTS, "/") as n:
                        r, cpu = self.measured(lambda n=n: tree_usage(n.pid).cpu_s, NGINX_PORT, "/", 32)
                elif variant == "unix":
                    args = ["-w", "4", "--max-inflight", "64", "--health-path", "/", "--", "sh", "-c", link]
                    with self.corral(variant, args, "/") as c:
                        r, cpu = self.measured(lambda c=c: own_cpu(c.pid), CORRAL_PORT, "/", 32)
                else:
                    args = ["--upstream", spec, "--max-inflight", "64", "--health-path", "/"]
                    with self.corral(variant, args, "/") as c:
                        r, cpu = self.measured(lambda c=c: own_cpu(c.pid), CORRAL_PORT, "/", 32)
                self.add("T3", variant, rps=r.rps, p99_ms=r.p99_ms, cpu_us=cpu, failed=r.failed)
                self.log(f"  T3 {variant}: {r.rps:.0f} req/s, p99 {r.p99_ms:.2f} ms, {cpu:.1f} us/req")

    def run(self) -> None:
        names = list(self.variants)
        for run in range(self.args.runs):
            load = os.getloadavg()
            self.loads.append(load)
            k = run % len(names)
            order = names[k:] + names[:k]  # each variant goes first in turn
            self.log(f"run {run + 1}/{self.args.runs}: order {order}, load average {load[0]:.2f} {load[1]:.2f}")
            if {"T1", "T2"} & set(self.args.only):
                self.plumber_run(order)
            if "T3" in self.args.only:
                self.t3_run(order)

    def report(self) -> str:
        lines = [f"load average at each run's start: {', '.join(f'{x[0]:.2f}' for x in self.loads)}", ""]
        lines += ["| scenario | metric | target | median | min..max | vs tcp |", "|---|---|---|---|---|---|"]
        for scenario, targets in self.results.items():
            metrics = sorted({m for t in targets.values() for m in t})
            for metric in metrics:
                tcp = targets.get("tcp", {}).get(metric)
                for target, values in targets.items():
                    if metric not in values:
                        continue
                    v = values[metric]
                    med = statistics.median(v)
                    ratio = f"{med / statistics.median(tcp):.3f}" if tcp and statistics.median(tcp) else ""
                    lines.append(
                        f"| {scenario} | {metric} | {target} | {med:.3f} | {min(v):.3f}..{max(v):.3f} | {ratio} |"
                    )
        return "\n".join(lines)


def own_cpu(pid: int) -> float:
    """corral's own CPU seconds: its R workers are children and not counted."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warm", type=float, default=3.0)
    ap.add_argument("--only", default="T1,T2,T3")
    ap.add_argument("--baseline-src", help="a directory holding an older corral package, run as `base` (tcp)")
    args = ap.parse_args()
    args.only = {s.strip() for s in args.only.split(",")}
    for tool in ("wrk", "nginx", "Rscript"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (bench/compare installs what it needs)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="corral-transport-") as d:
        bench = Bench(args, Path(d))
        bench.run()
        table = bench.report()
    print("\n" + table)
    OUT.mkdir(exist_ok=True)
    out = OUT / f"transport-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": {**vars(args), "only": sorted(args.only)}, "loads": bench.loads,
                               "results": bench.results}, indent=1))
    print(f"\nraw: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
