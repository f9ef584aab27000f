#!/usr/bin/env python3
"""Issue 13's first step: corral's workers on TCP vs Unix sockets (`--worker-transport`), same run.

    bench/transport.py [--runs 3] [--duration 10] [--only T1,T2,T3] [--baseline-src DIR]
    bench/transport.py --interleave 12 --duration 4 --warm 1     # all up at once, taking turns

bench/compare measures corral over worker processes the harness starts on ports (`--upstream`), so it
cannot put them on sockets; here corral supervises its own workers. The tree under test is copied once at
start (others may edit src/ while this runs). Per run, in alternating order:

- T1 (2 plumber workers, bench/app, /fast, wrk -c32) and T2 (the same, -c1): corral `tcp` and `unix`;
  nginx least_conn (bench/peers) over the tcp corral's own worker ports; T2 `direct` (Connection: close).
- T3 (proxy ceiling, c=32, --max-inflight 64): one nginx backend (one worker process) listening on 4
  ports and 4 Unix sockets. `tcp` is corral `--upstream` to the ports, as bench/compare's T3; `unix`
  supervises 4 placeholder workers whose socket is a symlink to one of nginx's sockets. nginx-ka
  (upstream keep-alive) as the reference.
- `--bound` (with --interleave, T1): is T1's gap corral's cost or the one-request-per-worker rule? Adds
  `mi16` (the unix corral with `--max-inflight 16`: what nginx least_conn gives each worker),
  `direct-1` (one wrk -c1 per worker port, Connection: close: one request per worker at a time with
  no proxy at all) and `direct-16` (one wrk -c16 per worker port).
- `--sched` (with --interleave): the workers' scheduling policy (corral's `worker_scheduling`). Adds
  `unix-normal` (the unix corral with `--worker-scheduling normal`); nginx
  and direct then run over workers started the way pm2 would (SCHED_OTHER, by an idle corral `peers`), and
  `nginx-batch` is nginx least_conn over the tcp corral's own (SCHED_BATCH) workers.
- `T4` (with --interleave, not in the default --only): bench/compare's open-loop mix (Poisson /fast 20/s and
  /sleep?ms=2000 1/s, `--t4-duration` s) against the Unix-socket corrals, 4 workers each, the same schedule
  for each in a round: does the workers' scheduling policy move the fast requests' tail?
- `--baseline-src DIR`: one more corral (`base`, on Unix sockets like `unix`) run from DIR (a directory holding
  the corral package, e.g. `git archive REV src | tar -x`, then DIR=src), for a before/after of the data
  path itself; it takes part in T1, T2, T3 and T4.

CPU per request (us): `cpu_us`/`sys_us` of corral's own process (its workers are children, not counted) or
nginx's whole tree; `workers_us` of the R workers serving it; `backend_us` of T3's nginx backend.
`--interleave ROUNDS` starts every target at once (on their own ports) and lets them take turns every few
seconds for ROUNDS rounds: on a shared machine whose load drifts, the per-round ratios to the tcp corral
(the table's "paired" column) are far tighter than whole runs in sequence.

Prints medians with min..max and the load average at each run's start; raw figures go to
bench/out/transport-<timestamp>.json. Ports 19070-19095, 19300-19303; every process by its group.
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
from contextlib import ExitStack, contextmanager
from pathlib import Path

import loadgen
import psutil
from procs import HOST, Child, require_free, wait_http
from proxies import render
from wrk import WrkResult, run_wrk, run_wrk_each

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "bench" / "app" / "plumber.R"
OUT = ROOT / "bench" / "out"
CORRAL_PORT = 19070  # its tcp workers: 19071, 19072
NGINX_PORT = 19080
# tcp workers on 19071-19072, base's on 19078-19079
INTERLEAVE_PORTS = {"tcp": 19070, "unix": 19074, "base": 19077, "tcp-py": 19081, "unix-py": 19085, "mi16": 19088,
                    "peers": 19092, "unix-normal": 19095}  # fmt: skip
NGINX_BATCH_PORT = 19091
T3_PORTS = list(range(19300, 19304))
T4_CLASSES = [loadgen.TrafficClass("fast", "/fast", 20.0), loadgen.TrafficClass("slow", "/sleep?ms=2000", 1.0)]
Results = dict[str, dict[str, dict[str, list[float]]]]  # scenario -> target -> metric -> per-run values
Usage = Callable[[], dict[str, float]]  # named CPU-second counters, read before and after a measurement
Ports = int | tuple[int, ...]  # a tuple: one wrk per port, all at once, the connections shared out


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.results: Results = {}
        self.loads: list[tuple[float, float, float]] = []
        self.src = tmp / "src"
        shutil.copytree(ROOT / "src", self.src)  # the tree under test, frozen for the whole run
        # name -> (tree, extra `corral run` args, extra environment)
        self.variants: dict[str, tuple[Path, list[str], dict[str, str]]] = {
            "tcp": (self.src, ["--worker-transport", "tcp"], {}),
            "unix": (self.src, ["--worker-transport", "unix"], {}),
        }
        if args.sched:
            normal = ["--worker-scheduling", "normal", "--worker-transport", "unix"]
            self.variants["unix-normal"] = (self.src, normal, {})
        if args.baseline_src:
            # on Unix sockets, the default for plumber since issue 13: compare `base` with `unix`
            self.variants["base"] = (Path(args.baseline_src).resolve(), ["--worker-transport", "unix"], {})

    def on_unix(self, variant: str) -> bool:
        return self.variants[variant][1][-1:] == ["unix"]

    def add(self, scenario: str, target: str, **values: float) -> None:
        for metric, value in values.items():
            self.results.setdefault(scenario, {}).setdefault(target, {}).setdefault(metric, []).append(value)

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    # --- processes --------------------------------------------------------------------------------
    @contextmanager
    def corral(
        self, variant: str, args: list[str], ready: str, port: int = CORRAL_PORT, name: str = ""
    ) -> Iterator[Child]:
        src, extra, more_env = self.variants[variant]
        name = name or variant
        if "--upstream" in args:
            extra = []  # workers corral does not start: worker_transport would be a config error
        argv = [sys.executable, "-m", "corral", "run", "--host", HOST, "-p", str(port), *extra, *args]
        env = {**os.environ, "PYTHONPATH": str(src), **more_env}
        require_free([port])
        child = Child(f"corral-{name}", argv, self.tmp / f"corral-{name}.log", env=env, cwd=self.tmp)
        try:
            deadline = time.monotonic() + 120
            while "all workers ready" not in child.log_path.read_text(errors="replace"):
                if not child.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"corral {variant} did not start:\n{child.log_tail()}")
                time.sleep(0.1)
            wait_http(child, port, ready, 30)
            yield child
        finally:
            child.stop(30)

    @contextmanager
    def nginx(
        self, name: str, template: str, ports: list[int], ready: str, listen: int = NGINX_PORT
    ) -> Iterator[Child]:
        """nginx from a bench/peers template: a peer on NGINX_PORT in front of `ports`, or (backend-nginx.conf)
        T3's backend listening on `ports` and as many Unix sockets."""
        prefix = self.tmp / name
        prefix.mkdir(exist_ok=True)
        values = {
            "PREFIX": str(prefix),
            "HOST": HOST,
            "LISTEN": str(listen),
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
            wait_http(child, ports[0] if backend else listen, ready, 30)
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

    def measured(
        self, usage: Usage, port: Ports, path: str, conns: int, headers: tuple[str, ...] = ()
    ) -> tuple[WrkResult, dict[str, float]]:
        """wrk after a warm-up, and each CPU counter of `usage` per request, in microseconds."""
        if isinstance(port, tuple):
            urls = [f"http://{HOST}:{p}{path}" for p in port]
            each = max(conns // len(port), 1)
            run_wrk_each(urls, each, self.args.warm, headers)
            before = usage()
            r = run_wrk_each(urls, each, self.args.duration, headers)
            after = usage()
            return r, {k: (after[k] - before[k]) / max(r.requests, 1) * 1e6 for k in after}
        url = f"http://{HOST}:{port}{path}"
        run_wrk(url, conns, self.args.warm, headers=headers)
        before = usage()
        r = run_wrk(url, conns, self.args.duration, headers=headers)
        after = usage()
        return r, {k: (after[k] - before[k]) / max(r.requests, 1) * 1e6 for k in after}

    def t1_t2(self, target: str, port: int, usage: Usage) -> None:
        if "T1" in self.args.only:
            r, cpu = self.measured(usage, port, "/fast", 32)
            self.add("T1", target, rps=r.rps, p50_ms=r.p50_ms, p99_ms=r.p99_ms, failed=r.failed, **cpu)
            self.log(f"  T1 {target}: {r.rps:.0f} req/s, p99 {r.p99_ms:.1f} ms, failed {r.failed}, {_us(cpu)}")
        if "T2" in self.args.only:
            r = self.wrk(port, "/fast", 1)
            self.add("T2", target, p50_ms=r.p50_ms, p99_ms=r.p99_ms)
            self.log(f"  T2 {target}: p50 {r.p50_ms:.3f} ms, p99 {r.p99_ms:.3f} ms")

    # --- scenarios ----------------------------------------------------------------------------------
    def plumber_run(self, order: list[str]) -> None:
        for variant in order:
            with self.corral(variant, ["-w", "2", "--health-path", "/fast", str(APP)], "/fast") as c:
                self.t1_t2(variant, CORRAL_PORT, lambda c=c: cpu(c.pid, workers=c.pid))
                if variant == "tcp":  # the peer and the direct figure over these same R processes
                    workers = [CORRAL_PORT + 1, CORRAL_PORT + 2]
                    with self.nginx("nginx", "nginx-least-conn.conf", workers, "/fast") as n:
                        self.t1_t2("nginx", NGINX_PORT, lambda n=n, c=c: cpu(n.pid, tree=True, workers=c.pid))
                    if "T2" in self.args.only:
                        r = self.wrk(workers[0], "/fast", 1, headers=("Connection: close",))
                        self.add("T2", "direct", p50_ms=r.p50_ms, p99_ms=r.p99_ms)
                        self.log(f"  T2 direct: p50 {r.p50_ms:.3f} ms")

    def t3_run(self, order: list[str]) -> None:
        spec = f"{HOST}:{T3_PORTS[0]}-{T3_PORTS[-1]}"
        link = f'ln -s {self.tmp}/backend-"$CORRAL_WORKER_INDEX".sock "$CORRAL_WORKER_SOCKET" && exec sleep 86400'
        with self.nginx("backend", "backend-nginx.conf", T3_PORTS, "/") as b:
            r = self.wrk(T3_PORTS[0], "/", 32)
            self.add("T3", "direct", rps=r.rps, p99_ms=r.p99_ms)
            for variant in [*order, "nginx-ka"]:
                if variant == "nginx-ka":
                    with self.nginx("nginx-ka", "nginx-keepalive.conf", T3_PORTS, "/") as n:
                        r, use = self.measured(lambda n=n: cpu(n.pid, tree=True, backend=b.pid), NGINX_PORT, "/", 32)
                elif self.on_unix(variant):
                    args = ["-w", "4", "--max-inflight", "64", "--health-path", "/", "--", "sh", "-c", link]
                    with self.corral(variant, args, "/") as c:
                        r, use = self.measured(lambda c=c: cpu(c.pid, backend=b.pid), CORRAL_PORT, "/", 32)
                else:
                    args = ["--upstream", spec, "--max-inflight", "64", "--health-path", "/"]
                    with self.corral(variant, args, "/") as c:
                        r, use = self.measured(lambda c=c: cpu(c.pid, backend=b.pid), CORRAL_PORT, "/", 32)
                self.add("T3", variant, rps=r.rps, p99_ms=r.p99_ms, failed=r.failed, **use)
                self.log(f"  T3 {variant}: {r.rps:.0f} req/s, p99 {r.p99_ms:.2f} ms, {_us(use)}")

    # --- interleaved: every target up at once, short measurements taking turns --------------------------
    def interleaved(self) -> None:
        """Drift in the machine's load (others' tests) hits every target alike when they take turns every
        few seconds; each round's figures are then compared with the tcp corral's of the same round."""
        if {"T1", "T2"} & set(self.args.only):
            with ExitStack() as stack:
                targets: dict[str, tuple[Ports, Usage]] = {}
                pids: dict[str, int] = {}
                plumber = ["-w", "2", "--health-path", "/fast", str(APP)]
                for v in self.variants:
                    port = INTERLEAVE_PORTS[v]
                    c = stack.enter_context(self.corral(v, plumber, "/fast", port))
                    pids[v] = c.pid
                    targets[v] = (port, lambda pid=c.pid: cpu(pid, workers=pid))
                workers = [INTERLEAVE_PORTS["tcp"] + 1, INTERLEAVE_PORTS["tcp"] + 2]
                owner = pids["tcp"]  # whose R workers nginx and direct load
                if self.args.sched:  # nginx over corral's batch workers, and the peers over workers as pm2 starts them
                    b = stack.enter_context(
                        self.nginx("nginx-batch", "nginx-least-conn.conf", workers, "/fast", NGINX_BATCH_PORT)
                    )
                    targets["nginx-batch"] = (NGINX_BATCH_PORT, lambda: cpu(b.pid, tree=True, workers=pids["tcp"]))
                    normal = ["--worker-scheduling", "normal", *plumber]
                    peers = stack.enter_context(self.corral("tcp", normal, "/fast", INTERLEAVE_PORTS["peers"], "peers"))
                    owner = peers.pid
                    workers = [INTERLEAVE_PORTS["peers"] + 1, INTERLEAVE_PORTS["peers"] + 2]
                n = stack.enter_context(self.nginx("nginx", "nginx-least-conn.conf", workers, "/fast"))
                targets["nginx"] = (NGINX_PORT, lambda: cpu(n.pid, tree=True, workers=owner))
                if "T1" in self.args.only:
                    if self.args.bound:
                        targets.update(self.bound_targets(stack, tuple(workers), owner))
                    self.rotate("T1", targets, "/fast", 32)
                    for name in ("mi16", "direct-1", "direct-16"):
                        targets.pop(name, None)
                if "T2" in self.args.only:
                    self.rotate("T2", {**targets, "direct": (workers[0], lambda: {})}, "/fast", 1)
        if "T3" in self.args.only:
            self.t3_interleaved()
        if "T4" in self.args.only:
            self.t4_interleaved()

    def bound_targets(self, stack: ExitStack, workers: tuple[int, ...], owner: int) -> dict[str, tuple[Ports, Usage]]:
        """T1's bound: corral allowed nginx's per-worker concurrency, and the workers with no proxy at all."""
        args = ["-w", "2", "--max-inflight", "16", "--health-path", "/fast", str(APP)]
        port = INTERLEAVE_PORTS["mi16"]
        c = stack.enter_context(self.corral("unix", args, "/fast", port, name="mi16"))
        direct: Usage = lambda: cpu(owner, workers=owner)  # noqa: E731 (the R workers of an idle corral)
        return {
            "mi16": (port, lambda: cpu(c.pid, workers=c.pid)),
            "direct-1": (workers, direct),
            "direct-16": (workers, direct),
        }

    def t3_interleaved(self) -> None:
        spec = f"{HOST}:{T3_PORTS[0]}-{T3_PORTS[-1]}"
        link = f'ln -s {self.tmp}/backend-"$CORRAL_WORKER_INDEX".sock "$CORRAL_WORKER_SOCKET" && exec sleep 86400'
        with ExitStack() as stack:
            b = stack.enter_context(self.nginx("backend", "backend-nginx.conf", T3_PORTS, "/"))
            targets: dict[str, tuple[int, Usage]] = {}
            for v in self.variants:
                if self.on_unix(v):
                    args = ["-w", "4", "--max-inflight", "64", "--health-path", "/", "--", "sh", "-c", link]
                else:
                    args = ["--upstream", spec, "--max-inflight", "64", "--health-path", "/"]
                c = stack.enter_context(self.corral(v, args, "/", INTERLEAVE_PORTS[v]))
                targets[v] = (INTERLEAVE_PORTS[v], lambda pid=c.pid: cpu(pid, backend=b.pid))
            n = stack.enter_context(self.nginx("nginx-ka", "nginx-keepalive.conf", T3_PORTS, "/"))
            targets["nginx-ka"] = (NGINX_PORT, lambda: cpu(n.pid, tree=True, backend=b.pid))
            self.rotate("T3", targets, "/", 32)

    def t4_interleaved(self) -> None:
        with ExitStack() as stack:
            ports: dict[str, int] = {}
            for v in self.variants:
                if self.on_unix(v):
                    port = INTERLEAVE_PORTS[v]
                    stack.enter_context(self.corral(v, ["-w", "4", "--health-path", "/fast", str(APP)], "/fast", port))
                    ports[v] = port
            names = list(ports)
            for r in range(self.args.interleave):
                schedule = loadgen.poisson_schedule(T4_CLASSES, self.args.t4_duration, 4000 + r)
                self.log(f"T4 round {r + 1}/{self.args.interleave}, load average {os.getloadavg()[0]:.2f}")
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    s = loadgen.summarize(loadgen.run(HOST, ports[name], schedule))
                    fast, slow = s["fast"], s.get("slow", {})
                    errors = fast["errors"] + slow.get("errors", 0)
                    self.add("T4", name, fast_p50_ms=fast["p50_ms"], fast_p99_ms=fast["p99_ms"],
                             slow_p99_ms=slow.get("p99_ms", 0.0), errors=errors)  # fmt: skip
                    p50, p99 = fast["p50_ms"], fast["p99_ms"]
                    self.log(f"  T4 {name}: fast p50 {p50:.2f} ms, p99 {p99:.2f} ms, errors {errors}")

    def rotate(self, scenario: str, targets: dict[str, tuple[Ports, Usage]], path: str, conns: int) -> None:
        names = list(targets)
        for r in range(self.args.interleave):
            k = r % len(names)
            load = os.getloadavg()
            self.loads.append(load)
            self.log(f"{scenario} round {r + 1}/{self.args.interleave}, load average {load[0]:.2f}")
            for name in names[k:] + names[:k]:
                port, usage = targets[name]
                # Straight to plumber, as a proxy without keep-alive does (keep-alive would hit the 40 ms stall).
                close = ("Connection: close",) if name.startswith("direct") else ()
                n = 2 if name == "direct-1" else conns  # measured() shares them out: one per worker port
                res, use = self.measured(usage, port, path, n, close)
                self.add(scenario, name, rps=res.rps, p50_ms=res.p50_ms, p99_ms=res.p99_ms, failed=res.failed, **use)
                self.log(f"  {scenario} {name}: {res.rps:.0f} req/s, p50 {res.p50_ms:.3f} ms, {_us(use)}")

    def run(self) -> None:
        if self.args.interleave:
            self.interleaved()
            return
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
        lines += [
            "| scenario | metric | target | median | min..max | vs tcp (medians) | paired: median (min..max) of "
            "per-run ratios to tcp |",
            "|---|---|---|---|---|---|---|",
        ]
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
                        f"| {scenario} | {metric} | {target} | {med:.3f} | {min(v):.3f}..{max(v):.3f} | {ratio} "
                        f"| {_paired(v, tcp)} |"
                    )
        return "\n".join(lines)


def cpu(pid: int, tree: bool = False, workers: int | None = None, backend: int | None = None) -> dict[str, float]:
    """CPU seconds: `cpu_us` and `sys_us` of the proxy (its own process, or with tree its whole process tree:
    nginx's workers), `workers_us` of the processes under `workers` (corral's R workers, not counted as
    corral's), `backend_us` of T3's nginx backend tree. measured() turns them into us per request."""
    procs = _tree(pid) if tree else [psutil.Process(pid)]
    times = [p.cpu_times() for p in procs]
    out = {"cpu_us": sum(t.user + t.system for t in times), "sys_us": sum(t.system for t in times)}
    if workers is not None:
        out["workers_us"] = sum(_total(p) for p in _tree(workers)[1:])
    if backend is not None:
        out["backend_us"] = sum(_total(p) for p in _tree(backend))
    return out


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _total(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return t.user + t.system


def _paired(values: list[float], tcp: list[float] | None) -> str:
    """Each run's (or round's) value over the tcp corral's of the same run: load drift cancels out."""
    if not tcp or len(tcp) != len(values) or not all(tcp):
        return ""
    ratios = [v / t for v, t in zip(values, tcp, strict=True)]
    return f"{statistics.median(ratios):.3f} ({min(ratios):.3f}..{max(ratios):.3f})"


def _us(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warm", type=float, default=3.0)
    ap.add_argument("--only", default="T1,T2,T3")
    ap.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="all targets up at once, taking turns for ROUNDS rounds (use a short --duration)",
    )
    ap.add_argument(
        "--bound",
        action="store_true",
        help="with --interleave, T1: also corral --max-inflight 16 and the workers loaded directly",
    )
    ap.add_argument("--t4-duration", type=float, default=20.0, help="seconds of T4's schedule per measurement")
    ap.add_argument(
        "--sched",
        action="store_true",
        help="with --interleave: unix-normal (--worker-scheduling normal), peers over SCHED_OTHER workers",
    )
    ap.add_argument("--baseline-src", help="a directory holding an older corral package, run as `base` (unix)")
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
    out.write_text(
        json.dumps(
            {"args": {**vars(args), "only": sorted(args.only)}, "loads": bench.loads, "results": bench.results},
            indent=1,
        )
    )
    print(f"\nraw: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
