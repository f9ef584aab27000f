#!/usr/bin/env python3
"""Failed requests during rolling reloads under steady load: corral vs pm2 vs nginx (T reload).

The same plumber app (examples/plumber/plumber.R) runs as N R workers three ways, each reloaded
`--reloads` times while `--clients` closed-loop clients keep sending a 50/50 mix of
GET /slow?s=0.02 and POST /sum (a fresh connection per request, so no keep-alive race is counted;
POST because a proxy may retry a failed GET elsewhere but must not replay a POST):

  corral   corral run -w N; reload = `corral reload` (rolling, surge 1, waits until done)
  pm2      pm2 fork mode, `-i N`, port = base + NODE_APP_INSTANCE (the plumber clustering guide),
           nginx round-robin in front; reload = `pm2 reload`, then wait until every worker answers
           again (pm2 returns before R listens) and nginx serves again before the next one
  nginx    nginx in front of N workers it does not manage; reload = blue/green by hand: start N
           new workers on the other port set, wait until they answer, rewrite the upstream block,
           `nginx -s reload`, sleep 1 s, SIGTERM the old workers

A request fails on a non-2xx answer or a connection error, and times out after 10 s.

    python3 bench/reload.py                 # all three, 10 reloads each (about 3-4 minutes)
    python3 bench/reload.py --only corral --reloads 3
    python3 bench/reload.py --write         # also record the table in bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import HOST, Child, port_free, wait_http

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "examples" / "plumber" / "plumber.R"
RESULTS = REPO / "bench" / "RESULTS.md"
BEGIN, END = "<!-- reload:begin -->", "<!-- reload:end -->"
REQUEST_TIMEOUT = 10.0
READY_TIMEOUT = 60.0
R_EXPR = (
    "suppressPackageStartupMessages(library(plumber)); pr <- plumb({app!r}); "
    "pr$run(host = '127.0.0.1', port = {port}, docs = FALSE, quiet = TRUE)"
)


# --- load --------------------------------------------------------------------------------------
@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    timed_out: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    bad_slices: set[int] = field(default_factory=set)  # 100 ms slices in which some request failed

    def fail(self, why: str, timeout: bool = False) -> None:
        self.bad_slices.add(int(time.monotonic() * 10))
        if timeout:
            self.timed_out += 1
        else:
            self.failed += 1
        self.errors[why] = self.errors.get(why, 0) + 1


class Load:
    """Closed-loop clients on their own event loop thread; one fresh connection per request."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.clients = clients
        self.tally = Tally()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(REQUEST_TIMEOUT + 5)

    async def _main(self) -> None:
        await asyncio.gather(*(self._client(i) for i in range(self.clients)))

    async def _client(self, i: int) -> None:
        rng = random.Random(i)
        while not self._stop.is_set():
            if rng.random() < 0.5:
                raw = b"GET /slow?s=0.02 HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
            else:
                body = b'{"a": 1, "b": 2}'
                raw = (
                    b"POST /sum HTTP/1.1\r\nHost: b\r\nConnection: close\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            await self._one(raw)

    async def _one(self, raw: bytes) -> None:
        writer = None
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                reader, writer = await asyncio.open_connection(HOST, self.port)
                writer.write(raw)
                data = await reader.read()  # Connection: close: the answer ends at EOF
        except TimeoutError:
            self.tally.fail("timeout", timeout=True)
            return
        except OSError as exc:
            self.tally.fail(type(exc).__name__)
            await asyncio.sleep(0.01)
            return
        finally:
            if writer is not None:
                writer.close()
        parts = data.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            self.tally.fail("no HTTP answer" if not data else "garbled answer")
        elif 200 <= int(parts[1]) < 300:
            self.tally.ok += 1
        else:
            self.tally.fail(f"HTTP {int(parts[1])}")


# --- the three setups --------------------------------------------------------------------------
def free_block(n: int, start: int) -> int:
    base = start + random.randrange(0, 2000)
    while not all(port_free(base + i) for i in range(n)):
        base += n + 1
    return base


def r_argv(port: int) -> list[str]:
    return ["Rscript", "-e", R_EXPR.format(app=str(APP), port=port)]


NGINX_CONF = """worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
    upstream workers {{
{servers}
    }}
    server {{
        listen {host}:{port};
        location / {{ proxy_pass http://workers; proxy_read_timeout 60s; }}
    }}
}}
"""


class Nginx:
    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.conf = workdir / "nginx.conf"
        self.child: Child | None = None

    def write(self, ports: list[int]) -> None:
        servers = "\n".join(f"        server {HOST}:{p};" for p in ports)
        self.conf.write_text(NGINX_CONF.format(prefix=self.workdir, servers=servers, host=HOST, port=self.port))

    def start(self, ports: list[int]) -> None:
        self.write(ports)
        argv = ["nginx", "-p", str(self.workdir), "-c", str(self.conf), "-g", "daemon off;"]
        self.child = Child("nginx", argv, self.workdir / "nginx.out")
        wait_http(self.child, self.port, "/health", READY_TIMEOUT)

    def reload(self, ports: list[int]) -> None:
        self.write(ports)
        argv = ["nginx", "-p", str(self.workdir), "-c", str(self.conf), "-s", "reload"]
        subprocess.run(argv, check=True, capture_output=True)

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


@contextlib.contextmanager
def corral_setup(workdir: Path, n: int) -> Iterator[tuple[int, object]]:
    port = free_block(n * 3 + 2, 33000)
    argv = [sys.executable, "-m", "corral", "run", "-p", str(port), "-w", str(n), "--health-path", "/health", str(APP)]
    child = Child("corral", argv, workdir / "corral.out", cwd=workdir)
    try:
        wait_http(child, port, "/health", READY_TIMEOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while "all workers ready" not in child.log_tail(100000) and time.monotonic() < deadline:
            time.sleep(0.1)

        def reload() -> None:
            cmd = [sys.executable, "-m", "corral", "reload", "-p", str(port)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise RuntimeError(f"corral reload failed ({r.returncode}): {r.stdout}{r.stderr}")

        yield port, reload
    finally:
        child.stop(timeout=30)


@contextlib.contextmanager
def pm2_setup(workdir: Path, n: int) -> Iterator[tuple[int, object]]:
    pm2 = shutil.which("pm2")
    if pm2 is None and shutil.which("npm"):
        # The comparison needs pm2 itself; it comes from the npm registry, like any pm2 user's.
        subprocess.run(["npm", "install", "-g", "--silent", "pm2"], check=False, timeout=600)
        pm2 = shutil.which("pm2")
    if pm2 is None:
        raise SystemExit("pm2 not found and npm could not install it: npm install -g pm2")
    port = free_block(n + 1, 35000)
    base = port + 1
    script = workdir / "run-plumber.sh"
    expr = R_EXPR.format(app=str(APP), port=f"{base} + as.integer(Sys.getenv('NODE_APP_INSTANCE'))")
    script.write_text(f"#!/bin/bash\nexec Rscript -e {shlex.quote(expr)}\n")
    script.chmod(0o755)
    eco = workdir / "ecosystem.json"
    app = {"name": "plumber", "script": str(script), "interpreter": "bash", "exec_mode": "fork", "instances": n}
    eco.write_text(json.dumps({"apps": [app]}))
    env = dict(os.environ, PM2_HOME=str(workdir / "pm2"))  # our own daemon: `pm2 kill` ends only ours
    nginx = Nginx(workdir, port)
    try:
        subprocess.run([pm2, "start", str(eco)], env=env, check=True, capture_output=True, timeout=60)
        for i in range(n):
            wait_http(None, base + i, "/health", READY_TIMEOUT)
        nginx.start([base + i for i in range(n)])

        def reload() -> None:
            subprocess.run([pm2, "reload", "plumber"], env=env, check=True, capture_output=True, timeout=300)
            # pm2 returns before R listens: wait, as an operator would, until every worker answers and
            # nginx (which marked them failed for fail_timeout) serves again, before the next reload
            for i in range(n):
                wait_http(None, base + i, "/health", READY_TIMEOUT)
            wait_http(None, port, "/health", READY_TIMEOUT)

        yield port, reload
    finally:
        nginx.stop()
        subprocess.run([pm2, "kill"], env=env, capture_output=True, timeout=60)


@contextlib.contextmanager
def nginx_setup(workdir: Path, n: int) -> Iterator[tuple[int, object]]:
    port = free_block(2 * n + 1, 37000)
    sets = [[port + 1 + i for i in range(n)], [port + 1 + n + i for i in range(n)]]
    live: dict[int, Child] = {}

    def start(ports: list[int]) -> None:
        for p in ports:
            live[p] = Child(f"r{p}", r_argv(p), workdir / f"r{p}.out")
        for p in ports:
            wait_http(live[p], p, "/health", READY_TIMEOUT)

    nginx = Nginx(workdir, port)
    state = {"current": 0}
    try:
        start(sets[0])
        nginx.start(sets[0])

        def reload() -> None:
            old, new = sets[state["current"]], sets[1 - state["current"]]
            start(new)
            nginx.reload(new)
            time.sleep(1.0)  # what a deploy script does: give nginx's old workers a moment
            for p in old:
                live.pop(p).stop()
            state["current"] = 1 - state["current"]

        yield port, reload
    finally:
        nginx.stop()
        for child in live.values():
            child.stop()


SETUPS = {"corral": corral_setup, "pm2": pm2_setup, "nginx": nginx_setup}
LABEL = {
    "corral": "corral reload (rolling, surge 1)",
    "pm2": "pm2 reload (fork mode) + nginx",
    "nginx": "nginx -s reload, blue/green workers",
}


@dataclass
class Result:
    name: str
    reloads: int
    tally: Tally
    seconds: float
    reload_seconds: list[float]


def run_one(name: str, n: int, clients: int, reloads: int) -> Result:
    with tempfile.TemporaryDirectory(prefix=f"reload-{name}-") as tmp, SETUPS[name](Path(tmp), n) as (port, reload):
        with Load(port, clients) as load:
            time.sleep(2.0)  # steady state before the first reload
            took = []
            start = time.monotonic()
            for i in range(reloads):
                t0 = time.monotonic()
                reload()  # type: ignore[operator]
                took.append(time.monotonic() - t0)
                t = load.tally
                print(f"  {name}: reload {i + 1}/{reloads} in {took[-1]:.1f}s; so far ok {t.ok}, failed {t.failed}")
                time.sleep(1.0)
            time.sleep(REQUEST_TIMEOUT / 2)  # let requests started during the last reload settle
            seconds = time.monotonic() - start
        return Result(name, reloads, load.tally, seconds, took)


def table(results: list[Result], n: int, clients: int) -> str:
    lines = [
        "| setup | reloads | requests | failed | timed out | failed % | time with failures | reload time (median) "
        "| what failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r.tally
        total = t.ok + t.failed + t.timed_out
        pct = 100 * (t.failed + t.timed_out) / max(1, total)
        med = sorted(r.reload_seconds)[len(r.reload_seconds) // 2]
        why = ", ".join(f"{k} x{v}" for k, v in sorted(t.errors.items(), key=lambda kv: -kv[1])) or "-"
        bad = f"{len(t.bad_slices) / 10:.1f} s"
        cells = [LABEL[r.name], r.reloads, total, t.failed, t.timed_out, f"{pct:.2f}", bad, f"{med:.1f} s", why]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def notes(results: list[Result]) -> list[str]:
    """What the setups do differently, said only where this run's numbers show it."""
    by = {r.name: r for r in results}
    out = []
    if "corral" in by:
        out.append(
            "- corral: each successor starts on a fresh port and takes its slot only once it answers; the old "
            "worker finishes what it holds, then stops. N ready workers throughout, plus one starting."
        )
    if "pm2" in by and by["pm2"].tally.failed:
        out.append(
            "- pm2 (fork mode, no `wait_ready`): `pm2 reload` restarts the instances without waiting for R to "
            "listen and returns before they do; while no worker answers, nginx marks every upstream failed and answers "
            "502 at once for its `fail_timeout` (10 s), after the workers are back too. HTTP 500s: most likely "
            "requests R was running when pm2's SIGINT interrupted it."
        )
    if "nginx" in by:
        out.append(
            "- nginx blue/green: needs 2N workers during each switch and a deploy script (start the new set, wait "
            "until it answers, rewrite the upstream block, `nginx -s reload`, wait, stop the old set)."
        )
    return [*out, ""] if out else []


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    r = subprocess.run(["Rscript", "--version"], capture_output=True, text=True)
    rv = (r.stdout or r.stderr).strip().splitlines()[0] if r.returncode == 0 else "R ?"
    pm2 = subprocess.run(["pm2", "--version"], capture_output=True, text=True, env=dict(os.environ, PM2_HOME="/tmp"))
    ng = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"{rv}, pm2 {pm2.stdout.strip().splitlines()[-1] if pm2.returncode == 0 else '?'}, "
        f"{ng.stderr.strip().removeprefix('nginx version: ')}"
    )


def write_results(text: str) -> None:
    block = f"{BEGIN}\n{text}\n{END}"
    current = RESULTS.read_text() if RESULTS.exists() else "# corral benchmark results\n"
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        RESULTS.write_text(head + block + tail)
    else:
        RESULTS.write_text(current.rstrip("\n") + "\n\n" + block + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="corral,pm2,nginx", help="comma list of corral, pm2, nginx")
    ap.add_argument("--reloads", type=int, default=10)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--write", action="store_true", help="record the table in bench/RESULTS.md")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the cleanups on SIGTERM too
    names = [s.strip() for s in args.only.split(",") if s.strip()]
    results = []
    for name in names:
        print(f"{name}: {args.workers} workers, {args.clients} clients, {args.reloads} reloads", flush=True)
        results.append(run_one(name, args.workers, args.clients, args.reloads))
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(
        [
            "## Reload under steady load (`bench/reload.py`)",
            "",
            f"Run `python3 bench/reload.py --reloads {args.reloads} --workers {args.workers} "
            f"--clients {args.clients}` on {now}; machine: {machine()}.",
            "",
            f"Each setup runs examples/plumber/plumber.R as {args.workers} R workers and is reloaded "
            f"{args.reloads} times while {args.clients} closed-loop clients send a 50/50 mix of "
            "GET /slow?s=0.02 and POST /sum, one connection per request. Failed = non-2xx or connection error; "
            f"timed out = no answer within {REQUEST_TIMEOUT:g} s; "
            "time with failures = the 100 ms slices in which at least one request failed (failed requests are "
            "many where a proxy answers 502 at once: closed-loop clients then spin fast).",
            "",
            table(results, args.workers, args.clients),
            "",
            *notes(results),
        ]
    )
    print(text)
    if args.write:
        write_results(text)
        print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
