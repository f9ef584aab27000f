#!/usr/bin/env python3
"""Issue 22, steps 4 and 5: system calls and wake-ups per request, and how corral's cost grows with workers.

    bench/syscalls.py                                 # both parts, 3 runs each (~15 min on 2 cores)
    bench/syscalls.py --only wakeups --setups T1 --strace   # plus a strace -f -c pass per proxy and run
    bench/syscalls.py --only growth --workers 2,8,32

wakeups (step 4), in three set-ups (`--setups`): T1 is bench/compare's T1, 2 plumber workers (bench/app, TCP
ports) and wrk -t1 -c32 on /fast with keep-alive; T1-close the same with `Connection: close` (a client
connection per request: what a connection costs); T3 two trivial workers (T3's nginx backend), where the proxy
is the bottleneck. Each proxy in turn over the same workers: corral (`--upstream`, `--max-inflight 1`), nginx
least_conn, HAProxy `maxconn 1`, and in T3 nginx-ka (least_conn with upstream keep-alive) (bench/peers). Every
proxy runs under `perf stat -D -1 --control fifo:...` counting every `syscalls:sys_enter_*` tracepoint,
`raw_syscalls:sys_enter`, `context-switches` and `task-clock`, inherited by every thread and child (nginx's
workers, HAProxy's threads), enabled only while the measured wrk runs. Per request = count / wrk's completed
requests. Voluntary and involuntary context switches of every thread of the proxy and of the workers come from
/proc/PID/task/*/status, read before and after. Before that window, one as long with perf's counters off gives
CPU and context switches per request undisturbed by the tracepoints ("perf off"). `--strace` adds, per proxy
and run, a second wrk with `strace -f -c` attached to every process of the proxy: strace slows the proxy down
(more events per wake-up, so fewer calls per request), so its counts are a cross-check by another tool.
`perf stat -p PID` counts nothing on this machine's kernel ("<not counted>"), hence perf as the launcher: for
corral in its argv, for nginx and HAProxy through a PATH shim that execs perf in front of the real binary.

growth (step 5): T3's backend (one nginx process answering `return 200` on N ports) as N trivial workers, N in
--workers (2, 8, 32); corral `--upstream` with `--max-inflight 1`; nginx least_conn without upstream keep-alive
(T1's peer), nginx-ka (least_conn with keep-alive: corral keeps its worker connections too), HAProxy
`maxconn 1`; wrk -t1 -c --growth-conns (64: every worker always has a request waiting). Per proxy: req/s, CPU
per request (user and system, the proxy's whole process tree, psutil), the cores it used (CPU s / wall s), the
rate at which it would fill one core (1e6 / CPU us per request), context switches per request; the backend's
CPU per request. `--pin`: the proxy alone on CPU 0 (every thread), wrk and the backend on CPU 1, so that
"cores used" near 1.0 means the proxy filled its core (other processes on the machine still share both).

corral runs from `--rev` (HEAD), extracted with `git archive` as `bench/compare --baseline` does, so edits
others make to src/ meanwhile are not measured; `--rev tree` runs a copy of the working tree taken at start.
`--baseline REV` adds `corral@<sha>` to growth, REV
extracted the same way, in the same rotation. The proxies' order rotates from run to run. Ports:
proxies 19400-19405, plumber 19410-19411, backend 19420-19451. Every process by its PID or process group.
Raw figures: bench/out/syscalls-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import baseline
import environment
import psutil
from baseline import CorralBuild
from procs import HOST, Child, require_free, wait_http
from proxies import CORRAL, HAPROXY, NGINX, NGINX_KA, ProxySpec, RunningProxy, running_backend_nginx, running_proxy
from stats import median
from workers import APP, READY_PATH, WorkerPool
from wrk import WrkResult, run_wrk

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
PLUMBER_PORTS = [19410, 19411]
BACKEND_BASE = 19420
MAX_INFLIGHT_1 = ("--max-inflight", "1")
PERF_EVENTS = "syscalls:sys_enter_*,raw_syscalls:sys_enter,context-switches,task-clock"
PARTS = ("wakeups", "growth")
PROXY_CPU, LOAD_CPU = 0, 1  # --pin: the proxy alone on CPU 0; wrk and the backend (started by us) on CPU 1


def corral_spec(name: str, port: int, src: Path, wrapper: Sequence[str] = ()) -> ProxySpec:
    """corral from `src`, with an optional command in front (perf)."""
    build = CorralBuild((*wrapper, sys.executable, "-m", "corral"), str(src))
    return replace(CORRAL, name=name, port=port, corral_args=MAX_INFLIGHT_1, build=build)


# --- per-process counters -------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """The processes under `pid` (perf's workload: the proxy and, for nginx, its workers)."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def ctx_switches(pids: Sequence[int]) -> tuple[int, int]:
    """(voluntary, involuntary) context switches summed over every thread of `pids`."""
    vol = invol = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                text = (task / "status").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol += int(line.split()[1])
    return vol, invol


def pin(pids: Sequence[int], cpu: int) -> None:
    """Every thread of `pids` onto one CPU (threads they start later inherit it)."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task.name), {cpu})


def cpu_times(pids: Sequence[int]) -> tuple[float, float]:
    """(user, system) CPU seconds summed over `pids`."""
    user = system = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        user += t.user
        system += t.system
    return user, system


@dataclass(frozen=True)
class Snapshot:
    at: float
    user: float
    system: float
    vol: int
    invol: int

    @classmethod
    def take(cls, pids: Sequence[int]) -> Snapshot:
        user, system = cpu_times(pids)
        vol, invol = ctx_switches(pids)
        return cls(time.monotonic(), user, system, vol, invol)

    def per_request(self, after: Snapshot, requests: int) -> dict[str, float]:
        n = max(requests, 1)
        wall = after.at - self.at
        cpu = (after.user - self.user) + (after.system - self.system)
        return {
            "cpu_us": cpu / n * 1e6,
            "user_us": (after.user - self.user) / n * 1e6,
            "sys_us": (after.system - self.system) / n * 1e6,
            "cores": cpu / wall if wall > 0 else 0.0,
            "vol_ctx": (after.vol - self.vol) / n,
            "invol_ctx": (after.invol - self.invol) / n,
        }


# --- perf stat as the proxy's launcher ------------------------------------------------------------


class Perf:
    """`perf stat` started disabled (-D -1) in front of a proxy; enable/disable through its control FIFO."""

    def __init__(self, workdir: Path, name: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.out = workdir / f"perf-{name}.csv"
        self.ctl_path = workdir / f"perf-{name}.ctl"
        self.ack_path = workdir / f"perf-{name}.ack"
        for fifo in (self.ctl_path, self.ack_path):
            with contextlib.suppress(FileNotFoundError):
                fifo.unlink()
            os.mkfifo(fifo)
        self.ctl = -1
        self.ack = -1

    def argv(self) -> list[str]:
        return ["perf", "stat", "-x,", "-o", str(self.out), "-D", "-1",
                "--control", f"fifo:{self.ctl_path},{self.ack_path}", "-e", PERF_EVENTS, "--"]  # fmt: skip

    def shim(self, shimdir: Path, binary: str) -> None:
        """`binary` on a PATH that starts with shimdir runs under this perf."""
        real = shutil.which(binary)
        if real is None:
            raise RuntimeError(f"{binary} not found")
        shimdir.mkdir(parents=True, exist_ok=True)
        script = shimdir / binary
        argv = shlex.join(self.argv())
        script.write_text(f'#!/bin/sh\nexec {argv} {shlex.quote(real)} "$@"\n')
        script.chmod(0o755)

    def _command(self, what: str) -> None:
        if self.ctl < 0:  # perf opened both FIFOs at its start, long before the proxy answered
            self.ctl = os.open(self.ctl_path, os.O_WRONLY | os.O_NONBLOCK)
            self.ack = os.open(self.ack_path, os.O_RDONLY | os.O_NONBLOCK)
        os.write(self.ctl, f"{what}\n".encode())
        ready, _, _ = select.select([self.ack], [], [], 10)
        if not ready or b"ack" not in os.read(self.ack, 64):
            raise RuntimeError(f"perf did not acknowledge {what!r}")

    def enable(self) -> None:
        self._command("enable")

    def disable(self) -> None:
        self._command("disable")

    def close(self) -> None:
        for fd in (self.ctl, self.ack):
            if fd >= 0:
                os.close(fd)
        self.ctl = self.ack = -1

    def counts(self) -> dict[str, float]:
        """event -> count, from perf's -x, output (written when perf exits)."""
        got: dict[str, float] = {}
        for line in self.out.read_text().splitlines():
            fields = line.split(",")
            if line.startswith("#") or len(fields) < 3 or not fields[2]:
                continue
            try:
                value = float(fields[0])
            except ValueError:  # <not counted>, <not supported>
                value = 0.0
            got[fields[2]] = value
        return got


def stop_workload(proxy: RunningProxy, timeout: float = 60) -> None:
    """SIGTERM the proxy under perf (perf's child), then wait for perf to write its counts and exit."""
    for pid in [p.pid for p in psutil.Process(proxy.pid).children()]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    proxy.child.proc.wait(timeout)


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables while a child is started (Child inherits os.environ when given no env)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- strace -c (cross-check) ----------------------------------------------------------------------


def strace_counts(
    pids: Sequence[int], url: str, conns: int, duration: float, out: Path, headers: Sequence[str] = ()
) -> tuple[WrkResult, dict]:
    """wrk with `strace -f -c` attached to `pids`; returns wrk's result and syscall -> calls."""
    argv = ["strace", "-f", "-c", "-q", "-o", str(out)]
    for pid in pids:
        argv += ["-p", str(pid)]
    tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # attached to every thread
        r = run_wrk(url, conns, duration, headers=headers)
    finally:
        tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(30)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
    return r, parse_strace(out.read_text())


def parse_strace(text: str) -> dict[str, float]:
    calls: dict[str, float] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) not in (5, 6) or fields[-1] == "total" or not fields[0][0].isdigit():
            continue
        calls[fields[-1]] = float(fields[3])
    return calls


