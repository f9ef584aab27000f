"""Issue 20 #5 and #6: the admin channel under faults. Its connections are capped (admin_max_connections)
and each owes a whole request within header_timeout, so it cannot take the public port's descriptors;
an admin request asking to upgrade gets one answer (400) and does nothing."""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import subprocess
import sys
import time

from conftest import STUB, child_env, free_ports, get, poll, read_response, request

from corral.cli.verbs import AdminClient

FD_LIMIT = 256  # corral's whole open-file limit (soft and hard: corral raises soft to hard at start)
CLIENTS = 400  # admin connections the test opens: far past what 256 descriptors hold
CAP = 16  # admin_max_connections' default


def _status_call(aport: int) -> bytes:
    return f"GET /status HTTP/1.1\r\nHost: 127.0.0.1:{aport}\r\nConnection: close\r\n\r\n".encode()


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _room_for(n: int) -> None:
    """This test process must be able to hold n more sockets than it has."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 200
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard) if hard != resource.RLIM_INFINITY else want, hard))


class Held:
    """One admin connection that sent a single byte, and what corral did with it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.got = b""
        self.ended = False  # corral answered and/or closed it

    def check(self) -> bool:
        if not self.ended:
            try:
                while True:
                    data = self.sock.recv(65536)
                    if not data:
                        self.ended = True
                        break
                    self.got += data
            except BlockingIOError:
                pass
            except OSError:  # reset: closed with our byte unread
                self.ended = True
        return self.ended


def test_admin_connections_past_the_cap_are_refused_and_the_public_port_keeps_serving(tmp_path):
    port = free_ports(10)
    aport = free_ports(1)
    out = tmp_path / "corral.log"
    argv = [
        sys.executable,
        "-m",
        "corral",
        "run",
        "-p",
        str(port),
        "-w",
        "1",
        "--admin",
        f"127.0.0.1:{aport}",
        "--header-timeout",
        "60",
        "--",
        sys.executable,
        STUB,
        "{port}",
    ]  # held ones outlive the test's steps
    _room_for(CLIENTS)
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            argv, stdout=sink, stderr=subprocess.STDOUT, env=child_env(PYTHONUNBUFFERED="1"), preexec_fn=_limit_fds
        )
    held: list[Held] = []
    try:
        poll("corral ready", lambda: "all workers ready" in out.read_text() or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, out.read_text()
        for _ in range(CLIENTS):
            try:
                s = socket.create_connection(("127.0.0.1", aport), timeout=5)
            except OSError:
                break  # corral stopped accepting: the backlog is full
            with contextlib.suppress(OSError):  # refused already
                s.sendall(b"G")  # one byte of a request, never more
            s.setblocking(False)
            held.append(Held(s))
        # The public port still has descriptors: a real request is served.
        r = get(port, "/x", timeout=10)
        assert r.status == 200, (r.status, r.body, out.read_text()[-3000:])
        assert len(held) == CLIENTS
        # Past the cap, connections are answered 503 and closed at once; CAP of them stay open.
        poll("connections past the cap refused", lambda: sum(h.check() for h in held) >= CLIENTS - CAP)
        assert sum(not h.check() for h in held) == CAP
        answers = {h.got.split(b"\r\n", 1)[0] for h in held if h.got}
        assert answers == {b"HTTP/1.1 503 Service Unavailable"}, answers
        with contextlib.suppress(ConnectionError):  # the cap is reached: a new admin call is refused alike
            assert request(aport, _status_call(aport), timeout=10).status == 503
        assert get(port, "/x", timeout=10).status == 200
        # Once the held connections go, the admin channel answers again.
        for h in held:
            h.sock.close()
        poll("admin answering again", lambda: _answers(aport) == 200)
        doc = AdminClient(f"127.0.0.1:{aport}").ok("GET", "/status")
        assert doc["apps"][0]["ready"] == 1
        log = out.read_text()
        assert proc.poll() is None and "Traceback" not in log and "out of file descriptors" not in log, log[-3000:]
    finally:
        for h in held:
            h.sock.close()
        proc.terminate()
        proc.wait(30)


def _answers(aport: int) -> int:
    try:
        return request(aport, _status_call(aport), timeout=10).status
    except OSError:
        return 0


def test_an_admin_request_must_arrive_whole_within_header_timeout(corral):
    aport = free_ports(1)
    corral(["--admin", f"127.0.0.1:{aport}", "--header-timeout", "1", "--", sys.executable, STUB, "{port}"], workers=1)
    # Trickled: a byte every 50 ms used to re-arm a 60 s idle timer, forever. Now the request's deadline holds.
    with socket.create_connection(("127.0.0.1", aport), timeout=10) as s:
        s.sendall(f"GET /status HTTP/1.1\r\nHost: 127.0.0.1:{aport}\r\nX-Pad: ".encode())
        answered = False
        for _ in range(200):  # 10 s of bytes at most
            try:
                s.sendall(b"a")
            except OSError:
                break
            if select.select([s], [], [], 0.05)[0]:
                answered = True
                break
        assert answered, "a trickled admin request was still open after 10 s (header_timeout 1 s)"
        r = read_response(s)
        assert r.status == 408 and "header_timeout" in r.json()["error"]
    # Silent: a connection that sends nothing is closed with the same answer.
    with socket.create_connection(("127.0.0.1", aport), timeout=10) as s:
        assert read_response(s).status == 408
    # Kept alive, a connection may wait longer than header_timeout between requests (the dashboard polls).
    with socket.create_connection(("127.0.0.1", aport), timeout=10) as s:
        call = f"GET /livez HTTP/1.1\r\nHost: 127.0.0.1:{aport}\r\n\r\n".encode()
        s.sendall(call)
        assert read_response(s).status == 200
        time.sleep(1.5)  # the gap is the point: longer than header_timeout, idle between requests
        s.sendall(call)
        assert read_response(s).status == 200


def _whole_exchange(aport: int, raw: bytes) -> tuple[bytes, bool]:
    """Everything the admin channel sends back for raw, up to its close (or 3 s of silence)."""
    got = b""
    with socket.create_connection(("127.0.0.1", aport), timeout=10) as s:
        s.sendall(raw)
        s.settimeout(3)
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    return got, True
                got += data
        except TimeoutError:
            return got, False
        except ConnectionResetError:
            return got, True


def test_an_admin_upgrade_request_gets_one_answer_and_changes_nothing(corral):
    aport = free_ports(1)
    c = corral(["--admin", f"127.0.0.1:{aport}", "--", sys.executable, STUB, "{port}"], workers=1)
    admin = AdminClient(f"127.0.0.1:{aport}")
    asks = (b"Upgrade: x\r\nConnection: upgrade\r\n", b"Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n")
    for upgrade in asks:
        raw = b"POST /reload HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%sContent-Length: 0\r\n\r\n" % (aport, upgrade)
        got, closed = _whole_exchange(aport, raw)
        assert got.count(b"HTTP/1.1 ") == 1, got  # one request, one answer
        assert got.startswith(b"HTTP/1.1 400 ") and b"upgrade not supported" in got, got
        assert closed
    app = admin.ok("GET", "/status")["apps"][0]
    assert app["generation"] == 0 and not app["reloading"]  # refused before acting: no reload
    assert "reloading" not in c.log() and "replaced by pid" not in c.log()
    # the channel itself is fine: an ordinary reload still works
    assert admin.call("POST", "/reload")[0] == 202
    c.wait_for("draining: replaced by pid")
