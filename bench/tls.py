#!/usr/bin/env python3
"""Issue 24: T1 over TLS: corral terminating TLS itself next to nginx terminating it, same workers, same run.

    bench/tls.py [--rounds 5] [--duration 8] [--connections 32]

Two plumber workers (bench/app, /fast) serve four targets, all started at once and measured in turn, in an
order that rotates each round (a shared machine's load drifts; the per-round ratios are tighter than whole
runs in sequence):

- `corral-http`: corral `--upstream` to the workers, plain HTTP (bench/compare's T1 corral);
- `corral-tls`: the same with `--tls-cert/--tls-key`;
- `nginx-tls`: nginx least_conn (bench/peers/nginx-tls.conf) terminating TLS with the same certificate,
  versions and ciphers (corral's Mozilla intermediate list);
- `nginx-http`: nginx least_conn, plain HTTP (bench/compare's T1 nginx).

Per target and round: wrk -c32 with keep-alive (the handshake amortised over the connection's requests), then
wrk -c32 with `Connection: close` (a new connection, and for TLS a full handshake, per request). Figures:
req/s, p50 and p99 in ms, failed requests, and the proxy's CPU per request (its own process: corral's, or
nginx's whole tree). Prints median [min..max] over the rounds, and corral-tls / nginx-tls per round. The
certificate is an ECDSA P-256 one made here with `openssl req`. Raw figures: bench/out/tls-<timestamp>.json.
Ports 19560-19575; every process by its group.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import HOST, Child, ChildError, require_free, tree_usage
from proxies import render, server_lines
from workers import WorkerPool, upstream_spec
from wrk import run_wrk

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
WORKER_PORTS = [19561, 19562]
PORTS = {"corral-http": 19570, "corral-tls": 19571, "nginx-tls": 19572, "nginx-http": 19573}
PATH = "/fast"
sys.path.insert(0, str(ROOT / "src"))
from corral.tls import INTERMEDIATE_CIPHERS  # noqa: E402


def make_cert(where: Path) -> tuple[Path, Path]:
    cert, key = where / "bench.crt", where / "bench.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
            *("-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def wait_ready(child: Child, port: int, tls: bool, timeout: float = 60.0) -> None:
    """Until the target answers /fast with a 200 (over TLS when it speaks it), or its process dies."""
    deadline = time.monotonic() + timeout
    ctx = ssl._create_unverified_context()  # the bench's own self-signed certificate
    last = "no attempt"
    while time.monotonic() < deadline:
        if not child.alive():
            raise ChildError(f"{child.name} exited before answering:\n{child.log_tail()}")
        try:
            conn = (
                http.client.HTTPSConnection(HOST, port, timeout=2, context=ctx)
                if tls
                else http.client.HTTPConnection(HOST, port, timeout=2)
            )
            conn.request("GET", PATH)
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return
            last = f"HTTP {status}"
        except (OSError, http.client.HTTPException) as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise ChildError(f"{child.name} not answering on :{port} ({last})\n{child.log_tail()}")


@contextmanager
def targets(tmp: Path, cert: Path, key: Path) -> Iterator[dict[str, Child]]:
    require_free(PORTS.values())
    corral = [sys.executable, "-m", "corral", "run", "--host", HOST, "--upstream", upstream_spec(WORKER_PORTS)]
    corral += ["--health-path", PATH]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    tls_args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    children: dict[str, Child] = {}
    with ExitStack() as stack:
        for name, extra in (("corral-http", []), ("corral-tls", tls_args)):
            argv = [*corral, "--port", str(PORTS[name]), *extra]
            children[name] = Child(name, argv, tmp / f"{name}.log", env=env)
            stack.callback(children[name].stop)
        for name, template in (("nginx-tls", "nginx-tls.conf"), ("nginx-http", "nginx-least-conn.conf")):
            prefix = tmp / name
            prefix.mkdir()
            values = {"PREFIX": str(prefix), "HOST": HOST, "LISTEN": str(PORTS[name])}
            values |= {"SERVERS": server_lines("nginx", WORKER_PORTS), "HEALTH_PATH": PATH}
            values |= {"CERT": str(cert), "KEY": str(key), "CIPHERS": INTERMEDIATE_CIPHERS}
            conf = prefix / "nginx.conf"
            conf.write_text(render(template, values))
            argv = ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
            argv += ["-g", f"daemon off; pid {prefix}/nginx.pid;"]
            children[name] = Child(name, argv, tmp / f"{name}.log")
            stack.callback(children[name].stop)
        for name, child in children.items():
            wait_ready(child, PORTS[name], tls=name.endswith("-tls"))
        yield children


def measure(child: Child, name: str, mode: str, args: argparse.Namespace) -> dict[str, float]:
    scheme = "https" if name.endswith("-tls") else "http"
    headers = ["Connection: close"] if mode == "close" else []
    # corral's own process (its workers are not its children here); nginx's master and workers
    pid = child.pid
    before = tree_usage(pid)
    r = run_wrk(f"{scheme}://{HOST}:{PORTS[name]}{PATH}", args.connections, args.duration, headers=headers)
    after = tree_usage(pid)
    return {
        "rps": r.rps,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "failed": r.failed,
        "cpu_us": (after.cpu_s - before.cpu_s) / max(r.requests, 1) * 1e6,
    }


def spread(xs: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(statistics.median(xs))} [{fmt.format(min(xs))}..{fmt.format(max(xs))}]"


def report(rows: list[dict], rounds: int) -> str:
    lines = []
    for mode, label in (("keepalive", "keep-alive (wrk -c32)"), ("close", "a new connection per request")):
        lines += [f"\n{label}", f"{'target':<12} {'req/s':>20} {'p50 ms':>20} {'p99 ms':>20} {'CPU us/req':>20} failed"]
        for name in PORTS:
            got = [r for r in rows if r["target"] == name and r["mode"] == mode]
            if not got:
                continue
            col = {k: [g[k] for g in got] for k in ("rps", "p50_ms", "p99_ms", "cpu_us", "failed")}
            lines.append(
                f"{name:<12} {spread(col['rps']):>20} {spread(col['p50_ms'], '{:.1f}'):>20} "
                f"{spread(col['p99_ms'], '{:.1f}'):>20} {spread(col['cpu_us']):>20} {int(sum(col['failed']))}"
            )
        for a, b in (("corral-tls", "nginx-tls"), ("corral-tls", "corral-http"), ("nginx-tls", "nginx-http")):
            ratios = []
            for i in range(rounds):
                ra = [r["rps"] for r in rows if r["target"] == a and r["mode"] == mode and r["round"] == i]
                rb = [r["rps"] for r in rows if r["target"] == b and r["mode"] == mode and r["round"] == i]
                if ra and rb and rb[0]:
                    ratios.append(ra[0] / rb[0])
            if ratios:
                lines.append(f"  {a} / {b} req/s, per round: {spread(ratios, '{:.2f}')}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--no-close", action="store_true", help="skip the connection-per-request measurement")
    args = ap.parse_args()
    rows: list[dict] = []
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="corral-bench-tls-") as d:
        tmp = Path(d)
        cert, key = make_cert(tmp)
        with WorkerPool(WORKER_PORTS, tmp / "workers"), targets(tmp, cert, key) as children:
            names = list(PORTS)
            modes = ["keepalive"] if args.no_close else ["keepalive", "close"]
            for i in range(args.rounds):
                order = names[i % len(names) :] + names[: i % len(names)]
                for mode in modes:
                    for name in order:
                        row = {"round": i, "target": name, "mode": mode, **measure(children[name], name, mode, args)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    text = report(rows, args.rounds)
    print(f"\nload average at start {load[0]:.2f}; {args.rounds} rounds of {args.duration:g} s per figure{text}")
    OUT.mkdir(exist_ok=True)
    out = OUT / f"tls-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "load_at_start": load, "rows": rows}, indent=1))
    print(f"raw: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