# --- the bench ------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rotated(items: Sequence[Any], run: int) -> list[Any]:
    k = run % len(items)
    return [*items[k:], *items[:k]]


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        if args.rev == "tree":  # the working tree, frozen for the whole run
            self.src, self.corral_tree = tmp / "tree" / "src", baseline.current_tree()
            shutil.copytree(ROOT / "src", self.src)
        else:  # a commit, extracted as `--baseline` does: what others are editing in src/ meanwhile is not measured
            rev = baseline.prepare(args.rev, tmp)
            assert rev.build.pythonpath is not None
            self.src, self.corral_tree = Path(rev.build.pythonpath), rev.describe()
        self.base: baseline.Revision | None = None
        if args.baseline:  # growth: a second corral from another revision, in the same rotation
            self.base = baseline.prepare(args.baseline, tmp)
        self.results: dict[str, Any] = {"wakeups": {}, "growth": {}}

    def record(self, part: str, key: str, target: str, values: dict[str, Any]) -> None:
        self.results[part].setdefault(key, {}).setdefault(target, []).append(values)

    # --- step 4 ------------------------------------------------------------------------------------
    def wakeup_spec(self, name: str, perf: Perf) -> ProxySpec:
        if name == "corral":
            return corral_spec("corral", 19400, self.src, perf.argv())
        peers = {"nginx": replace(NGINX, port=19401), "nginx-ka": replace(NGINX_KA, port=19402)}
        return peers.get(name) or replace(HAPROXY, port=19403)

    def wakeups(self) -> None:
        haproxy = [] if self.args.no_haproxy else ["haproxy"]
        plumber = [s for s in self.args.setups if s in ("T1", "T1-close")]
        if plumber:
            with WorkerPool(PLUMBER_PORTS, self.tmp / "plumber") as pool:
                workers = [q for p in pool.pids() for q in [p, *descendants(p)]]
                for run in range(self.args.runs):
                    for setup in plumber:
                        for name in rotated(["corral", "nginx", *haproxy], run):
                            self.wakeup_one(setup, name, run, pool.ports, workers)
        if "T3" in self.args.setups:
            ports = [BACKEND_BASE, BACKEND_BASE + 1]
            with running_backend_nginx(ports, self.tmp / "wakeups" / "backend") as backend:
                workers = [backend.pid, *descendants(backend.pid)]
                for run in range(self.args.runs):
                    for name in rotated(["corral", "nginx", "nginx-ka", *haproxy], run):
                        self.wakeup_one("T3", name, run, ports, workers)
        if "T1-own" in self.args.setups:
            for run in range(self.args.runs):
                for transport in rotated(["unix", "tcp"], run):
                    self.wakeup_own(transport, run)

    def wakeup_own(self, transport: str, run: int) -> None:
        """T1-own: corral supervising its own 2 plumber workers (SCHED_BATCH, its defaults), on Unix sockets or
        TCP. perf would count the workers too (they are corral's children), so: strace -f -c on corral alone."""
        name = f"corral-{transport}"
        workdir = self.tmp / "wakeups" / f"own-{name}-run{run}"
        workdir.mkdir(parents=True, exist_ok=True)
        port = 19400
        require_free([port, *PLUMBER_PORTS])
        argv = [sys.executable, "-m", "corral", "run", "--host", HOST, "--port", str(port), "-w", "2",
                "--worker-transport", transport, "--max-inflight", "1", str(APP)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(self.src)}
        load = os.getloadavg()[0]
        log(f"wakeups T1-own run {run + 1}/{self.args.runs}: {name} (load {load:.2f})")
        url = f"http://{HOST}:{port}{READY_PATH}"
        child = Child(name, argv, workdir / "corral.log", env=env, cwd=workdir)
        try:
            wait_http(child, port, READY_PATH, 120)
            run_wrk(url, 32, self.args.warm)
            workers = [q for p in descendants(child.pid) for q in [p, *descendants(p)]]
            before = Snapshot.take([child.pid])
            plain = run_wrk(url, 32, self.args.duration)
            unperturbed = {"rps": plain.rps, **before.per_request(Snapshot.take([child.pid]), plain.requests)}
            before, workers_before = Snapshot.take([child.pid]), Snapshot.take(workers)
            r, calls = strace_counts([child.pid], url, 32, self.args.duration, workdir / "strace.txt")
            after, workers_after = Snapshot.take([child.pid]), Snapshot.take(workers)
        finally:
            child.stop(30)
        per = {k: v / max(r.requests, 1) for k, v in calls.items()}
        values = {
            "load1": load,
            "rps": r.rps,
            "requests": r.requests,
            "failed": r.failed,
            "unperturbed": unperturbed,
            "proxy": before.per_request(after, r.requests),
            "workers": workers_before.per_request(workers_after, r.requests),
            "strace": {"rps": r.rps, "requests": r.requests, "per_request": per},
            "perf": {},
        }
        self.record("wakeups", "T1-own", name, values)
        log(f"  {plain.rps:.0f} req/s, under strace {r.rps:.0f} req/s, {sum(per.values()):.2f} syscalls/req")

    def wakeup_one(self, setup: str, name: str, run: int, ports: list[int], worker_pids: list[int]) -> None:
        """One proxy under perf in one set-up: T1 (plumber, keep-alive clients), T1-close (plumber, a connection
        per request: what a new client connection costs), T3 (2 trivial workers: the proxy is the bottleneck)."""
        workdir = self.tmp / "wakeups" / f"{setup}-{name}-run{run}"
        perf = Perf(workdir, name)
        spec = self.wakeup_spec(name, perf)
        shimdir = workdir / "shim"
        if spec.kind != "corral":
            perf.shim(shimdir, spec.kind)
        load = os.getloadavg()[0]
        log(f"wakeups {setup} run {run + 1}/{self.args.runs}: {name} (load {load:.2f})")
        path = "/" if setup == "T3" else READY_PATH
        url = f"http://{HOST}:{spec.port}{path}"
        headers = ("Connection: close",) if setup == "T1-close" else ()
        with contextlib.ExitStack() as stack:
            with environ(PATH=f"{shimdir}:{os.environ['PATH']}"):
                proxy = stack.enter_context(running_proxy(spec, ports, workdir, path))
            run_wrk(url, 32, self.args.warm, headers=headers)
            pids = descendants(proxy.pid)  # after the warm-up: nginx has forked all its workers by then
            # First with perf's counters off: CPU and context switches undisturbed by the tracepoints.
            before = Snapshot.take(pids)
            plain = run_wrk(url, 32, self.args.duration, headers=headers)
            unperturbed = {"rps": plain.rps, **before.per_request(Snapshot.take(pids), plain.requests)}
            before, workers_before = Snapshot.take(pids), Snapshot.take(worker_pids)
            perf.enable()
            r = run_wrk(url, 32, self.args.duration, headers=headers)
            perf.disable()
            after, workers_after = Snapshot.take(pids), Snapshot.take(worker_pids)
            values: dict[str, Any] = {
                "load1": load,
                "rps": r.rps,
                "requests": r.requests,
                "failed": r.failed,
                "processes": len(pids),
                "threads": sum(len(list(Path(f"/proc/{p}/task").glob("*"))) for p in pids),
                "proxy": before.per_request(after, r.requests),
                "workers": workers_before.per_request(workers_after, r.requests),
                "unperturbed": unperturbed,
            }
            if self.args.strace:
                out = workdir / "strace.txt"
                sr, calls = strace_counts(pids, url, 32, self.args.strace_duration, out, headers)
                values["strace"] = {"rps": sr.rps, "requests": sr.requests,
                                    "per_request": {k: v / max(sr.requests, 1) for k, v in calls.items()}}  # fmt: skip
            stop_workload(proxy)
            perf.close()
        counts = perf.counts()
        counts["task-clock"] = counts.get("task-clock", 0.0) * 1e3  # ms -> us
        values["perf"] = {k.removeprefix("syscalls:sys_enter_"): v / max(r.requests, 1) for k, v in counts.items()}
        self.record("wakeups", setup, name, values)
        pr = values["perf"]
        log(f"  {r.rps:.0f} req/s, {pr.get('raw_syscalls:sys_enter', 0):.2f} syscalls/req, "
            f"{pr.get('context-switches', 0):.3f} cs/req, CPU {values['proxy']['cpu_us']:.0f} us/req")  # fmt: skip

    # --- step 5 ------------------------------------------------------------------------------------
    def growth_specs(self) -> list[ProxySpec]:
        specs = [corral_spec("corral", 19400, self.src)]
        if self.base is not None:
            assert self.base.build.pythonpath is not None
            specs.append(corral_spec(self.base.name, 19405, Path(self.base.build.pythonpath)))
        specs += [replace(NGINX, port=19401), replace(NGINX_KA, port=19402)]
        if not self.args.no_haproxy:
            specs.append(replace(HAPROXY, port=19403))
        return specs

    def growth(self) -> None:
        cpus = os.sched_getaffinity(0)
        if self.args.pin:  # wrk and the backend inherit this process's CPU; each proxy is moved to the other
            os.sched_setaffinity(0, {LOAD_CPU})
        try:
            for n in self.args.workers:
                ports = list(range(BACKEND_BASE, BACKEND_BASE + n))
                with running_backend_nginx(ports, self.tmp / "growth" / f"backend-{n}") as backend:
                    for run in range(self.args.runs):
                        for spec in rotated(self.growth_specs(), run):
                            self.growth_one(spec, n, ports, run, backend.pid)
        finally:
            os.sched_setaffinity(0, cpus)

    def growth_one(self, spec: ProxySpec, n: int, ports: list[int], run: int, backend_pid: int) -> None:
        load = os.getloadavg()[0]
        log(f"growth N={n} run {run + 1}/{self.args.runs}: {spec.name} (load {load:.2f})")
        workdir = self.tmp / "growth" / f"n{n}-{spec.name}-run{run}"
        url = f"http://{HOST}:{spec.port}/"
        conns = self.args.growth_conns
        backend_pids = [backend_pid, *descendants(backend_pid)]
        with running_proxy(spec, ports, workdir, "/") as proxy:
            run_wrk(url, conns, 1.0)
            pids = [proxy.pid, *descendants(proxy.pid)]  # nginx has forked all its workers by now
            if self.args.pin:
                pin(pids, PROXY_CPU)
            run_wrk(url, conns, self.args.warm)
            before, b_before = Snapshot.take(pids), Snapshot.take(backend_pids)
            r = run_wrk(url, conns, self.args.duration)
            after, b_after = Snapshot.take(pids), Snapshot.take(backend_pids)
        per = before.per_request(after, r.requests)
        values = {"load1": load, "rps": r.rps, "requests": r.requests, "failed": r.failed, "p50_ms": r.p50_ms,
                  "p99_ms": r.p99_ms, "proxy": per, "backend": b_before.per_request(b_after, r.requests),
                  "rps_per_core": 1e6 / per["cpu_us"] if per["cpu_us"] else 0.0}  # fmt: skip
        self.record("growth", f"N={n}", spec.name, values)
        log(f"  {r.rps:.0f} req/s, CPU {per['cpu_us']:.1f} us/req ({per['cores']:.2f} cores), failed {r.failed}")


