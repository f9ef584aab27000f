"""Shared fixtures: a real corral process in front of real worker processes, and raw HTTP helpers."""

from __future__ import annotations

import os
import re
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

HERE = Path(__file__).parent
ROOT = HERE.parent
SUPPORT = HERE / "support"  # stub and evil workers, rigs, apps
STUB = str(SUPPORT / "stub_worker.py")
EXAMPLE_R = str(ROOT / "examples" / "plumber" / "plumber.R")
HAVE_R = shutil.which("Rscript") is not None


EPHEMERAL_LOW = 32768  # Linux's default ip_local_port_range starts here: client sockets may take any port above
PORTS_LOW = 12000


def _port_slice() -> tuple[int, int]:
    """This pytest process's own ports: pytest-xdist's processes get disjoint slices of
    [PORTS_LOW, EPHEMERAL_LOW), so two of them never hand out the same block (a check that a port is
    free says nothing about another process that checked it a moment earlier)."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    index = int((os.environ.get("PYTEST_XDIST_WORKER") or "gw0")[2:] or 0)
    size = (EPHEMERAL_LOW - PORTS_LOW) // max(count, 1)
    return PORTS_LOW + index * size, PORTS_LOW + (index + 1) * size


_SLICE = _port_slice()
_cursor = _SLICE[0] + (os.getpid() * 37) % (_SLICE[1] - _SLICE[0] - 100)  # another run at once starts elsewhere


def free_ports(n: int) -> int:
    """The first port of n consecutive free ports from this process's slice, below the ephemeral range so
    no client socket takes one later. Blocks are handed out in turn, never twice in a row, so a block a
    finished test's workers may still hold is not the next one handed out."""
    global _cursor
    lo, hi = _SLICE
    for _ in range((hi - lo) // (n + 1) + 1):
        base = _cursor if _cursor + n < hi else lo
        _cursor = base + n + 1
        if all(_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports in {lo}..{hi}")


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def thread_policies(pid: int) -> set[int]:
    """The scheduling policy of every thread of the process tree at pid (worker_scheduling)."""
    root = psutil.Process(pid)
    return {os.sched_getscheduler(t.id) for p in (root, *root.children(recursive=True)) for t in p.threads()}


class CorralProc:
    """`corral run ...` as a child process with its output captured to a file."""

    def __init__(
        self,
        tmp: Path,
        args: list[str],
        workers: int | None,
        ready: bool = True,
        env: dict[str, str | None] | None = None,
        port_block: int = 40,
    ) -> None:
        self.port = free_ports(port_block)
        self.base_port = self.port + 1
        self.out_path = tmp / f"corral-{self.port}.log"
        self.out = open(self.out_path, "wb")  # noqa: SIM115
        argv = [sys.executable, "-m", "corral", "run", "-p", str(self.port)]
        if workers is not None:
            argv += ["-w", str(workers)]
        self.argv = argv + args
        full_env = child_env(PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(self.argv, stdout=self.out, stderr=subprocess.STDOUT, env=full_env, cwd=str(tmp))
        if ready:
            self.wait_for("all workers ready", timeout=90)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30, count: int = 1) -> re.Match[str]:
        """Wait until `pattern` (a regex) has appeared `count` times in the output."""
        deadline = time.monotonic() + timeout
        while True:
            matches = list(re.finditer(pattern, self.log()))
            if len(matches) >= count:
                return matches[count - 1]
            if self.proc.poll() is not None and not matches:
                raise AssertionError(f"corral exited ({self.proc.returncode}) before {pattern!r}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {pattern!r} x{count}:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def worker_pids(self) -> dict[int, int]:
        """index -> pid of the workers currently believed alive, read from the state-change log."""
        pids: dict[int, int] = {}
        for m in re.finditer(r"worker \S+:(\d+) (ready|stopped): (?:pid (\d+))?", self.log()):
            idx = int(m.group(1))
            if m.group(2) == "ready":
                pids[idx] = int(m.group(3))
        return pids

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test not marked `unit` is a `system` test, so `-m unit` and `-m system` split the suite in two."""
    for item in items:
        if item.get_closest_marker("unit") is None:
            item.add_marker(pytest.mark.system)


def _no_process(*args: object, **kwargs: object) -> None:
    raise AssertionError("a unit test starts no process and opens no listener: it is a system test")


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request: pytest.FixtureRequest) -> None:
    """What makes the `unit` marker true: such a test cannot fork, spawn or exec (subprocess, asyncio and
    multiprocessing all go through these), nor listen on a socket (it runs on fakes, not a server).
    monkeypatch is taken only here: as a fixture of every test it would tear down before the test's own
    fixtures, and undo patches they still rely on."""
    if request.node.get_closest_marker("unit") is None:
        return
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setattr(subprocess.Popen, "_execute_child", _no_process)
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "execv", "execve"):
        monkeypatch.setattr(os, name, _no_process)
    monkeypatch.setattr(socket.socket, "listen", _no_process)


@pytest.fixture
def corral(tmp_path: Path) -> Iterator:
    """Factory: corral(args, workers=2) starts one; all are stopped at teardown."""
    started: list[CorralProc] = []

    def start(args: list[str], workers: int | None = 2, **kw) -> CorralProc:
        c = CorralProc(tmp_path, args, workers, **kw)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def poll(what: str, check, timeout: float = 30.0, every: float = 0.05):
    """check() until it returns something truthy (returned), or fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def post_bodies_reach_r(port: int) -> None:
    """A form and a 3 MiB upload on one keep-alive connection reach the example plumber API whole."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        form = b"a=2&b=40"
        s.sendall(
            b"POST /sum HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(form), form)
        )
        assert read_response(s).json() == {"sum": [42]}
        body = os.urandom(3 * 1024 * 1024)
        s.sendall(
            b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        assert read_response(s).json() == {"bytes": [len(body)]}


def plumber_transport() -> str:
    """Where corral puts plumber workers in this pass: Unix sockets by default (worker_transport auto),
    TCP in CI's second pass (scripts/test sets CORRAL_AUTO_TRANSPORT=tcp)."""
    return os.environ.get("CORRAL_AUTO_TRANSPORT") or "unix"


def child_env(**changes: str | None) -> dict[str, str]:
    """This process's environment with `changes` applied; None removes a variable (CI's second pass sets
    CORRAL_AUTO_TRANSPORT=tcp for every corral; a test of the default takes it out)."""
    env = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def corral_cli(
    *args: str, timeout: float = 60, cwd: Path | str | None = None, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m corral ARGS` to completion, output captured (for commands expected to end by themselves)."""
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=child_env(**(env or {})),
    )


def chatty_args(*extra: str) -> list[str]:
    """`corral run` arguments for tests/support/chatty_worker.py: a worker that prints on both streams."""
    return ["--name", "chatty", *extra, "--", sys.executable, str(SUPPORT / "chatty_worker.py"), "{port}"]


def stub_args(*extra: str) -> list[str]:
    return [*extra, "--", sys.executable, STUB, "{port}"]


# --- raw HTTP ------------------------------------------------------------------------------------
class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes, raw_head: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.raw_head = raw_head

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self):
        import json

        return json.loads(self.body)


def read_response(sock: socket.socket, buf: bytearray | None = None, head_only: bool = False) -> Response:
    """Read one HTTP/1.1 response (Content-Length, chunked, or until close) from a socket."""
    buf = buf if buf is not None else bytearray()
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before a full head: {bytes(buf)!r}")
        buf += data
    end = buf.index(b"\r\n\r\n")
    raw_head = bytes(buf[:end])
    del buf[: end + 4]
    lines = raw_head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = []
    for line in lines[1:]:
        k, _, v = line.decode("latin-1").partition(":")
        headers.append((k.strip(), v.strip()))
    resp = Response(status, headers, b"", raw_head)
    if status < 200 and status != 101:
        return read_response(sock, buf, head_only)
    if head_only or status in (204, 304):
        return resp
    te = (resp.header("transfer-encoding") or "").lower()
    cl = resp.header("content-length")
    if te == "chunked":
        body = bytearray()
        while True:
            while b"\r\n" not in buf:
                buf += _recv(sock)
            line, _, rest = bytes(buf).partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            buf[:] = rest
            while len(buf) < size + 2:
                buf += _recv(sock)
            body += buf[:size]
            del buf[: size + 2]
            if size == 0:
                break
        resp.body = bytes(body)
    elif cl is not None:
        n = int(cl)
        while len(buf) < n:
            buf += _recv(sock)
        resp.body = bytes(buf[:n])
        del buf[:n]
    else:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
        resp.body = bytes(buf)
        buf.clear()
    return resp


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("closed mid-body")
    return data


def request(port: int, raw: bytes, timeout: float = 30) -> Response:
    """Send raw bytes on a fresh connection and read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        return read_response(s)


def get(port: int, path: str, timeout: float = 30, headers: str = "") -> Response:
    return request(port, f"GET {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n".encode(), timeout)


def closed_by_peer(sock: socket.socket, timeout: float = 10) -> bool:
    """True when the peer closes the connection (EOF or reset) within timeout."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


# --- network namespaces (multi-host tests) ------------------------------------------------------
CLONE_NEWNET = 0x40000000


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into the network namespace `name`, made by `ip netns add`."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)
