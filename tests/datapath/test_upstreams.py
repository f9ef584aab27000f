"""Issue 5: external workers (`upstreams`) are found by probes, join and leave the rotation, and
nothing that was not in flight on a vanished worker fails."""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import STUB, free_ports, get


class Stub:
    """A worker corral does not start: the test starts, kills and restarts it."""

    def __init__(self, port: int, log: Path | None = None) -> None:
        env = dict(os.environ)
        if log is not None:
            env["STUB_LOG"] = str(log)
        self.port = port
        self.proc = subprocess.Popen([sys.executable, STUB, str(port)], env=env, stdout=subprocess.PIPE, text=True)
        assert "listening" in (self.proc.stdout.readline() if self.proc.stdout else "")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _pids(port: int, n: int, path: str = "/x") -> set[int]:
    out = set()
    for _ in range(n):
        r = get(port, path)
        assert r.status == 200, r.body
        out.add(r.json()["pid"])
    return out


def test_upstreams_join_when_they_answer_and_leave_when_they_go(corral, tmp_path):
    up = free_ports(4)
    stubs = {0: Stub(up)}
    try:
        c = corral(["--upstream", f"127.0.0.1:{up}-{up + 3}", "--health-interval", "0.3"], workers=None)
        c.wait_for(rf"upstream:0 ready: 127.0.0.1:{up} answered its probe")
        assert _pids(c.port, 4) == {stubs[0].pid}  # the three absent ports are never tried

        stubs[2] = Stub(up + 2)  # comes up later: joins within a health interval
        c.wait_for(rf"upstream:2 ready: 127.0.0.1:{up + 2} answered its probe")
        assert _pids(c.port, 8) == {stubs[0].pid, stubs[2].pid}

        stubs[2].kill()  # goes away between requests: nothing was in flight on it
        assert _pids(c.port, 6) == {stubs[0].pid}  # every request answered, by the one left
        c.wait_for(rf"upstream:2 unhealthy: 127.0.0.1:{up + 2} .*out of rotation until a probe answers")

        stubs[2] = Stub(up + 2)  # back on the same port: found again
        c.wait_for(rf"upstream:2 ready: 127.0.0.1:{up + 2} answered its probe", count=2)
        assert _pids(c.port, 8) == {stubs[0].pid, stubs[2].pid}
    finally:
        for s in stubs.values():
            s.kill()


def test_idle_upstream_that_goes_away_is_dropped_by_its_probe(corral, tmp_path):
    up = free_ports(2)
    a, b = Stub(up), Stub(up + 1)
    try:
        c = corral(["--upstream", f"127.0.0.1:{up}-{up + 1}", "--health-interval", "0.2"], workers=None)
        c.wait_for(r"upstream:\d ready: ", count=2)
        b.kill()  # no request goes near it: the refused probe alone takes it out, at once
        c.wait_for(rf"upstream:1 unhealthy: 127.0.0.1:{up + 1} connection refused")
        assert "upstream:0 unhealthy" not in c.log()  # the live one, idle too, passes its probes
        assert _pids(c.port, 4) == {a.pid}
    finally:
        a.kill()
        b.kill()


def test_no_request_fails_unless_it_was_in_flight_on_the_worker_that_died(corral, tmp_path):
    """Load through three upstreams while one is killed mid-request and restarted: the request it
    held is the only one that may fail; everything queued or sent later is served."""
    up = free_ports(3)
    logs = {i: tmp_path / f"stub{i}.log" for i in range(3)}
    stubs = [Stub(up + i, logs[i]) for i in range(3)]
    try:
        c = corral(["--upstream", f"127.0.0.1:{up}-{up + 2}", "--health-interval", "0.3"], workers=None)
        c.wait_for(r"upstream:\d ready: ", count=3)
        results: dict[str, int] = {}
        stop = threading.Event()

        def client(k: int) -> None:
            n = 0
            while not stop.is_set():
                tag = f"{k}-{n}"
                results[tag] = get(c.port, f"/sleep?s=0.05&t={tag}").status
                n += 1

        with cf.ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(client, k) for k in range(5)]
            victim = stubs[1]
            held = _wait_for_new_request(logs[1])  # the victim is inside a 50 ms handler now
            victim.kill()
            c.wait_for(rf"upstream:1 unhealthy: 127.0.0.1:{up + 1}")
            after_kill = len(results)
            _wait_until(lambda: len(results) >= after_kill + 10)  # served by the two left
            stubs[1] = Stub(up + 1, logs[1])
            c.wait_for(rf"upstream:1 ready: 127.0.0.1:{up + 1} answered", count=2)
            _wait_for_new_request(logs[1])  # back in rotation under load
            stop.set()
            for f in futures:
                f.result()
        failed = {tag for tag, status in results.items() if status != 200}
        assert failed <= {held}, (failed, held)  # at most the one request the victim held
        assert {results[t] for t in failed} <= {502}
    finally:
        for s in stubs:
            s.kill()


def _wait_until(cond, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _wait_for_new_request(log: Path, timeout: float = 10) -> str:
    """The tag of the next request the stub logs from now on."""
    start = len(log.read_text().splitlines()) if log.exists() else 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        for line in lines[start:]:
            if "t=" in line:
                return line.rsplit("t=", 1)[1]
        time.sleep(0.005)
    raise AssertionError(f"no new request in {log}")