# --- tables ---------------------------------------------------------------------------------------


def cell(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(median(values), fmt)} ({format(min(values), fmt)}..{format(max(values), fmt)})"


SETUPS = {
    "T1": "T1: 2 plumber workers, wrk -c32 keep-alive, /fast",
    "T1-close": "T1-close: the same, `Connection: close` (a client connection per request)",
    "T3": "T3: 2 trivial workers (nginx `return 200`), wrk -c32 keep-alive",
    "T1-own": "T1-own: corral supervising its own 2 plumber workers (SCHED_BATCH), Unix sockets or TCP; strace only",
}


def wakeup_tables(results: dict[str, Any]) -> str:
    return "\n\n".join(f"### {SETUPS.get(k, k)}\n\n" + wakeup_table(runs) for k, runs in results.items())


def wakeup_table(runs: dict[str, Any]) -> str:
    targets = list(runs)

    def col(path: Sequence[str], target: str) -> list[float]:
        out = []
        for v in runs[target]:
            for key in path:
                v = v.get(key, 0.0) if isinstance(v, dict) else 0.0
            out.append(float(v))
        return out

    rows = [
        ("req/s, perf off", ("unperturbed", "rps"), ".0f"),
        ("proxy CPU us per request, perf off", ("unperturbed", "cpu_us"), ".1f"),
        ("  of which system, perf off", ("unperturbed", "sys_us"), ".1f"),
        ("voluntary ctx switches per request, perf off", ("unperturbed", "vol_ctx"), ".3f"),
        ("  involuntary, perf off", ("unperturbed", "invol_ctx"), ".3f"),
        ("req/s (under perf)", ("rps",), ".0f"),
        ("syscalls per request (perf, all)", ("perf", "raw_syscalls:sys_enter"), ".2f"),
        ("context switches per request (perf)", ("perf", "context-switches"), ".3f"),
        ("voluntary ctx switches per request (/proc, all threads, under the tracer)", ("proxy", "vol_ctx"), ".3f"),
        ("involuntary ctx switches per request (/proc, under the tracer)", ("proxy", "invol_ctx"), ".3f"),
        ("proxy CPU us per request (psutil, under the tracer)", ("proxy", "cpu_us"), ".1f"),
        ("  of which system", ("proxy", "sys_us"), ".1f"),
        ("task-clock us per request (perf)", ("perf", "task-clock"), ".1f"),
        ("workers: voluntary ctx switches per request", ("workers", "vol_ctx"), ".3f"),
        ("workers: involuntary ctx switches per request", ("workers", "invol_ctx"), ".3f"),
        ("workers: CPU us per request", ("workers", "cpu_us"), ".1f"),
    ]
    has_perf = any(v["perf"] for t in targets for v in runs[t])
    rows = [row for row in rows if has_perf or row[1][0] not in ("perf", "rps")]
    lines = ["| per request | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for label, path, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(cell(col(path, t), fmt) for t in targets) + " |")
    names: set[str] = set()
    for t in targets:
        for v in runs[t]:
            names |= {k for k, x in v["perf"].items() if ":" not in k and "-" not in k and x >= 0.005}
    order = sorted(names, key=lambda k: -max(median(col(("perf", k), t)) for t in targets))
    if order:
        lines += ["", "| syscall, calls per request (perf) | " + " | ".join(targets) + " |",
              "|---" * (len(targets) + 1) + "|"]  # fmt: skip
    for k in order:
        lines.append(f"| {k} | " + " | ".join(cell(col(("perf", k), t), ".3f") for t in targets) + " |")
    if any("strace" in v for t in targets for v in runs[t]):
        snames: set[str] = set()
        for t in targets:
            for v in runs[t]:
                snames |= {k for k, x in v.get("strace", {}).get("per_request", {}).items() if x >= 0.005}
        lines += ["", "| syscall, calls per request (strace -f -c, slowed) | " + " | ".join(targets) + " |",
                  "|---" * (len(targets) + 1) + "|"]  # fmt: skip
        lines.append("| req/s under strace | " + " | ".join(cell(col(("strace", "rps"), t), ".0f") for t in targets)
                     + " |")  # fmt: skip
        for k in sorted(snames, key=lambda k: -max(median(col(("strace", "per_request", k), t)) for t in targets)):
            lines.append(
                f"| {k} | " + " | ".join(cell(col(("strace", "per_request", k), t), ".3f") for t in targets) + " |"
            )
    return "\n".join(lines)


def growth_table(results: dict[str, Any]) -> str:
    if not results:
        return ""
    lines = [
        "| N | proxy | req/s | CPU us/req | user / sys us | cores used | req/s at 1 core | vol / invol cs per req "
        "| backend CPU us/req | p99 ms | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, targets in results.items():
        for name, runs in targets.items():
            proxy = [v["proxy"] for v in runs]

            def med(field: str, rows: list[dict[str, float]] = proxy) -> float:
                return median([r[field] for r in rows])

            cells = [
                key.removeprefix("N="),
                name,
                cell([v["rps"] for v in runs], ".0f"),
                cell([p["cpu_us"] for p in proxy], ".1f"),
                f"{med('user_us'):.1f} / {med('sys_us'):.1f}",
                cell([p["cores"] for p in proxy], ".2f"),
                cell([v["rps_per_core"] for v in runs], ".0f"),
                f"{med('vol_ctx'):.3f} / {med('invol_ctx'):.3f}",
                cell([v["backend"]["cpu_us"] for v in runs], ".1f"),
                cell([v["p99_ms"] for v in runs], ".1f"),
                str(sum(v["failed"] for v in runs)),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/syscalls.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(PARTS), help="wakeups, growth or both (default)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=6.0, help="seconds of measured wrk per figure")
    ap.add_argument("--warm", type=float, default=2.0)
    ap.add_argument("--setups", default="T1,T1-close,T3,T1-own", help="wakeups: T1, T1-close, T3, T1-own")
    ap.add_argument("--workers", default="2,8,32", help="growth: trivial worker counts")
    ap.add_argument("--growth-conns", type=int, default=64, help="growth: wrk connections")
    ap.add_argument("--strace", action="store_true", help="wakeups: also a strace -f -c pass per proxy")
    ap.add_argument("--strace-duration", type=float, default=4.0)
    ap.add_argument("--rev", default="HEAD", help="corral from this git revision (git archive), or `tree`")
    ap.add_argument("--baseline", metavar="REV", help="growth: also corral from REV (corral@<sha>)")
    ap.add_argument("--pin", action="store_true", help="growth: the proxy on CPU 0, wrk and the backend on CPU 1")
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument("--keep-tmp", action="store_true")
    args = ap.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    if any(p not in PARTS for p in args.only):
        ap.error(f"--only: choose from {PARTS}")
    args.setups = [x.strip() for x in args.setups.split(",") if x.strip()]
    args.workers = [int(x) for x in args.workers.split(",") if x.strip()]
    if max(args.workers) > 32:
        ap.error("--workers: at most 32 (ports 19420-19451)")
    return args


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # every `finally` stops the processes it started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = dt.datetime.now().astimezone()
    machine = environment.machine()  # before --pin narrows this process to one CPU (nproc would say 1)
    tmp = Path(tempfile.mkdtemp(prefix="corral-syscalls-"))
    os.chmod(tmp, 0o755)  # nginx workers drop root privileges and still need their temp dirs
    log(f"configs and logs in {tmp}; load average {os.getloadavg()}")
    bench = Bench(args, tmp)
    try:
        if "wakeups" in args.only:
            bench.wakeups()
        if "growth" in args.only:
            bench.growth()
    finally:
        meta = {
            "command": " ".join(["bench/syscalls.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": started.strftime("%Y-%m-%d %H:%M %Z"),
            "ended": dt.datetime.now().astimezone().strftime("%H:%M %Z"),
            "machine": machine,
            "versions": environment.versions(),
            "corral": bench.corral_tree,
            "baseline": None if bench.base is None else bench.base.describe(),
            "loadavg_at_end": os.getloadavg(),
            "args": {k: v for k, v in vars(args).items()},
        }
        OUT.mkdir(exist_ok=True)
        out = OUT / f"syscalls-{started.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps({"meta": meta, **bench.results}, indent=1))
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{meta['command']}: {meta['date']} to {meta['ended']}, {meta['machine']}")
    if bench.results["wakeups"]:
        print("\n" + wakeup_tables(bench.results["wakeups"]))
    if bench.results["growth"]:
        print("\n" + growth_table(bench.results["growth"]))
    log(f"raw results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
