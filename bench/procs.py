"""Child processes, ports and readiness probes for the bench harness.

Every process is started in its own session so it (and anything it forks, such as
nginx workers) can be stopped as a group without ever signalling a process the
harness did not start.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

HOST = "127.0.0.1"


class ChildError(RuntimeError):
    """A child process failed to start or become ready."""


class Child:
    """One process the harness started; `stop()` is idempotent."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the child
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, max_bytes: int = 2000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-max_bytes:].decode(errors="replace").strip()

    def kill_hard(self) -> None:
        """SIGKILL the child's whole group (used to simulate a crash)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)

    def stop(self, timeout: float = 5.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        # The leader may be gone while group members (e.g. orphaned workers) linger;
        # the group id stays reserved by the kernel while any member exists.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if not self._log.closed:
            self._log.close()


def terminate(proc: subprocess.Popen, timeout: float = 60.0) -> None:  # type: ignore[type-arg]
    """SIGTERM a process we started (corral drains, then stops its workers); SIGKILL if it hangs."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def port_free(port: int, host: str = HOST) -> bool:
    """True when nothing listens on host:port (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def require_free(ports: Iterable[int]) -> None:
    busy = [p for p in ports if not port_free(p)]
    if busy:
        raise ChildError(f"ports already in use on {HOST}: {busy}")


def http_get(port: int, path: str, timeout: float = 2.0, host: str = HOST) -> int:
    """One GET on a fresh connection; returns the status code."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def wait_http(child: Child | None, port: int, path: str, timeout: float) -> None:
    """Block until host:port answers `path` with a 200 or the child dies."""
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise ChildError(
                f"{child.name} exited with {child.proc.returncode} before answering on :{port}\n{child.log_tail()}"
            )
        try:
            status = http_get(port, path, timeout=1.0)
            if status == 200:
                return
            last_error = f"HTTP {status}"
        except (OSError, http.client.HTTPException) as exc:
            last_error = repr(exc)
        time.sleep(0.05)
    name = child.name if child is not None else "server"
    tail = child.log_tail() if child is not None else ""
    raise ChildError(f"{name} not answering on :{port}{path} after {timeout:.0f}s ({last_error})\n{tail}")


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user+sys) and RSS bytes summed over a process tree."""

    cpu_s: float
    rss_bytes: int
    root_rss_bytes: int


def tree_usage(pid: int) -> Usage:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    cpu = 0.0
    rss = 0
    root_rss = 0
    for p in procs:
        try:
            t = p.cpu_times()
            mem = p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
        cpu += t.user + t.system
        rss += mem
        if p.pid == pid:
            root_rss = mem
    return Usage(cpu_s=cpu, rss_bytes=rss, root_rss_bytes=root_rss)
