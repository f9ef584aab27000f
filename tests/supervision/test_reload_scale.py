"""Reload, scale and autoscale under steady load: no request may fail while workers come and go."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import HAVE_R, STUB, corral_cli, get, read_response, stub_args

from corral.cli.verbs import AdminClient, ControlError, locate
from corral.ops.autoscale import Memory, Observation, Policy, decide


class Load:
    """Client threads sending back-to-back requests on keep-alive connections until stopped.

    Every answer is recorded; any non-200, reset or timeout is a failure. A connection the proxy
    closes between requests (never expected here) also counts, so nothing can hide."""

    def __init__(self, port: int, path: str = "/x", clients: int = 4) -> None:
        self.port = port
        self.path = path
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        self.wait_ok(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def wait_ok(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        start = self.ok
        while self.ok < start + n:
            assert time.monotonic() < deadline, f"load made no progress: {self.failures[:5]}"
            time.sleep(0.02)

    def _run(self) -> None:
        raw = f"GET {self.path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
        sock, buf = None, bytearray()
        while not self.stop.is_set():
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
                    buf = bytearray()
                sock.sendall(raw)
                r = read_response(sock, buf)
            except OSError as exc:
                with self.lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                if sock is not None:
                    sock.close()
                sock = None
                continue
            with self.lock:
                if r.status == 200:
                    self.ok += 1
                    self.bodies.append(r.body)
                else:
                    self.failures.append(f"{r.status} {r.body[:200]!r}")
        if sock is not None:
            sock.close()


class Watch:
    """Samples /status in the background: the fewest ready workers seen and the most desired."""

    def __init__(self, client: AdminClient) -> None:
        self.client = client
        self.min_ready = 10**9
        self.max_workers = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                doc = self.client.ok("GET", "/status")
            except ControlError as exc:  # a slow answer on a loaded machine: note it, keep watching
                self.errors.append(str(exc))
                continue
            for app in doc["apps"]:
                routable = sum(1 for w in app["workers"] if w["state"] in ("ready", "busy"))
                self.min_ready = min(self.min_ready, routable)
                self.max_workers = max(self.max_workers, app["desired"])
            time.sleep(0.02)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return corral_cli(*args, timeout=timeout)


def admin_of(c) -> AdminClient:
    return AdminClient(locate(c.port, None))


def live_pids(client: AdminClient) -> set[int]:
    doc = client.ok("GET", "/status")
    return {w["pid"] for a in doc["apps"] for w in a["workers"] if w["state"] in ("ready", "busy")}


def wait_status(client: AdminClient, cond, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        doc = client.ok("GET", "/status")
        if cond(doc):
            return doc
        assert time.monotonic() < deadline, f"condition not met: {doc}"
        time.sleep(0.05)


# --- reload ------------------------------------------------------------------------------------
def test_reload_under_load_replaces_every_worker_without_a_failed_request(corral):
    c = corral(stub_args(), workers=3)
    admin = admin_of(c)
    before = live_pids(admin)
    assert len(before) == 3
    with Load(c.port, "/sleep?s=0.01") as load, Watch(admin) as watch:
        r = cli("reload", "-p", str(c.port))
        assert r.returncode == 0, r.stdout + r.stderr
        load.wait_ok(20)
    assert "reload done: 3 new workers ready" in r.stdout
    assert load.failures == [] and load.ok > 20
    assert watch.min_ready >= 2  # surge 1: capacity never below N-1
    after = live_pids(admin)
    assert len(after) == 3 and not after & before
    c.wait_for(r"stopped: .*\(drained\)", count=3)  # each old worker finished what it held, then stopped
    assert c.log().count("draining: replaced by pid") == 3


def test_second_reload_while_one_runs_still_ends_with_all_new(corral):
    c = corral(stub_args(), workers=2)
    admin = admin_of(c)
    before = live_pids(admin)
    with Load(c.port, "/sleep?s=0.01", clients=2) as load:
        assert cli("reload", "-p", str(c.port), "--no-wait").returncode == 0
        r = cli("reload", "-p", str(c.port))
        assert r.returncode == 0, r.stderr
        load.wait_ok(10)
    assert load.failures == []
    after = live_pids(admin)
    assert len(after) == 2 and not after & before


def test_sighup_reloads(corral):
    c = corral(stub_args(), workers=2)
    admin = admin_of(c)
    before = live_pids(admin)
    with Load(c.port, clients=2) as load:
        c.proc.send_signal(signal.SIGHUP)
        wait_status(admin, lambda d: not d["apps"][0]["reloading"] and not live_pids(admin) & before)
        load.wait_ok(10)
    assert load.failures == []
    assert len(live_pids(admin)) == 2


def test_failed_replacement_aborts_reload_and_keeps_old_workers(corral, tmp_path):
    broken = tmp_path / "broken"
    wrapper = f'test -e {broken} && {{ echo "cannot load: syntax error"; exit 1; }}; exec {sys.executable} {STUB} "$0"'
    c = corral(["--", "sh", "-c", wrapper, "{port}"], workers=2)
    admin = admin_of(c)
    before = live_pids(admin)
    broken.write_text("")
    with Load(c.port, clients=2) as load:
        r = cli("reload", "-p", str(c.port))
        load.wait_ok(10)
    assert r.returncode == 1 and "reload aborted" in r.stderr and "cannot load: syntax error" in r.stderr
    assert load.failures == []
    assert live_pids(admin) == before
    doc = admin.ok("GET", "/status")
    assert "old workers kept" in doc["apps"][0]["reload_note"]
    broken.unlink()  # fixed: the next reload goes through
    r = cli("reload", "-p", str(c.port))
    assert r.returncode == 0, r.stderr
    assert not live_pids(admin) & before


PLUMBER_V = """
#* @get /version
function() {{ list(version = "{v}", pid = Sys.getpid()) }}
"""


@pytest.mark.r
@pytest.mark.skipif(not HAVE_R, reason="needs Rscript and plumber")
def test_plumber_reload_serves_new_code_without_failures(corral, tmp_path):
    api = tmp_path / "api.R"
    api.write_text(PLUMBER_V.format(v="v1"))
    c = corral([str(api)], workers=2)
    admin = admin_of(c)
    assert get(c.port, "/version").json()["version"] == ["v1"]
    before = live_pids(admin)
    api.write_text(PLUMBER_V.format(v="v2"))
    assert get(c.port, "/version").json()["version"] == ["v1"]  # nothing changes until the reload
    with Load(c.port, "/version", clients=3) as load:
        r = cli("reload", "-p", str(c.port))
        assert r.returncode == 0, r.stdout + r.stderr
        n = len(load.bodies)
        load.wait_ok(10)
    assert load.failures == []
    assert all(b'"v2"' in body for body in load.bodies[n:])  # after the reload: only new code
    assert b'"v1"' in load.bodies[0]
    assert not live_pids(admin) & before


# --- scale ---------------------------------------------------------------------------------------
def test_scale_up_and_down_under_load_without_a_failed_request(corral):
    c = corral(stub_args(), workers=2)
    admin = admin_of(c)
    first = live_pids(admin)
    with Load(c.port, "/sleep?s=0.01") as load:
        r = cli("scale", "4", "-p", str(c.port))
        assert r.returncode == 0 and "4 workers ready" in r.stdout, r.stdout + r.stderr
        doc = admin.ok("GET", "/status")
        assert doc["apps"][0]["ready"] == 4 and first <= live_pids(admin)  # added, nobody replaced
        load.wait_ok(20)
        r = cli("scale", "1", "-p", str(c.port))
        assert r.returncode == 0, r.stdout + r.stderr
        wait_status(admin, lambda d: len(d["apps"][0]["workers"]) == 1)  # surplus drained and stopped
        load.wait_ok(10)
    assert load.failures == []
    (survivor,) = live_pids(admin)
    assert survivor in first  # worker 0 stays; the surplus ones drain
    assert c.log().count("draining: scaled down to 1") == 3


def test_scale_needs_app_when_several(corral, tmp_path):
    cfg = tmp_path / "corral.toml"
    cfg.write_text(
        f"""
