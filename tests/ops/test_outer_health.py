"""Issue 15: health endpoints for outer balancers (--health-listen, /livez, /readyz, ready_min), the
shutdown delay, and two corrals on two "hosts" (network namespaces) behind HAProxy checking /readyz:
SIGTERM to one of them during load loses no request."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import STUB, CorralProc, corral_cli, enter_netns, free_ports, get, ip, read_response, request

PY = sys.executable


class HealthCorral(CorralProc):
    """`corral run` with a health listener: public port P, health P+1, workers from P+2."""

    def __init__(
        self,
        tmp: Path,
        extra: list[str] = (),  # type: ignore[assignment]
        workers: int = 2,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
        ready: bool = True,
        apps: str | None = None,
    ) -> None:
        self.port = free_ports(12)
        self.health = self.port + 1
        self.base_port = self.port + 2
        self.admin = f"{tmp}/admin-{self.port}.sock"
        self.out_path = tmp / f"corral-{self.port}.log"
        self.out = open(self.out_path, "wb")  # noqa: SIM115
        common = ["-p", str(self.port), "--health-listen", f"127.0.0.1:{self.health}", "--admin", f"unix:{self.admin}"]
        if apps is not None:  # [[app]] tables, as many as the test wants
            toml = tmp / f"corral-{self.port}.toml"
            toml.write_text(apps.replace("BASE", str(self.base_port)))
            self.argv = [PY, "-m", "corral", "run", "-c", str(toml), *common, *extra]
        else:
            self.argv = [
                PY, "-m", "corral", "run", *common, "--base-port", str(self.base_port), "-w", str(workers),
                *extra, "--", *(command or [PY, STUB, "{port}"]),
            ]  # fmt: skip
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(self.argv, stdout=self.out, stderr=subprocess.STDOUT, env=full_env, cwd=str(tmp))
        self.wait_for("corral: health on", timeout=30)
        if ready:
            self.wait_for("all workers ready", timeout=60)

    def probe(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        r = request(self.health, f"{method} {path} HTTP/1.1\r\nHost: lb\r\n\r\n".encode(), timeout=5)
        return r.status, r.body

    def until(self, path: str, status: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.probe(path)[0] != status:
            assert time.monotonic() < deadline, f"{path} never answered {status}:\n{self.log()[-3000:]}"
            time.sleep(0.05)


def unix_get(path: str, target: str, headers: str = "") -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode())
        r = read_response(s)
    return r.status, r.body


@pytest.fixture
def started(tmp_path: Path) -> Iterator:
    runs: list[HealthCorral] = []

    def start(*args, **kw) -> HealthCorral:
        c = HealthCorral(tmp_path, *args, **kw)
        runs.append(c)
        return c

    yield start
    for c in runs:
        c.stop()


# --- state changes -------------------------------------------------------------------------------
def test_livez_answers_while_workers_start_and_readyz_turns_200_once_they_are_ready(started):
    slow = ["sh", "-c", f'sleep 2; exec "{PY}" "{STUB}" "$0"', "{port}"]
    c = started(command=slow, ready=False)
    assert c.probe("/livez") == (200, b"ok\n")
    assert c.probe("/readyz") == (503, b"not ready\n")
    assert unix_get(c.admin, "/readyz") == (503, b"not ready\n")  # the same rule on the admin channel
    assert unix_get(c.admin, "/livez") == (200, b"ok\n")
    assert "all workers ready" not in c.log()  # still starting, really
    c.wait_for("all workers ready", timeout=30)
    assert c.probe("/readyz") == (200, b"ready\n")
    assert unix_get(c.admin, "/readyz") == (200, b"ready\n")


def test_readyz_is_503_while_every_worker_is_dead_and_200_again_when_one_is_back(started, tmp_path):
    flag = tmp_path / "cannot-start"
    c = started(env={"STUB_FAIL_START": str(flag)})
    pids = c.worker_pids()
    assert c.probe("/readyz") == (200, b"ready\n")
    flag.write_text("")  # restarts fail from now on
    os.kill(pids[0], signal.SIGKILL)
    c.wait_for(r"worker \S+:0 stopped", timeout=10)
    assert c.probe("/readyz") == (200, b"ready\n")  # one of two left: still ready (ready_min 1)
    os.kill(pids[1], signal.SIGKILL)
    c.until("/readyz", 503, timeout=10)
    assert c.probe("/readyz") == (503, b"not ready\n")
    assert c.probe("/livez") == (200, b"ok\n")  # dead workers are no reason to restart corral
    time.sleep(1.0)
    assert c.probe("/readyz")[0] == 503  # and it stays so while restarts fail
    flag.unlink()
    c.until("/readyz", 200, timeout=30)  # the next restart after backoff comes up
    assert get(c.port, "/x").status == 200


def test_ready_min_is_a_threshold(started, tmp_path):
    flag = tmp_path / "cannot-start"
    c = started(["--ready-min", "2"], env={"STUB_FAIL_START": str(flag)})
    assert c.probe("/readyz")[0] == 200
    flag.write_text("")
    os.kill(c.worker_pids()[1], signal.SIGKILL)
    c.until("/readyz", 503, timeout=10)  # one of two is not enough
    assert get(c.port, "/x").status == 200  # though it still serves whatever reaches it
    flag.unlink()
    c.until("/readyz", 200, timeout=30)


def test_readyz_needs_ready_workers_in_every_app(started, tmp_path):
    flag = tmp_path / "cannot-start"
    app = f'command = ["{PY}", "{STUB}", "{{port}}"]\nworkers = 1\n'
    c = started(
        apps=f"[[app]]\nname = 'a'\nroute = '/a'\n{app}base_port = BASE\n"
        f"[[app]]\nname = 'b'\nroute = '/b'\n{app}env = {{ STUB_FAIL_START = '{flag}' }}\n"
    )
    assert c.probe("/readyz")[0] == 200
    flag.write_text("")
    b_pid = int(re.search(r"worker b:0 ready: pid (\d+)", c.log()).group(1))
    os.kill(b_pid, signal.SIGKILL)
    c.until("/readyz", 503, timeout=10)  # app b has none: not ready, though app a is
    assert get(c.port, "/a/x").status == 200
    flag.unlink()
    c.until("/readyz", 200, timeout=30)


def test_shutdown_delay_keeps_serving_while_readyz_is_503_then_drains(started):
    c = started(["--shutdown-delay", "3"])
    slow = socket.create_connection(("127.0.0.1", c.port), timeout=30)  # in flight across the whole stop
    slow.sendall(b"GET /sleep?s=4.5 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    time.sleep(0.3)
    t0 = time.monotonic()
    c.proc.send_signal(signal.SIGTERM)
    c.wait_for("still serving for 3s", timeout=5)
    assert c.probe("/readyz") == (503, b"draining\n")  # at once: outer balancers stop sending
    assert unix_get(c.admin, "/readyz")[0] == 503
    assert c.probe("/livez") == (200, b"ok\n")  # not a reason to kill it
    served = 0
    while time.monotonic() - t0 < 2.6:  # new connections are still served all through the delay
        r = get(c.port, "/x")
        assert r.status == 200, r.body
        served += 1
        time.sleep(0.2)
    assert served >= 8
    deadline = t0 + 8
    while True:  # then the drain: no new connections
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", c.port)) != 0:
                break
        assert time.monotonic() < deadline, c.log()
        time.sleep(0.05)
    assert time.monotonic() - t0 >= 2.9
    assert c.probe("/livez") == (200, b"ok\n")  # through the drain too
    assert c.probe("/readyz")[0] == 503
    r = read_response(slow)  # the request in flight since before the stop finishes
    slow.close()
    assert r.status == 200
    assert c.proc.wait(20) == 0
    log = c.log()
    delay = log.index("still serving for 3s")
    assert log.index("corral: stopping:", delay) < log.index("corral: stopped")  # the drain came after the delay


def test_a_second_stop_during_the_delay_changes_nothing(started):
    c = started(["--shutdown-delay", "2"])
    t0 = time.monotonic()
    c.proc.send_signal(signal.SIGTERM)
    c.wait_for("still serving for 2s", timeout=5)
    c.proc.send_signal(signal.SIGTERM)  # kubelet's SIGTERM after the preStop `corral stop`
    time.sleep(0.5)
    assert get(c.port, "/x").status == 200
    assert c.proc.wait(20) == 0
    assert time.monotonic() - t0 >= 2.0


# --- the listener itself --------------------------------------------------------------------------
def test_health_port_serves_only_livez_and_readyz(started):
    c = started()
    for path in ("/", "/x", "/status", "/metrics", "/readyz/x", "/livez.json", "/stop"):
        assert c.probe(path)[0] == 404, path
    assert c.probe("/readyz?verbose=1") == (200, b"ready\n")
    assert c.probe("/readyz", "POST")[0] == 405
    r = request(c.health, b"POST /livez HTTP/1.1\r\nHost: lb\r\nContent-Length: 0\r\n\r\n")
    assert r.header("Allow") == "GET, HEAD"
    with socket.create_connection(("127.0.0.1", c.health), timeout=5) as s:
        s.sendall(b"HEAD /livez HTTP/1.1\r\nHost: lb\r\n\r\n")
        r = read_response(s, head_only=True)
        assert r.status == 200 and r.header("Content-Length") == "3"
        assert s.recv(100) == b""  # no body, and closed
    r = request(c.health, b"GET /livez HTTP/1.0\r\n\r\n")  # no Host, HTTP/1.0: a probe is a probe
    assert r.status == 200 and r.header("Connection") == "close"
    assert request(c.health, b"NONSENSE\r\n\r\n").status == 400
    with socket.create_connection(("127.0.0.1", c.health), timeout=5) as s:  # more than a head: refused
        s.sendall(b"GET /livez HTTP/1.1\r\nX: " + b"a" * 10000)
        assert read_response(s).status == 400
    assert get(c.port, "/readyz").json()["path"] == "/readyz"  # the public port is the app's alone


def test_admin_channel_answers_probes_without_its_token(tmp_path):
    port, admin = free_ports(8), free_ports(1)
    p = subprocess.Popen(
        [PY, "-m", "corral", "run", "-p", str(port), "-w", "1", "--admin", f"127.0.0.1:{admin}",
         "--admin-token", "s3cret", "--", PY, STUB, "{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if get(admin, "/readyz", headers="Host: 127.0.0.1\r\n").status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = request(admin, b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert (r.status, r.body) == (200, b"ok\n")
        r = request(admin, b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert r.status == 401  # the rest of the channel still needs it
    finally:
        p.terminate()
        p.wait(30)


def test_probes_answer_at_once_while_the_queue_is_long(started):
    """The health listener never waits in the central queue: one worker busy, 30 requests queued."""
    c = started(["--graceful-timeout", "1"], workers=1)
    held = []
    for _ in range(30):
        s = socket.create_connection(("127.0.0.1", c.port), timeout=30)
        s.sendall(b"GET /sleep?s=2 HTTP/1.1\r\nHost: t\r\n\r\n")
        held.append(s)
    try:
        time.sleep(0.3)
        status = unix_get(c.admin, "/status")
        assert status[0] == 200
        for _ in range(20):
            t = time.monotonic()
            assert c.probe("/livez")[0] == 200
            assert c.probe("/readyz")[0] == 200  # busy is ready: the worker is in rotation
            assert time.monotonic() - t < 0.5
    finally:
        for s in held:
            s.close()


def test_health_listen_is_checked_before_anything_starts(tmp_path):
    port = free_ports(4)

    def refused(*args: str) -> str:
        r = corral_cli("run", "-p", str(port), *args, "--", PY, STUB, "{port}", timeout=30)
        assert r.returncode == 2, r.stdout + r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("corral: "), r.stderr
        return lines[0]

    assert "the public port" in refused("--health-listen", f"127.0.0.1:{port}")
    assert "health_listen: must be HOST:PORT" in refused("--health-listen", "localhost")
    assert "health_listen: must be HOST:PORT" in refused("--health-listen", "db.example:9000")
    assert "is also used by the health listener" in refused("-w", "2", "--health-listen", f"127.0.0.1:{port + 2}")
    assert "ready_min: app 'python' may run only 2 workers" in refused("-w", "2", "--ready-min", "3")
    assert "ready_min: must be <=" in refused("--ready-min", "100000")
    assert "shutdown_delay: must be <= 3600" in refused("--shutdown-delay", "7200")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        line = refused("-w", "1", "--health-listen", f"127.0.0.1:{taken}")
    assert f"health listener 127.0.0.1:{taken} is not available" in line
    r = corral_cli("run", "-p", str(port), "-w", "1", "--min-workers", "1", "--max-workers", "3",
                   "--ready-min", "2", "--", PY, STUB, "{port}", timeout=30)  # fmt: skip
    assert r.returncode == 2 and "autoscaling's min_workers" in r.stderr  # scaled down, it would never be ready


# --- two hosts behind HAProxy ----------------------------------------------------------------------
NET = "10.78"  # our own namespaces' addresses, invisible outside them


class Lab:
    """Three 'machines': the balancer host (HAProxy and the clients) and two corral hosts, each on its
    own veth link. Where namespaces are refused, loopback addresses stand in (127.0.0.1 for the
    balancer, 127.0.0.2 and 127.0.0.3 for the corrals)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.ns = {k: f"corral-{k}{tag}" for k in ("lb", "a", "b")}
        self.namespaces = False
        self.ip = {"lb": "127.0.0.1", "a": "127.0.0.2", "b": "127.0.0.3"}
        self.procs: list[subprocess.Popen] = []
        self.pool: cf.ThreadPoolExecutor | None = None

    def create(self) -> None:
        if shutil.which("ip") is None:
            return self._fallback("the `ip` command is missing (Debian: iproute2)")
        r = ip("netns", "add", self.ns["lb"])
        if r.returncode != 0:
            return self._fallback(f"`ip netns add` refused: {r.stderr.strip()}")
        self.namespaces = True
        cmds = [["netns", "add", self.ns["a"]], ["netns", "add", self.ns["b"]]]
        for i, host in enumerate(("a", "b"), start=1):
            near, far = f"l{host}{self.tag}", f"h{host}{self.tag}"
            cmds += [
                ["link", "add", near, "type", "veth", "peer", "name", far],
                ["link", "set", near, "netns", self.ns["lb"]],
                ["link", "set", far, "netns", self.ns[host]],
                ["-n", self.ns["lb"], "addr", "add", f"{NET}.{i}.1/24", "dev", near],
                ["-n", self.ns[host], "addr", "add", f"{NET}.{i}.2/24", "dev", far],
                ["-n", self.ns["lb"], "link", "set", near, "up"],
                ["-n", self.ns[host], "link", "set", far, "up"],
                ["-n", self.ns[host], "link", "set", "lo", "up"],
            ]
            self.ip[host] = f"{NET}.{i}.2"
        cmds.append(["-n", self.ns["lb"], "link", "set", "lo", "up"])
        for cmd in cmds:
            r = ip(*cmd)
            assert r.returncode == 0, f"ip {' '.join(cmd)}: {r.stderr}"

    def _fallback(self, why: str) -> None:
        warnings.warn(f"{why}: the HAProxy test ran on loopback addresses instead of namespaces", stacklevel=2)

    def destroy(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if self.pool is not None:
            self.pool.shutdown()
        if self.namespaces:
            for ns in self.ns.values():
                ip("netns", "del", ns)  # takes its ends of the veth pairs, and so the pairs, with it

    def start(self, host: str, argv: list[str], log: Path) -> subprocess.Popen:
        prefix = ["ip", "netns", "exec", self.ns[host]] if self.namespaces else []
        with open(log, "wb") as out:
            p = subprocess.Popen(
                [*prefix, *argv], stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1")
            )
        self.procs.append(p)
        return p

    def clients(self, n: int) -> cf.ThreadPoolExecutor:
        """Threads on the balancer host: each has entered its network namespace."""
        if self.pool is None:
            self.pool = cf.ThreadPoolExecutor(n, initializer=self._enter_lb)
        return self.pool

    def _enter_lb(self) -> None:
        if not self.namespaces:
            return
        enter_netns(self.ns["lb"])


def _get_at(host: str, port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        r = read_response(s)
    return r.status, r.body


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab(str(os.getpid() % 100000))
    try:
        lab.create()
        yield lab
    finally:
        lab.destroy()


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed (Debian: apt-get install haproxy)")
def test_sigterm_to_one_of_two_corrals_behind_haproxy_loses_no_request(lab, tmp_path):
    block = free_ports(12)
    front, port, health = block, block + 1, block + 2  # the same numbers on both corral hosts
    logs = {h: tmp_path / f"corral-{h}.log" for h in ("a", "b")}
    for i, h in enumerate(("a", "b")):
        host = "0.0.0.0" if lab.namespaces else lab.ip[h]
        (tmp_path / f"{h}.toml").write_text(
            f"""
[server]
host = "{host}"
port = {port}
health_listen = "{host}:{health}"
shutdown_delay = 2
admin = "unix:{tmp_path}/{h}.sock"

[[app]]
name = "api"
command = ["{PY}", "{STUB}", "{{port}}"]
workers = 2
base_port = {block + 4 + 4 * i}
graceful_timeout = 10
"""
        )
    corrals = {
        h: lab.start(h, [PY, "-m", "corral", "run", "-c", str(tmp_path / f"{h}.toml")], logs[h]) for h in ("a", "b")
    }
    for h in ("a", "b"):
        _wait_log(logs[h], "all workers ready", corrals[h])
    pids = {h: {int(p) for p in _ready_pids(logs[h])} for h in ("a", "b")}
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        f"""
global
    log stdout format raw local0 info

defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    option http-server-close
    retries 0

frontend fe
    bind {lab.ip["lb"]}:{front}
    default_backend corrals

backend corrals
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host corral
    http-check expect status 200
    default-server check port {health} inter 200ms fall 1 rise 2
    server a {lab.ip["a"]}:{port}
    server b {lab.ip["b"]}:{port}
"""
    )
    lb_log = tmp_path / "haproxy.log"
    haproxy = lab.start("lb", ["haproxy", "-db", "-f", str(cfg)], lb_log)
    pool = lab.clients(5)

    def served_by() -> str:
        status, body = _get_at(lab.ip["lb"], front, "/x")
        assert status == 200, body
        pid = json.loads(body)["pid"]
        return next(h for h in ("a", "b") if pid in pids[h])

    deadline = time.monotonic() + 20
    while True:  # both corrals in rotation (HAProxy checks /readyz on each)
        try:
            if {pool.submit(served_by).result() for _ in range(6)} == {"a", "b"}:
                break
        except (OSError, AssertionError, StopIteration):
            pass
        assert haproxy.poll() is None, lb_log.read_text()
        assert time.monotonic() < deadline, lb_log.read_text()
        time.sleep(0.2)

    stop = threading.Event()
    results: list[tuple[float, int, str]] = []  # (sent at, status, served by)
    errors: list[str] = []
    lock = threading.Lock()

    def load() -> None:
        end = time.monotonic() + 20
        for _ in range(2000):  # bounded in count and in time
            if stop.is_set() or time.monotonic() > end:
                return
            sent = time.monotonic()
            try:
                status, body = _get_at(lab.ip["lb"], front, "/sleep?s=0.05")
            except OSError as exc:
                with lock:
                    errors.append(repr(exc))
                continue
            who = "?"
            if status == 200:
                pid = json.loads(body)["pid"]
                who = next((h for h in ("a", "b") if pid in pids[h]), "?")
            with lock:
                results.append((sent, status, who))

    loaders = [pool.submit(load) for _ in range(4)]
    time.sleep(1.5)
    t_term = time.monotonic()
    corrals["a"].send_signal(signal.SIGTERM)
    # A check racing the signal may still be answered 200 (signal and socket are separate events); once
    # corral has taken the signal, every check gets 503 while it keeps serving for shutdown_delay.
    _wait_log(logs["a"], "still serving for", corrals["a"])
    readyz = pool.submit(_get_at, lab.ip["a"], health, "/readyz").result()
    draining_and_serving = corrals["a"].poll() is None
    assert corrals["a"].wait(30) == 0, logs["a"].read_text()
    t_gone = time.monotonic()
    time.sleep(1.0)
    stop.set()
    for f in loaders:
        f.result()

    assert readyz == (503, b"draining\n") and draining_and_serving  # HAProxy takes `a` out before it stops accepting
    assert not errors, errors[:5]
    bad = [r for r in results if r[1] != 200]
    assert not bad, f"{len(bad)} of {len(results)} failed: {bad[:5]}\n{lb_log.read_text()[-3000:]}"
    assert len(results) >= 50
    before = [r for r in results if r[0] < t_term]
    assert {r[2] for r in before} == {"a", "b"}  # both served until the SIGTERM
    assert all(r[2] == "b" for r in results if r[0] > t_gone)  # and `b` alone after `a` was gone
    assert any(r[0] > t_gone for r in results)
    log_a = logs["a"].read_text()
    assert "still serving for 2s" in log_a and "corral: stopped" in log_a
    assert t_gone - t_term >= 2.0  # the delay was kept
    assert corrals["b"].poll() is None


def _wait_log(log: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def _ready_pids(log: Path) -> list[str]:
    return re.findall(r"ready: pid (\d+)", log.read_text())
