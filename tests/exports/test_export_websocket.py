"""Issue 12: `corral export nginx|haproxy` for WebSocket apps, checked by `nginx -t` / `haproxy -c` and used
for real: WebSocket echo workers (tests/support/ws_echo_worker.py) kept alive by `corral run --supervise-only`,
behind nginx and behind HAProxy started from the exported files.

Three apps cover the three stickiness modes: `chat` on / (cookie), `feed` on /feed with its prefix stripped
(ip), `api` on /api (none, one worker, max_sessions = 1). Clients get distinct source addresses
(127.0.0.2, 127.0.0.3, ...) so that address stickiness has several clients to spread."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SUPPORT, CorralProc, free_ports

websockets = pytest.importorskip("websockets", reason="the websockets package (test extras) is not installed")
from websockets.exceptions import ConnectionClosedOK  # noqa: E402
from websockets.sync.client import ClientConnection, connect  # noqa: E402

ECHO = str(SUPPORT / "ws_echo_worker.py")
HAVE_NGINX = shutil.which("nginx") is not None
HAVE_HAPROXY = shutil.which("haproxy") is not None
CLIENTS = [f"127.0.0.{i}" for i in range(2, 14)]  # Linux answers on all of 127/8


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.front = free_ports(6)  # where nginx / HAProxy listen, then the five workers
        self.chat, self.feed, self.api = self.front + 1, self.front + 3, self.front + 5
        self.toml = tmp / "corral.toml"
        cmd = f'command = ["{sys.executable}", "{ECHO}", "{{port}}"]'
        self.toml.write_text(
            f"""
[server]
port = {self.front}

[[app]]
name = "chat"
{cmd}
workers = 2
base_port = {self.chat}
sticky = "cookie"
ws_idle_timeout = 600

[[app]]
name = "feed"
route = "/feed"
strip_prefix = true
{cmd}
workers = 2
base_port = {self.feed}
sticky = "ip"

[[app]]
name = "api"
route = "/api"
{cmd}
workers = 1
base_port = {self.api}
max_sessions = 1
"""
        )
        self.corral: CorralProc | None = None

    def export(self, kind: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "corral", "export", kind, "-c", str(self.toml)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = Setup(tmp_path_factory.mktemp("export-ws"))
    s.corral = CorralProc(
        s.tmp, ["-c", str(s.toml), "--supervise-only", "--admin", f"unix:{s.tmp}/admin.sock"], workers=None
    )
    yield s
    s.corral.stop()


# --- clients ----------------------------------------------------------------------------------------
def ws(port: int, path: str, source: str = "127.0.0.1", cookie: str | None = None) -> ClientConnection:
    headers = {"Cookie": cookie} if cookie else None
    return connect(
        f"ws://127.0.0.1:{port}{path}",
        source_address=(source, 0),
        additional_headers=headers,
        max_size=None,
        open_timeout=30,
        close_timeout=10,
    )


def ask(conn: ClientConnection, text: str) -> str:
    conn.send(text)
    answer = conn.recv(timeout=30)
    assert isinstance(answer, str)
    return answer


def plain(port: int, path: str, source: str = "127.0.0.1") -> tuple[int, str, str | None]:
    """GET over plain HTTP: status, body (`worker INDEX PID PATH`), Set-Cookie."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode(), r.getheader("set-cookie")
    finally:
        conn.close()


# --- front ends ------------------------------------------------------------------------------------
def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else b''}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")


