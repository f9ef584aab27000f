"""Count the 40 ms delayed-ACK stalls of keep-alive requests to plumber, without a clock.

Run inside a private network namespace (`unshare -n`, root), so the kernel's TcpExt DelayedACKs
counter (/proc/net/netstat) counts this run's connections only:

    unshare -n sh -c 'ip link set lo up && exec python3 delayed_acks.py tcp|unix N'

httpuv writes a response's head and body in two writes without TCP_NODELAY; on a reused connection
the body waits until the head is ACKed, and a receiver that delays its ACK stalls every request by
~40 ms. Each such stall is one delayed ACK sent. Prints one JSON line: `through` = delayed ACKs
during N keep-alive requests through corral; `direct` (tcp only) = the same requests straight to the
plumber worker over one reused connection, the control that shows the counter does see the stall.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import EXAMPLE_R, read_response

PORT = 18000  # the namespace is private: every port is free


def delayed_acks() -> int:
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split()[1:], values.split()[1:], strict=True))["DelayedACKs"])
    raise RuntimeError("no TcpExt DelayedACKs in /proc/net/netstat")


def keepalive(port: int, n: int) -> int:
    """Delayed ACKs sent during n requests on one keep-alive connection (after one to open it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw = b"GET /echo?msg=hi HTTP/1.1\r\nHost: t\r\n\r\n"
        s.sendall(raw)
        assert read_response(s).status == 200
        before = delayed_acks()
        for _ in range(n):
            s.sendall(raw)
            assert read_response(s).status == 200
        return delayed_acks() - before


def start_corral(transport: str, log: Path) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "corral", "run", "-p", str(PORT), "-w", "1", "--health-interval", "86400",
        "--worker-transport", transport, EXAMPLE_R,
        # The port is private to the namespace, the admin socket's file is not: runs side by side need their own.
        "--admin", f"unix:{log.parent / 'admin.sock'}",
    ]  # fmt: skip
    out = log.open("wb")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 90
    while "all workers ready" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"corral did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    return proc


def main() -> None:
    transport, n = sys.argv[1], int(sys.argv[2])
    log = Path(os.environ.get("DELAYED_ACKS_LOG", f"/tmp/delayed-acks-{os.getpid()}.log"))
    proc = start_corral(transport, log)
    try:
        keepalive(PORT, 1)  # corral opens (and then reuses) its connection to the worker
        result = {"transport": transport, "n": n, "through": keepalive(PORT, n)}
        if transport == "tcp":
            result["direct"] = keepalive(PORT + 1, n)  # plumber's port: base_port = port + 1
    finally:
        proc.terminate()
        proc.wait(30)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
