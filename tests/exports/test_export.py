"""Issue 5: `corral export nginx|haproxy|systemd`, checked by the real servers from Debian and used
for real: nginx and HAProxy balance the workers `corral run --supervise-only` keeps alive."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import STUB, CorralProc, free_ports, get

HAVE_NGINX = shutil.which("nginx") is not None
HAVE_HAPROXY = shutil.which("haproxy") is not None


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.front = free_ports(4)  # where nginx / HAProxy listen
        self.api = self.front + 1  # two api workers
        self.web = self.front + 3
        self.toml = tmp / "corral.toml"
        cmd = f'command = ["{sys.executable}", "{STUB}", "{{port}}"]'
        self.toml.write_text(
            f"""
[server]
host = "127.0.0.1"
port = {self.front}

[[app]]
name = "api"
route = "/api"
strip_prefix = true
{cmd}
workers = 2
base_port = {self.api}
health_path = "/health"
request_timeout = 20

[[app]]
name = "web"
route = "/web"
{cmd}
workers = 1
base_port = {self.web}
"""
        )
        self.corral: CorralProc | None = None

    def export(self, kind: str, *extra: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "corral", "export", kind, "-c", str(self.toml), *extra],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    def worker_pids(self, app: str) -> set[int]:
        assert self.corral is not None
        pids = set()
        for child in psutil.Process(self.corral.proc.pid).children():
            if child.environ().get("CORRAL_APP") == app:
                pids.add(child.pid)
        return pids


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """One `corral run --supervise-only` for the module: the workers both front ends balance."""
    s = Setup(tmp_path_factory.mktemp("export"))
    # Without a public port of its own, a supervise-only corral needs its own admin socket too.
    admin = f"unix:{s.tmp}/admin.sock"
    s.corral = CorralProc(s.tmp, ["-c", str(s.toml), "--supervise-only", "--admin", admin], workers=None)
    yield s
    s.corral.stop()


def test_supervise_only_runs_the_workers_without_a_balancer_and_says_where_they_are(setup):
    assert setup.corral is not None
    log = setup.corral.log()
    line = next(line for line in log.splitlines() if "all workers ready" in line)
    assert "supervise-only, no balancer" in line
    assert f"api 127.0.0.1:{setup.api}-{setup.api + 1}" in line and f"web 127.0.0.1:{setup.web}" in line
    assert "corral: listening on" not in log
    with socket.socket() as s:  # nothing listens on corral's own port
        assert s.connect_ex(("127.0.0.1", setup.corral.port)) != 0
    assert get(setup.api, "/x").status == 200  # the workers answer directly
    assert len(setup.worker_pids("api")) == 2 and len(setup.worker_pids("web")) == 1


def _through(port: int, setup: Setup) -> None:
    """Requests through a front end reach every worker, with corral's routing rules."""
    api = setup.worker_pids("api")
    seen: set[int] = set()
    for _ in range(40):
        r = get(port, "/api/users/1?x=2")
        assert r.status == 200, r.body
        body = r.json()
        assert body["path"] == "/users/1?x=2" and body["headers"]["x-forwarded-prefix"] == "/api"
        seen.add(body["pid"])
        if seen == api:
            break
    assert seen == api
    assert get(port, "/api").json()["path"] == "/"
    spoofed = get(port, "/api/x", headers="X-Forwarded-For: 6.6.6.6\r\n").json()["headers"]
    assert spoofed["x-forwarded-for"] == "127.0.0.1"  # as corral: a client's own is replaced
    body = get(port, "/web/page").json()
    assert body["pid"] in setup.worker_pids("web") and body["path"] == "/web/page"
    assert "x-forwarded-prefix" not in body["headers"]
    for path in ("/apix", "/", "/nothing/here"):
        r = get(port, path)
        assert r.status == 404 and r.json() == {"error": "no app serves this path", "status": 404}, path


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else b''}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not HAVE_NGINX, reason="nginx not installed (Debian: apt-get install nginx-light)")
def test_nginx_export_passes_nginx_t_and_balances_every_worker(setup):
    conf = setup.export("nginx")
    assert not re.search(r"^\s*keepalive\s", conf, re.M)  # no upstream keep-alive (40 ms plumber stall)
    assert "least_conn;" in conf and "max_fails=1" in conf and "proxy_read_timeout 50s;" in conf
    root = setup.tmp / "nginx"
    (root / "conf.d").mkdir(parents=True)
    (root / "conf.d" / "corral.conf").write_text(conf)
    (root / "nginx.conf").write_text(
        f"""
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{}}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    include conf.d/*.conf;
}}
"""
    )
    base = ["nginx", "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(root / "error.log")]
    t = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
    assert t.returncode == 0 and "test is successful" in t.stderr, t.stderr
    proc = subprocess.Popen([*base, "-g", "daemon off; master_process on;"], stderr=subprocess.PIPE)
    try:
        _wait_listening(setup.front, proc)
        _through(setup.front, setup)
    finally:
        _stop(proc, signal.SIGQUIT)


@pytest.mark.skipif(not HAVE_HAPROXY, reason="haproxy not installed (Debian: apt-get install haproxy)")
def test_haproxy_export_passes_haproxy_c_and_balances_every_worker(setup):
    cfg = setup.export("haproxy")
    assert "option http-server-close" in cfg and "timeout queue 30s" in cfg
    assert "maxconn 1 " in cfg  # max_inflight per server: the rest wait in HAProxy's queue
    assert "timeout check 22s" in cfg  # request_timeout + health_timeout: a busy worker is not down
    assert "http-check send meth GET uri /health" in cfg
    path = setup.tmp / "haproxy.cfg"
    path.write_text(cfg)
    t = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert t.returncode == 0, t.stdout + t.stderr
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_listening(setup.front, proc)
        _through(setup.front, setup)
    finally:
        _stop(proc, signal.SIGUSR1)  # soft stop


def test_systemd_unit_verifies_and_its_execstart_runs_and_stops_gracefully(tmp_path):
    setup = Setup(tmp_path)  # its own ports: the module's workers hold the others
    unit = setup.export("systemd")
    fields = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith(("#", ";")))
    assert fields["KillSignal"] == "SIGTERM" and fields["Restart"] == "on-failure"
    assert fields["TimeoutStopSec"] == "41"  # graceful 30 + kill 5 (+1 s), and a margin of 5
    assert fields["ExecReload"] == "/bin/kill -HUP $MAINPID"
    argv = shlex.split(fields["ExecStart"])
    assert argv[-3:] == ["run", "-c", str(setup.toml.resolve())]
    if shutil.which("systemd-analyze"):
        path = setup.tmp / "corral-test.service"
        path.write_text(unit)
        v = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
        assert v.returncode == 0 and str(path) not in v.stderr, v.stderr  # no unknown or bad keys
    # What systemd would run, run here: it serves, and the stop signal ends it cleanly in time.
    out = setup.tmp / "unit.log"
    with open(out, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=f, cwd=fields["WorkingDirectory"])
    try:
        deadline = time.monotonic() + 30
        while "all workers ready" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        assert get(setup.front, "/api/x").json()["path"] == "/x"
    finally:
        proc.send_signal(getattr(signal, fields["KillSignal"]))
        assert proc.wait(int(fields["TimeoutStopSec"])) == 0
    assert "corral: stopped" in out.read_text()