[[app]]
name = "a"
route = "/a"
workers = 1
command = ["{sys.executable}", "{STUB}", "{{port}}"]
[[app]]
name = "b"
route = "/b"
workers = 1
command = ["{sys.executable}", "{STUB}", "{{port}}"]
"""
    )
    c = corral(["-c", str(cfg)], workers=None)
    r = cli("scale", "2", "-p", str(c.port))
    assert r.returncode == 1 and "app=NAME" in r.stderr
    r = cli("scale", "2", "-p", str(c.port), "--app", "b")
    assert r.returncode == 0, r.stderr
    doc = admin_of(c).ok("GET", "/status")
    assert {a["name"]: a["ready"] for a in doc["apps"]} == {"a": 1, "b": 2}


# --- autoscale -------------------------------------------------------------------------------------
def test_autoscale_up_on_queueing_and_back_down_when_idle(corral):
    c = corral(
        stub_args("--min-workers", "1", "--max-workers", "3", "--scale-up-wait", "0.5", "--idle-timeout", "2"),
        workers=None,
    )
    admin = admin_of(c)
    doc = admin.ok("GET", "/status")
    assert doc["apps"][0]["desired"] == 1 and doc["apps"][0]["autoscale"]["max_workers"] == 3
    with Watch(admin) as watch:
        with Load(c.port, "/sleep?s=0.3", clients=6) as load:
            c.wait_for(r"autoscale \S+: 1 -> \d workers \(oldest queued request waited")
            wait_status(admin, lambda d: d["apps"][0]["ready"] == 3, timeout=30)
            load.wait_ok(10)
        c.wait_for(r"autoscale \S+: \d -> 1 workers \(\d worker\(s\) unused for idle_timeout", timeout=30)
        wait_status(admin, lambda d: len(d["apps"][0]["workers"]) == 1)
    assert load.failures == []
    assert watch.max_workers == 3  # never above max
    assert "-> 4" not in c.log()


def test_manual_scale_of_autoscaled_app_stays_within_bounds(corral):
    c = corral(stub_args("--min-workers", "1", "--max-workers", "2"), workers=None)
    r = cli("scale", "5", "-p", str(c.port))
    assert r.returncode == 0 and "kept within 1..2" in r.stdout, r.stdout + r.stderr
    assert admin_of(c).ok("GET", "/status")["apps"][0]["ready"] == 2


# --- the autoscale policy, deterministically -----------------------------------------------------
POLICY = Policy(min_workers=1, max_workers=4, scale_up_wait=1.0, idle_timeout=10.0)


def obs(now: float, desired: int, busy: int = 0, depth: int = 0, wait: float = 0.0, starting: int = 0) -> Observation:
    return Observation(now=now, desired=desired, starting=starting, busy=busy, depth=depth, oldest_wait=wait)


@pytest.mark.unit
def test_policy_scales_up_only_after_scale_up_wait_and_not_while_starting():
    d = decide(POLICY, obs(0, 1, busy=1, depth=3, wait=0.5), None)
    assert d.target == 1 and d.reason is None  # queued, but not for long enough
    d = decide(POLICY, obs(1, 1, busy=1, depth=3, wait=1.0), d.memory)
    assert d.target == 2 and "waited 1.0s" in (d.reason or "")  # at most doubling
    d = decide(POLICY, obs(2, 2, busy=1, depth=3, wait=2.0, starting=1), d.memory)
    assert d.target == 2  # the worker asked for is still starting
    d = decide(POLICY, obs(3, 2, busy=2, depth=5, wait=3.0), d.memory)
    assert d.target == 4  # doubling, and the queue wants more
    d = decide(POLICY, obs(4, 4, busy=4, depth=9, wait=4.0), d.memory)
    assert d.target == 4  # never above max


@pytest.mark.unit
def test_policy_steps_up_no_more_than_the_queue_needs():
    d = decide(POLICY, obs(0, 2, busy=2, depth=1, wait=5.0), None)
    assert d.target == 3


@pytest.mark.unit
def test_policy_scales_down_after_idle_timeout_never_below_min():
    mem = decide(POLICY, obs(0, 4, busy=4), None).memory
    d = decide(POLICY, obs(5, 4, busy=2), mem)
    assert d.target == 4  # levels 3 and 4 were needed 5 s ago
    d = decide(POLICY, obs(9.9, 4, busy=2), d.memory)
    assert d.target == 4
    d = decide(POLICY, obs(10, 4, busy=2), d.memory)
    assert d.target == 2 and "2 worker(s) unused" in (d.reason or "")
    d = decide(POLICY, obs(30, 2, busy=0), d.memory)
    assert d.target == 1  # min_workers
    d = decide(POLICY, obs(100, 1, busy=0), d.memory)
    assert d.target == 1


@pytest.mark.unit
def test_policy_queue_counts_as_all_busy_and_manual_scale_is_respected():
    mem = decide(POLICY, obs(0, 3, busy=0), None).memory
    d = decide(POLICY, obs(9, 3, busy=0, depth=1, wait=0.1), mem)
    d = decide(POLICY, obs(15, 3, busy=0), d.memory)
    assert d.target == 3  # the queue 6 s ago kept all three needed
    d = decide(POLICY, obs(20, 4, busy=0), d.memory)  # someone ran `corral scale 4`
    assert d.target == 4
    d = decide(POLICY, obs(30, 4, busy=0), d.memory)
    assert d.target == 1


@pytest.mark.unit
def test_policy_clamps_a_desired_count_outside_the_bounds():
    assert decide(POLICY, obs(0, 7), None).target == 4
    assert decide(Policy(2, 4, 1.0, 10.0), obs(0, 1), None).target == 2
    assert isinstance(decide(POLICY, obs(0, 2), None).memory, Memory)


@pytest.mark.unit
def test_policy_never_scales_down_a_busy_fleet():
    d = decide(POLICY, obs(0, 3, busy=3), None)
    for t in range(1, 60):
        d = decide(POLICY, obs(t, 3, busy=3 if t % 5 else 2), d.memory)
        assert d.target == 3
