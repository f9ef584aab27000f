"""Issue 14: corral under systemd: sd_notify (READY, STATUS, RELOADING, STOPPING, WATCHDOG), socket
activation (LISTEN_FDS), and `corral export systemd` with Type=notify, WatchdogSec and a .socket unit.

The notify socket is a real unix datagram socket the test binds; the activation socket a real listening
socket passed as fd 3, the way systemd does it. No timing assertions.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import STUB, corral_cli, free_ports, get, read_response, stub_args


class NotifySocket:
    """What a service manager hears: every datagram corral sends to $NOTIFY_SOCKET, in order.

    A thread drains the socket as it comes, as PID 1 does: the kernel queues only
    net.unix.max_dgram_qlen datagrams (10 here), and a test busy elsewhere would make corral's sends
    fail with EAGAIN."""

    def __init__(self, tmp: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"corral-test-notify-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            path = tmp / "notify.sock"
            self.sock.bind(str(path))
            self.env = str(path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.heard = threading.Condition()
        self.closed = False
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.heard:
                self.messages.append(data.decode())
                self.heard.notify_all()

    def until(self, field: str, after: int = 0, timeout: float = 60.0) -> int:
        """Index of the first message from `after` on that carries the line `field`."""
        deadline = time.monotonic() + timeout
        with self.heard:
            while True:
                for i in range(after, len(self.messages)):
                    if field in self.messages[i].split("\n"):
                        return i
                left = deadline - time.monotonic()
                assert left > 0, f"no {field!r} after #{after}: {self.messages[-20:]}"
                self.heard.wait(left)

    def close(self) -> None:
        self.closed = True
        self.reader.join(5)
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_socket_hears_ready_status_watchdog_reloading_and_stopping(corral, tmp_path, abstract):
    ns = NotifySocket(tmp_path, abstract)
    try:
        c = corral(stub_args(), workers=2, env={"NOTIFY_SOCKET": ns.env, "WATCHDOG_USEC": "400000"})
        ready = ns.until("READY=1")
        lines = ns.messages[ready].split("\n")
        status = next(line for line in lines if line.startswith("STATUS="))
        assert re.search(r"2/2 workers ready", status), status
        assert not any("READY=1" in m for m in ns.messages[:ready])  # never before every worker is ready
        ns.until("WATCHDOG=1")
        ns.until("WATCHDOG=1", after=ns.until("WATCHDOG=1") + 1)  # it keeps pinging
        c.proc.send_signal(signal.SIGHUP)
        reloading = ns.until("RELOADING=1", after=ready + 1)
        assert any(line.startswith("MONOTONIC_USEC=") for line in ns.messages[reloading].split("\n"))
        ns.until("READY=1", after=reloading + 1)
        c.wait_for(r" ready: pid ", count=4)
        assert c.stop() == 0
        ns.until("STOPPING=1")
    finally:
        ns.close()
    assert "sd_notify" not in c.log()  # no complaint: every datagram went through


def test_workers_do_not_inherit_the_notify_socket(corral, tmp_path):
    ns = NotifySocket(tmp_path, abstract=False)
    try:
        c = corral(
            [
                "--",
                "sh",
                "-c",
                'echo "worker sees NOTIFY_SOCKET=[$NOTIFY_SOCKET]"; exec "$0" "$1" "$2"',
                sys.executable,
                STUB,
                "{port}",
            ],
            workers=1,
            env={"NOTIFY_SOCKET": ns.env},
        )
        c.wait_for(r"worker sees NOTIFY_SOCKET=\[\]")
        ns.until("READY=1")
    finally:
        ns.close()


# Run as `python -c ACTIVATE FD ARGV...`: what systemd does for a .socket unit between fork and exec. The
# listening socket becomes fd 3, LISTEN_FDS=1, and LISTEN_PID is this process's pid, which exec keeps.
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def activate(listener: socket.socket, argv: list[str], log: Path, **kw) -> subprocess.Popen[bytes]:
    fd = listener.fileno()
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", ACTIVATE, str(fd), *argv], pass_fds=(fd,), stdout=out, stderr=out, **kw
        )


def _activated(port: int, listener: socket.socket, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """Start corral the way systemd does for a .socket unit."""
    argv = [sys.executable, "-m", "corral", "run", "-p", str(port), "-w", "1", *args]
    return activate(listener, [*argv, "--", sys.executable, STUB, "{port}"], log)


def _wait_log(proc: subprocess.Popen[bytes], log: Path, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 60
    while log.read_text().count(text) < count:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def test_socket_activation_serves_on_the_inherited_socket_and_a_restart_refuses_no_connection(tmp_path):
    port = free_ports(8)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    log = tmp_path / "corral.log"
    # A client that comes before corral runs waits in the socket's backlog, as under systemd.
    early = socket.create_connection(("127.0.0.1", port), timeout=60)
    early.sendall(b"GET /early HTTP/1.1\r\nHost: t\r\n\r\n")
    proc = _activated(port, listener, log)
    try:
        _wait_log(proc, log, "all workers ready")
        assert read_response(early).status == 200
        assert get(port, "/x").status == 200
        assert "socket from systemd" in log.read_text() and "not available" not in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        # corral is gone, the socket is not (systemd holds it): a client connecting now waits, and the
        # next corral answers it.
        between = socket.create_connection(("127.0.0.1", port), timeout=60)
        between.sendall(b"GET /between HTTP/1.1\r\nHost: t\r\n\r\n")
        proc = _activated(port, listener, log)
        assert read_response(between).status == 200
        _wait_log(proc, log, "all workers ready", count=2)
    finally:
        early.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        listener.close()


def test_listen_fds_for_another_process_is_ignored(corral, tmp_path):
    # LISTEN_PID names another process (a parent that did not clear it): corral binds its own port.
    c = corral(stub_args(), workers=1, env={"LISTEN_FDS": "1", "LISTEN_PID": "1"})
    assert get(c.port, "/x").status == 200 and "socket from systemd" not in c.log()


# --- corral export systemd ----------------------------------------------------------------------------
def _fields(unit: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith(("#", ";")))


def _verify(*paths: Path) -> None:
    if not shutil.which("systemd-analyze"):
        return
    v = subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and not any(str(p) in v.stderr for p in paths), v.stderr


def test_export_systemd_is_type_notify_with_a_watchdog(tmp_path):
    r = corral_cli("export", "systemd", "-w", "2", "--", sys.executable, STUB, "{port}")
    assert r.returncode == 0, r.stderr
    fields = _fields(r.stdout)
    assert fields["Type"] == "notify" and fields["NotifyAccess"] == "main"
    assert int(fields["WatchdogSec"].rstrip("s")) > 0
    assert int(fields["TimeoutStartSec"]) > 60  # workers have startup_timeout (60 s) to answer before READY=1
    unit = tmp_path / "corral-test.service"
    unit.write_text(r.stdout)
    _verify(unit)


def _split_units(text: str) -> dict[str, str]:
    """`systemctl cat` style: each unit after a `# /etc/systemd/system/NAME` line."""
    units: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        m = re.fullmatch(r"# /etc/systemd/system/(\S+)\n", line)
        if m:
            name = m.group(1)
            units[name] = ""
        elif name is not None:
            units[name] += line
    return units


def test_export_systemd_socket_emits_a_socket_unit_that_verifies(tmp_path):
    port = 18080
    r = corral_cli("export", "systemd", "--socket", "-p", str(port), "-w", "2", "--", sys.executable, STUB, "{port}")
    assert r.returncode == 0, r.stderr
    units = _split_units(r.stdout)
    assert len(units) == 2, r.stdout
    service = next(n for n in units if n.endswith(".service"))
    sock = next(n for n in units if n.endswith(".socket"))
    assert sock.removesuffix(".socket") == service.removesuffix(".service")  # the socket activates this service
    sfields, kfields = _fields(units[service]), _fields(units[sock])
    assert kfields["ListenStream"] == f"127.0.0.1:{port}"
    assert sock in sfields["Requires"] and sock in sfields["After"]
    assert f"-p {port}" in sfields["ExecStart"] or f"--port {port}" in sfields["ExecStart"]
    for name, text in units.items():
        (tmp_path / name).write_text(text)
    _verify(tmp_path / service, tmp_path / sock)


def test_exported_execstart_runs_under_a_notify_socket_with_the_activation_socket(tmp_path):
    """The unit's own ExecStart, run as systemd would run it for `--socket`: notify socket and fd 3."""
    port = free_ports(8)
    r = corral_cli("export", "systemd", "--socket", "-p", str(port), "-w", "1", "--", sys.executable, STUB, "{port}")
    units = _split_units(r.stdout)
    service = _fields(next(t for n, t in units.items() if n.endswith(".service")))
    argv = shlex.split(service["ExecStart"])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    ns = NotifySocket(tmp_path, abstract=False)
    env = dict(os.environ, NOTIFY_SOCKET=ns.env, WATCHDOG_USEC="1000000")
    proc = activate(listener, argv, tmp_path / "unit.log", env=env, cwd=service["WorkingDirectory"])
    try:
        ns.until("READY=1")
        assert get(port, "/x").status == 200
    finally:
        proc.send_signal(getattr(signal, service["KillSignal"]))
        assert proc.wait(int(service["TimeoutStopSec"])) == 0
        ns.until("STOPPING=1")
        ns.close()
        listener.close()