def _stop(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_all_up(port: int) -> None:
    """Until each app answers through the front end (HAProxy's first checks take a moment)."""
    deadline = time.monotonic() + 30
    for path in ("/", "/feed/", "/api/"):
        while True:
            try:
                if plain(port, path)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{path} never answered 200"
            time.sleep(0.1)


def start_nginx(setup: Setup) -> subprocess.Popen:
    root = setup.tmp / "nginx"
    (root / "conf.d").mkdir(parents=True, exist_ok=True)
    (root / "conf.d" / "corral.conf").write_text(setup.export("nginx"))
    (root / "nginx.conf").write_text(
        f"pid {root}/nginx.pid;\nerror_log {root}/error.log;\nevents {{}}\n"
        f"http {{\n    access_log {root}/access.log;\n    client_body_temp_path {root}/body;\n"
        f"    proxy_temp_path {root}/proxy;\n    include conf.d/*.conf;\n}}\n"
    )
    base = ["nginx", "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(root / "error.log")]
    t = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
    assert t.returncode == 0 and "test is successful" in t.stderr, t.stderr
    proc = subprocess.Popen([*base, "-g", "daemon off; master_process on;"], stderr=subprocess.PIPE)
    _wait_listening(setup.front, proc)
    return proc


def start_haproxy(setup: Setup) -> subprocess.Popen:
    path = setup.tmp / "haproxy.cfg"
    path.write_text(setup.export("haproxy"))
    t = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert t.returncode == 0, t.stdout + t.stderr
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_listening(setup.front, proc)
    return proc


# --- what both front ends must do -------------------------------------------------------------------
def echoes_and_closes(port: int) -> None:
    """Text and binary frames, a 1 MB message, forwarding headers, and the close handshake from each side."""
    with ws(port, "/room") as c:
        assert ask(c, "hello") == "hello"
        c.send(b"\x00\x01\xff")
        assert c.recv(timeout=30) == b"\x00\x01\xff"
        big = bytes(range(256)) * 4096  # 1 MiB
        c.send(big)
        assert c.recv(timeout=30) == big
        headers = json.loads(ask(c, "headers"))
        assert headers["x-forwarded-for"] == "127.0.0.1" and "cookie" not in headers
    with ws(port, "/room") as c:  # the worker closes: the client sees a clean close, code and reason intact
        c.send("close")
        with pytest.raises(ConnectionClosedOK) as closed:
            c.recv(timeout=30)
        assert closed.value.rcvd is not None and (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "bye")


def strips_the_prefix(port: int) -> None:
    with ws(port, "/feed/a/b?q=1") as c:
        assert ask(c, "path") == "/a/b?q=1"
        assert json.loads(ask(c, "headers"))["x-forwarded-prefix"] == "/feed"
    with ws(port, "/feed") as c:
        assert ask(c, "path") == "/"


def sticks_by_address(port: int, prefix: str) -> dict[str, str]:
    """Each client address reaches one worker, its page requests and its sessions alike; the addresses
    spread over both workers. Returns address -> worker index."""
    chosen: dict[str, str] = {}
    for source in CLIENTS:
        seen = set()
        for _ in range(2):
            with ws(port, f"{prefix}/s", source) as c:
                seen.add(ask(c, "whoami"))
            status, body, _ = plain(port, f"{prefix}/page", source)
            assert status == 200
            seen.add(body.split()[1])
        assert len(seen) == 1, (source, seen)
        chosen[source] = seen.pop()
    assert set(chosen.values()) == {"0", "1"}, chosen
    return chosen


def a_session_does_not_hold_the_request_slot(port: int) -> None:
    """`api` has one worker taking one request at a time: an open session must not block its requests."""
    with ws(port, "/api/live") as c:
        assert ask(c, "whoami") == "0"
        for _ in range(3):
            assert plain(port, "/api/x")[0] == 200
        assert ask(c, "still here") == "still here"


# --- the tests ----------------------------------------------------------------------------------------
def test_exports_carry_websocket_and_stickiness_blocks(setup):
    conf = setup.export("nginx")
    assert "map $http_upgrade $corral_connection_upgrade {" in conf and "proxy_http_version 1.1;" in conf
    assert "proxy_set_header Upgrade $corral_upgrade;" in conf
    assert "proxy_set_header Connection $corral_connection_upgrade;" in conf
    assert "location @corral_chat_websocket {" in conf and "proxy_read_timeout 600s;" in conf  # ws_idle_timeout
    assert "proxy_read_timeout 3600s;" in conf  # the default, for feed and api
    assert conf.count("hash $remote_addr consistent;") == 2 and conf.count("least_conn;") == 1
    assert "cannot set a cookie" in conf  # cookie mode is approximated, and says so
    cfg = setup.export("haproxy")
    assert "cookie corral_sticky insert indirect nocache" in cfg
    assert f"server chat0 127.0.0.1:{setup.chat} cookie s0" in cfg
    assert "balance source" in cfg and "timeout tunnel 600s" in cfg and "timeout tunnel 3600s" in cfg
    assert "use_backend corral_chat_ws if corral_websocket" in cfg
    api_ws = cfg.split("\nbackend corral_api_ws\n", 1)[1].split("\n\n", 1)[0]
    assert "default-server maxconn 1" in api_ws and "track corral_api/api0" in api_ws  # max_sessions


@pytest.mark.skipif(not HAVE_NGINX, reason="nginx not installed (Debian: apt-get install nginx-light)")
def test_websockets_through_nginx_from_the_export(setup):
    proc = start_nginx(setup)
    try:
        _wait_all_up(setup.front)
        echoes_and_closes(setup.front)
        strips_the_prefix(setup.front)
        sticks_by_address(setup.front, "/feed")
        sticks_by_address(setup.front, "")  # cookie mode: by address in nginx, as the export says
        a_session_does_not_hold_the_request_slot(setup.front)
    finally:
        _stop(proc, signal.SIGQUIT)


@pytest.mark.skipif(not HAVE_HAPROXY, reason="haproxy not installed (Debian: apt-get install haproxy)")
def test_websockets_through_haproxy_from_the_export(setup):
    proc = start_haproxy(setup)
    try:
        _wait_all_up(setup.front)
        echoes_and_closes(setup.front)
        strips_the_prefix(setup.front)
        sticks_by_address(setup.front, "/feed")
        a_session_does_not_hold_the_request_slot(setup.front)
        sticks_by_cookie(setup.front)
        a_full_worker_queues_the_next_session(setup.front)
    finally:
        _stop(proc, signal.SIGUSR1)


def sticks_by_cookie(port: int) -> None:
    """A new client gets corral_sticky from its first page; its sessions follow the cookie to that worker,
    every time and from any address; new clients spread over both workers."""
    workers = set()
    for i in range(4):
        status, body, set_cookie = plain(port, "/", CLIENTS[i])
        assert status == 200 and set_cookie and set_cookie.startswith("corral_sticky=s"), set_cookie
        cookie = set_cookie.split(";")[0]
        page_worker = body.split()[1]
        for source in CLIENTS[:3]:
            with ws(port, "/room", source, cookie=cookie) as c:
                assert ask(c, "whoami") == page_worker
                assert "cookie" not in json.loads(ask(c, "headers"))  # indirect: the worker never sees it
        workers.add(page_worker)
    assert workers == {"0", "1"}


def a_full_worker_queues_the_next_session(port: int) -> None:
    """`api`: one worker, max_sessions = 1. A second session waits in the backend's queue while the first
    is open, and is served when it closes (the delay below only gives a wrong answer time to show)."""
    first_closed = threading.Event()
    outcome: list[object] = []

    def second() -> None:
        try:
            with ws(port, "/api/second") as c:
                outcome.append(first_closed.is_set())
                outcome.append(ask(c, "whoami"))
        except Exception as exc:  # reported by the assertion below
            outcome.append(exc)

    with ws(port, "/api/first") as c:
        assert ask(c, "whoami") == "0"
        t = threading.Thread(target=second, daemon=True)
        t.start()
        time.sleep(1.0)
        assert not outcome, outcome  # not served beside the first
        first_closed.set()
    t.join(30)
    assert outcome == [True, "0"], outcome
