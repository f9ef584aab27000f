"""Start, stop and survival of a real corral process: what must never leave a dead port open.

Real processes over real sockets (tests/support/stub_worker.py workers). No timing assertions: every wait is a
poll-until with a generous bound, and the checks are on what corral logged and answered.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys

import psutil
import pytest
from conftest import STUB, _free, free_ports, get, poll, read_response, stub_args


def answers_200(port: int, path: str = "/x") -> dict | None:
    try:
        r = get(port, path, timeout=5)
    except OSError:
        return None
    return r.json() if r.status == 200 else None


# --- #7: one drain deadline for the whole stop ---------------------------------------------------------
def test_stop_with_a_request_that_never_finishes_uses_one_drain_deadline(corral, tmp_path):
    seen = tmp_path / "seen.log"
    c = corral(stub_args("--graceful-timeout", "2", "--kill-timeout", "1"), workers=1, env={"STUB_LOG": str(seen)})
    with socket.create_connection(("127.0.0.1", c.port)) as held:
        held.sendall(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
        poll("the worker to hold /hang", lambda: seen.exists() and "GET /hang" in seen.read_text())
        c.proc.send_signal(signal.SIGTERM)
        bound = 2 + 1 + 1  # graceful_timeout + kill_timeout + 1 s
        try:
            c.proc.wait(3 * bound)  # generous: a bound on a hang, not a measurement
        except subprocess.TimeoutExpired:
            pytest.fail(f"corral still running long after graceful + kill timeout:\n{c.log()[-3000:]}")
    log = c.log()
    assert c.proc.returncode == 0
    assert len(re.findall(r"corral: stopping: draining", log)) == 1, log
    assert "corral: stopping: draining 1 request, up to 2 s" in log
    assert re.search(r"worker \S+ stopping: corral is stopping", log)
    assert log.rstrip().endswith("corral: stopped")


# --- #11: no supervisor task may die ------------------------------------------------------------------
def test_reload_with_no_port_left_up_to_65535_is_aborted_and_supervision_goes_on(corral):
    # Workers on 65532-65533; the replacement ports a reload would use (65534-65535) are held by this
    # test, so the search for a fresh port runs off the end of the port range (#11: OverflowError).
    if not all(_free(p) for p in range(65532, 65536)):
        pytest.skip("ports 65532-65535 are in use on this machine")
    holders = []
    for port in (65534, 65535):
        s = socket.socket()
        s.bind(("127.0.0.1", port))
        s.listen()
        holders.append(s)
    try:
        c = corral(stub_args("--base-port", "65532"), workers=2)
        c.proc.send_signal(signal.SIGHUP)
        c.wait_for(r"reload aborted: replacement \S+ failed to start \(.*no free port")
        os.kill(c.worker_pids()[0], signal.SIGKILL)
        c.wait_for(r" ready: pid ", count=3)  # the crashed worker came back
        assert poll("an answer", lambda: answers_200(c.port))
        assert "internal error" not in c.log() and "Traceback" not in c.log()
    finally:
        for s in holders:
            s.close()


def test_a_worker_that_cannot_be_spawned_after_serving_backs_off_like_a_crash(corral, tmp_path):
    script = tmp_path / "worker.sh"
    script.write_text(f'#!/bin/sh\nexec {sys.executable} {STUB} "$@"\n')
    script.chmod(0o755)
    c = corral(["--", str(script), "{port}"], workers=1)
    assert poll("an answer", lambda: answers_200(c.port))
    script.rename(tmp_path / "gone.sh")
    os.kill(c.worker_pids()[0], signal.SIGKILL)
    c.wait_for(r"cannot start: No such file or directory.*; spawn failed; restarting in 0\.8s")
    delays = re.findall(r"spawn failed; restarting in ([\d.]+)s", c.log())
    assert delays[:3] == ["0.2", "0.4", "0.8"]  # doubling, not a retry every tick
    (tmp_path / "gone.sh").rename(script)
    c.wait_for(r" ready: pid ", count=2)
    assert poll("an answer", lambda: answers_200(c.port))
    assert c.proc.poll() is None


# --- #14: a closed stdout ----------------------------------------------------------------------------
def _child(parent: psutil.Process, name: str) -> psutil.Process | None:
    for p in parent.children(recursive=True):
        try:
            if name in " ".join(p.cmdline()):
                return p
        except psutil.Error:
            pass
    return None


def test_corral_piped_into_head_keeps_serving_and_restarting(tmp_path):
    port = free_ports(4)
    logs, err = tmp_path / "logs", tmp_path / "stderr.txt"
    cmd = (
        f"set -o pipefail; {sys.executable} -m corral run -p {port} -w 1 --access-log - --log-dir {logs} "
        f"-- {sys.executable} {STUB} {{port}} 2>{err} | head -2 >{tmp_path / 'head.txt'}"
    )
    shell = subprocess.Popen(["bash", "-c", cmd], cwd=str(tmp_path), env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        corral = poll("corral to start", lambda: _child(psutil.Process(shell.pid), "corral run"))
        poll("head to exit", lambda: _child(psutil.Process(shell.pid), "head -2") is None)
        first = poll("an answer", lambda: answers_200(port))
        assert first and answers_200(port)  # the access log line to the closed stdout costs nothing
        os.kill(first["pid"], signal.SIGKILL)
        second = poll("a restarted worker", lambda: (r := answers_200(port)) and r["pid"] != first["pid"] and r)
        assert second["pid"] != first["pid"]
        worker_log = "".join(p.read_text() for p in logs.iterdir())
        assert worker_log.count("listening on") == 2  # --log-dir kept working after stdout closed
        corral.send_signal(signal.SIGTERM)
        assert shell.wait(60) == 0  # pipefail: corral's own exit status
    finally:
        if shell.poll() is None:
            for p in psutil.Process(shell.pid).children(recursive=True):
                if "corral run" in " ".join(p.cmdline()):
                    p.kill()
            shell.wait(30)
    text = err.read_text()
    assert "internal error" not in text and "Traceback" not in text, text


def test_a_core_task_ending_with_an_error_stops_corral_with_exit_70(capsys):
    import asyncio

    from corral.config import Config
    from corral.server import EXIT_INTERNAL, Corral

    async def main() -> Corral:
        c = Corral(Config())

        async def broken() -> None:
            raise RuntimeError("health checker bug")

        c.watch(asyncio.get_running_loop().create_task(broken()), "health checker for app a")
        await asyncio.wait_for(c._stop.wait(), 30)
        return c

    c = asyncio.run(main())
    assert c.exit_code == EXIT_INTERNAL == 70
    err = capsys.readouterr().err
    assert "corral: internal error: health checker for app a ended: RuntimeError('health checker bug')" in err


# --- #13: a request before any worker is ready ----------------------------------------------------------
def test_a_request_before_any_worker_is_ready_waits_in_the_queue(corral):
    slow_start = ["sh", "-c", f"sleep 2; exec {sys.executable} {STUB} {{port}}"]
    c = corral(["--", *slow_start], workers=1, ready=False)
    sock = poll("the public port", lambda: _connect(c.port), timeout=60)
    with sock:
        sock.settimeout(60)
        sock.sendall(b"GET /early HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        resp = read_response(sock)
    assert resp.status == 200, resp.body
    assert "OverflowError" not in c.log()


def _connect(port: int) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return None


# --- #8: the open-files limit --------------------------------------------------------------------------
def _run_with_nofile(tmp_path, soft: int, hard: int, *args: str) -> str:
    """corral's output from start to all-workers-ready, started with RLIMIT_NOFILE = (soft, hard)."""
    port = free_ports(4)
    out = tmp_path / f"out-{port}.txt"
    argv = [sys.executable, "-m", "corral", "run", "-p", str(port), "-w", "1", *args, *stub_args()]
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            argv,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=str(tmp_path),
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
        )
    try:
        poll("all workers ready", lambda: "all workers ready" in out.read_text() or proc.poll() is not None, 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return out.read_text()


def test_soft_open_files_limit_is_raised_to_the_hard_one_and_sizes_max_connections(tmp_path):
    log = _run_with_nofile(tmp_path, 256, 4096)
    m = re.search(r"corral: open files limit 4096; max_connections (\d+)", log)
    assert m and 1 <= int(m.group(1)) < 2048, log  # about half: each connection may need an upstream one
    assert len(re.findall(r"open files limit", log)) == 1 and "warning" not in log


def test_max_connections_set_above_what_the_limit_allows_gets_one_warning(tmp_path):
    log = _run_with_nofile(tmp_path, 256, 4096, "--max-connections", "100000")
    assert "corral: open files limit 4096; max_connections 100000" in log
    assert len(re.findall(r"corral: warning: max_connections 100000 is more than", log)) == 1, log


def test_log_writes_never_raise(tmp_path):
    import io

    from corral.logs import write

    buf = io.BytesIO()
    text = io.TextIOWrapper(buf, encoding="utf-8")
    write(text, "path /caf\udce9\n")  # a lone surrogate: escaped, the stream stays usable
    write(text, "next\n")
    assert buf.getvalue() == b"path /caf\\udce9\nnext\n"
    text.close()
    write(text, "after close\n")  # a closed log file: the line is lost, nothing raises