def test_supervise_only_reload_restarts_workers_on_the_same_ports(corral, tmp_path):
    """nginx and HAProxy know the worker ports: a reload must not move them."""
    c = corral(["--supervise-only", "--admin", f"unix:{tmp_path}/admin.sock", "--", sys.executable, STUB, "{port}"])
    before = {int(p) for p in re.findall(r"ready: pid \d+ port (\d+)", c.log())}
    pids = set(c.worker_pids().values())
    c.proc.send_signal(signal.SIGHUP)
    c.wait_for(r"ready: pid \d+ port \d+", count=4, timeout=30)
    after = {int(p) for p in re.findall(r"ready: pid \d+ port (\d+)", c.log())}
    assert before == after == {c.base_port, c.base_port + 1}
    assert "restarting in place" in c.log()
    new = set(c.worker_pids().values())
    assert new.isdisjoint(pids) and len(new) == 2
    assert get(c.base_port, "/x").json()["pid"] in new


# --- issue 11: the systemd unit's stop bound, the new knobs in the exports -------------------------
def _export(toml: Path, kind: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "corral", "export", kind, "-c", str(toml)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def _unit_fields(unit: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith(("#", ";")))


def test_systemd_stop_timeout_covers_the_longest_drain_and_the_longest_kill_of_different_apps(tmp_path):
    toml = tmp_path / "corral.toml"
    cmd = f'command = ["{sys.executable}", "{STUB}", "{{port}}"]'
    toml.write_text(
        f"[[app]]\nname='a'\nroute='/a'\n{cmd}\nworkers=1\ngraceful_timeout=60\nkill_timeout=1\n"
        f"[[app]]\nname='b'\nroute='/b'\n{cmd}\nworkers=1\ngraceful_timeout=1\nkill_timeout=60\n"
    )
    stop = int(_unit_fields(_export(toml, "systemd"))["TimeoutStopSec"])
    assert stop >= 60 + 60 + 5  # not max(graceful + kill) = 61 + 5: the longest drain, then the longest kill


def test_systemd_unit_stops_in_time_when_a_request_outlives_the_drain_and_the_worker_ignores_sigterm(tmp_path):
    """The worst case the unit must cover: a request still running at graceful_timeout, held by a
    worker that ignores SIGTERM and needs SIGKILL after kill_timeout. corral must exit by itself,
    cleanly, before systemd's TimeoutStopSec would kill it."""
    port = free_ports(2)
    worker = f"trap '' TERM; exec {shlex.quote(sys.executable)} {shlex.quote(STUB)} \"$0\""
    toml = tmp_path / "corral.toml"
    toml.write_text(
        f"[server]\nport = {port}\nadmin = 'unix:{tmp_path}/admin.sock'\n"
        f"[[app]]\nname='a'\ncommand = ['sh', '-c', {json.dumps(worker)}, '{{port}}']\nworkers = 1\n"
        "graceful_timeout = 6\nkill_timeout = 1\n"
        f"env = {{ STUB_LOG = '{tmp_path}/seen.log' }}\n"
    )
    fields = _unit_fields(_export(toml, "systemd"))
    stop = int(fields["TimeoutStopSec"])
    out = tmp_path / "unit.log"
    with open(out, "wb") as f:
        proc = subprocess.Popen(shlex.split(fields["ExecStart"]), stdout=f, stderr=f, cwd=fields["WorkingDirectory"])
    client = socket.socket()
    try:
        deadline = time.monotonic() + 30
        while "all workers ready" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        client.connect(("127.0.0.1", port))
        client.sendall(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
        seen = tmp_path / "seen.log"
        deadline = time.monotonic() + 30
        while not (seen.exists() and "GET /hang" in seen.read_text()):  # the worker holds the request
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        proc.send_signal(getattr(signal, fields["KillSignal"]))
        try:
            code = proc.wait(stop)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"still stopping after TimeoutStopSec={stop}s:\n{out.read_text()}") from None
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
    log = out.read_text()
    assert code == 0 and "corral: stopped" in log, log
    assert "killed by SIGKILL" in log  # the worker really did ignore SIGTERM


def test_exports_with_automatic_max_connections(tmp_path):
    toml = tmp_path / "corral.toml"
    cmd = f'command = ["{sys.executable}", "{STUB}", "{{port}}"]'
    toml.write_text(f"[[app]]\nname='a'\n{cmd}\nworkers=2\n")
    cfg = _export(toml, "haproxy")
    frontend = cfg.split("frontend corral", 1)[1].split("\n\n", 1)[0]
    assert "maxconn" not in frontend.replace("# no maxconn", "")  # HAProxy sizes it from its fd limit, as corral
    assert "None" not in cfg
    unit = _unit_fields(_export(toml, "systemd"))
    assert int(unit["LimitNOFILE"]) >= 65536
    toml.write_text(f"[server]\nmax_connections = 50000\n[[app]]\nname='a'\n{cmd}\nworkers=2\n")
    cfg = _export(toml, "haproxy")
    assert "    maxconn 50000\n" in cfg.split("frontend corral", 1)[1]
    unit = _unit_fields(_export(toml, "systemd"))
    # room for each connection and its upstream connection, and what corral keeps for itself
    from corral import config as C

    loaded = C.load_toml(toml)
    assert C.connection_budget(int(unit["LimitNOFILE"]), loaded) >= 50000


def test_nginx_export_maps_response_buffering_and_send_timeout(tmp_path):
    toml = tmp_path / "corral.toml"
    cmd = f'command = ["{sys.executable}", "{STUB}", "{{port}}"]'
    toml.write_text(
        f"[server]\nsend_timeout = 90\n[[app]]\nname='a'\n{cmd}\nworkers=2\n"
        f"response_buffer = {8 * 1024 * 1024}\nresponse_buffer_file = 0\n"
    )
    conf = _export(toml, "nginx")
    assert "    send_timeout 90s;" in conf
    assert "proxy_buffers 128 64k;" in conf and "proxy_max_temp_file_size 0;" in conf
    assert "proxy_read_timeout 330s;" in conf  # queue_timeout 30 + the default request_timeout 300
    if HAVE_NGINX:
        root = tmp_path / "nginx"
        (root / "conf.d").mkdir(parents=True)
        (root / "conf.d" / "corral.conf").write_text(conf)
        (root / "nginx.conf").write_text(
            f"pid {root}/nginx.pid;\nerror_log {root}/error.log;\nevents {{}}\n"
            f"http {{ access_log off; include conf.d/*.conf; }}\n"
        )
        t = subprocess.run(
            ["nginx", "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(root / "error.log"), "-t"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert t.returncode == 0, t.stderr
