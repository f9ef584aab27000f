"""Issue 5, for real across hosts: two network namespaces joined by a veth pair stand in for two
machines. Workers run on the "worker host" (`corral run --supervise-only` with worker_host 0.0.0.0,
plus one worker started by hand); corral balances them from the "balancer host" as `upstreams`.

Needs root (CAP_NET_ADMIN) for `ip netns add`. Where namespaces are refused, the same test runs
across loopback addresses (127.0.0.1 -> 127.0.0.2) instead and says so in a warning.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import STUB, enter_netns, free_ports, get, ip

SUBNET = "10.77.0"  # our own namespaces' addresses, invisible outside them


class Hosts:
    """Two 'machines': where the workers run and where corral balances them."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.ns_w = f"corral-w-{tag}"
        self.ns_b = f"corral-b-{tag}"
        self.namespaces = False
        self.worker_ip = "127.0.0.2"
        self.procs: list[subprocess.Popen] = []
        self._client: cf.ThreadPoolExecutor | None = None

    # --- setup and teardown --------------------------------------------------------------
    def create(self) -> None:
        if shutil.which("ip") is None:
            return self._fallback("the `ip` command is missing (Debian: iproute2)")
        r = ip("netns", "add", self.ns_w)
        if r.returncode != 0:
            return self._fallback(f"`ip netns add` refused: {r.stderr.strip()}")
        self.namespaces = True
        veth_w, veth_b = f"cw{self.tag}", f"cb{self.tag}"
        for cmd in (
            ["netns", "add", self.ns_b],
            ["link", "add", veth_w, "type", "veth", "peer", "name", veth_b],
            ["link", "set", veth_w, "netns", self.ns_w],
            ["link", "set", veth_b, "netns", self.ns_b],
            ["-n", self.ns_w, "addr", "add", f"{SUBNET}.2/24", "dev", veth_w],
            ["-n", self.ns_b, "addr", "add", f"{SUBNET}.1/24", "dev", veth_b],
            ["-n", self.ns_w, "link", "set", veth_w, "up"],
            ["-n", self.ns_b, "link", "set", veth_b, "up"],
            ["-n", self.ns_w, "link", "set", "lo", "up"],
            ["-n", self.ns_b, "link", "set", "lo", "up"],
        ):
            r = ip(*cmd)
            assert r.returncode == 0, f"ip {' '.join(cmd)}: {r.stderr}"
        self.worker_ip = f"{SUBNET}.2"

    def _fallback(self, why: str) -> None:
        warnings.warn(
            f"{why}: multi-host test ran across loopback addresses 127.0.0.1 -> 127.0.0.2 instead", stacklevel=2
        )

    def destroy(self) -> None:
        for p in self.procs:
            _stop(p)
        if self._client is not None:
            self._client.shutdown()
        if self.namespaces:
            ip("netns", "del", self.ns_w)  # takes its end of the veth pair, and so the pair, with it
            ip("netns", "del", self.ns_b)

    # --- running things on either host -----------------------------------------------------
    def start(self, host: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        prefix = ["ip", "netns", "exec", self.ns_w if host == "w" else self.ns_b] if self.namespaces else []
        with open(log, "wb") as out:
            p = subprocess.Popen(
                [*prefix, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
            )
        self.procs.append(p)
        return p

    def client(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn on the balancer host: a thread that has entered its network namespace."""
        if self._client is None:
            self._client = cf.ThreadPoolExecutor(1, initializer=self._enter_b)
        return self._client.submit(fn, *args).result()

    def _enter_b(self) -> None:
        if not self.namespaces:
            return
        enter_netns(self.ns_b)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_for(log: Path, pattern: str, count: int = 1, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, log.read_text(errors="replace"))) < count:
        assert time.monotonic() < deadline, f"timed out waiting for {pattern!r} x{count}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    h = Hosts(str(os.getpid() % 100000))
    try:
        h.create()
        yield h
    finally:
        h.destroy()


def test_corral_balances_workers_on_another_host_and_follows_them(hosts, tmp_path):
    ports = free_ports(8)
    lb_port, w_port, base = ports, ports + 1, ports + 4  # workers: base, base+1 (corral), base+2 (by hand)
    stub_cmd = f'command = ["{sys.executable}", "{STUB}", "{{port}}"]'
    (tmp_path / "workers.toml").write_text(
        f"""
[server]
port = {w_port}

[[app]]
name = "api"
{stub_cmd}
workers = 2
base_port = {base}
worker_host = "0.0.0.0"
"""
    )
    (tmp_path / "balancer.toml").write_text(
        f"""
[server]
host = "0.0.0.0"
port = {lb_port}

[[app]]
name = "remote"
upstreams = ["{hosts.worker_ip}:{base}-{base + 3}"]   # base+3: nobody there
health_interval = 0.3
"""
    )
    w_log, b_log = tmp_path / "workers.log", tmp_path / "balancer.log"
    corral = [sys.executable, "-m", "corral", "run"]
    hosts.start("w", [*corral, "--supervise-only", "-c", str(tmp_path / "workers.toml")], w_log)
    wait_for(w_log, rf"supervise-only, no balancer; workers at api 0\.0\.0\.0:{base}-{base + 1}")

    def hand_started() -> subprocess.Popen:
        log = tmp_path / "hand.log"
        p = hosts.start("w", [sys.executable, STUB, str(base + 2)], log, env={"CORRAL_WORKER_HOST": hosts.worker_ip})
        wait_for(log, "listening")
        return p

    hand = hand_started()
    hosts.start("b", [*corral, "-c", str(tmp_path / "balancer.toml")], b_log)
    for i in range(3):
        wait_for(b_log, rf"remote:{i} ready: {re.escape(hosts.worker_ip)}:{base + i} answered its probe")

    def pids(n: int) -> set[int]:
        out = set()
        for _ in range(n):
            r = get(lb_port, "/x")
            assert r.status == 200, r.body
            out.add(r.json()["pid"])
        return out

    supervised = set(re.findall(r"api:\d ready: pid (\d+)", w_log.read_text()))
    everyone = {int(p) for p in supervised} | {hand.pid}
    assert hosts.client(pids, 12) == everyone  # every remote worker serves through corral
    if hosts.namespaces:  # and corral and the workers really are on other "hosts" than this test
        for port in (lb_port, base):
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0

    hand.kill()  # one remote worker goes away...
    hand.wait()
    wait_for(b_log, rf"remote:2 unhealthy: {re.escape(hosts.worker_ip)}:{base + 2}")  # ...and leaves
    assert hosts.client(pids, 8) == everyone - {hand.pid}  # all answered, by the two left

    hand = hand_started()  # it comes back on the same port...
    wait_for(b_log, rf"remote:2 ready: {re.escape(hosts.worker_ip)}:{base + 2} answered", count=2)  # ...and rejoins
    seen = hosts.client(pids, 12)
    assert hand.pid in seen and seen <= everyone | {hand.pid}
    assert "remote:3 ready" not in b_log.read_text()  # the empty port never joined
