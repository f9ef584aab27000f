"""Issue 14: operating corral the way pm2 and gunicorn users expect: `corral logs`, crash loops, SIGUSR1
for logrotate, and what a new user ran into (timestamps and colour, a second Ctrl-C, `corral ls`, CORRAL_*
variables, `corral run` with no APP, check/export with run's flags, --help, the forgotten `--`, did-you-mean,
relative scale, JSON error bodies, PATH in the README, the license field).

Real corral processes over real sockets; every wait is a bounded poll, nothing asserts on timing.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest
from conftest import EXAMPLE_R, HAVE_R, ROOT, STUB, SUPPORT, corral_cli, free_ports, get, poll, read_response, stub_args

from corral.cli.verbs import AdminClient, locate
from corral.logring import Ring

CHATTY = str(SUPPORT / "chatty_worker.py")
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def chatty_args(*extra: str) -> list[str]:
    return ["--name", "chatty", *extra, "--", sys.executable, CHATTY, "{port}"]


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | str | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=dict(os.environ, **(env or {})),
    )


class Reader:
    """Everything a child process (or a pty) has written so far, read without blocking."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.text = ""
        os.set_blocking(fd, False)

    def until(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text)
            if m:
                return m
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {pattern!r} in:\n{self.text[-3000:]}"
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:  # a pty whose other side is closed: EIO
                    data = b""
                if not data:
                    assert re.search(pattern, self.text), f"ended before {pattern!r}:\n{self.text[-3000:]}"
                self.text += data.decode("utf-8", "replace")


# --- corral logs ------------------------------------------------------------------------------------
def test_logs_follow_shows_a_line_logged_just_after_the_history_was_read(corral, monkeypatch, capsys):
    # The interleaving the test below meets only by chance (it failed so under load): a worker's line is
    # logged right after `corral logs -f` read the history, before it starts following. The real corral
    # and the real client run, printing as they do; the hook only fixes that order.
    from corral.cli import verbs as control

    c = corral(chatty_args(), workers=2)
    real_entries, real_sleep, printed = control._entries, time.sleep, []

    def entries(client, path):
        got = real_entries(client, path)
        if "n=50" in path:  # the history (-n 50); the follow's own queries ask for more
            assert get(c.port, "/say?msg=between").status == 200
            deadline = time.monotonic() + 30
            while "said between" not in c.log():  # logged by corral (the relay is its own event)
                assert time.monotonic() < deadline, c.log()
                real_sleep(0.05)
        return got

    def sleep(_seconds):
        printed.append(capsys.readouterr().out)
        if "said between" in "".join(printed) or len(printed) > 100:
            raise KeyboardInterrupt  # how a follow ends: Ctrl-C
        real_sleep(0.05)

    monkeypatch.setattr(control, "_entries", entries)
    monkeypatch.setattr(control.time, "sleep", sleep)
    control.logs.callback(c.port, None, None, True, 50, None, None, False)
    printed.append(capsys.readouterr().out)
    assert "said between" in "".join(printed), "".join(printed)[-3000:]


def test_logs_follow_sees_a_line_a_worker_prints_afterwards(corral):
    c = corral(chatty_args(), workers=2)
    follow = subprocess.Popen(
        [sys.executable, "-m", "corral", "logs", "-f", "-p", str(c.port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        out = Reader(follow.stdout.fileno())
        out.until(r"corral: all workers ready")  # the history came first: the follow is connected
        assert "said late-line" not in out.text
        assert get(c.port, "/say?msg=late-line").status == 200
        m = out.until(rf"({STAMP}) \[chatty:\d\] said late-line")
        assert m.group(1)
        assert get(c.port, "/err?msg=on-stderr").status == 200
        out.until(r"\[chatty:\d\] error on-stderr")
    finally:
        follow.terminate()
        follow.wait(30)


def test_logs_history_last_n_and_one_worker(corral):
    c = corral(chatty_args(), workers=2)
    c.wait_for(r"\[chatty:1\] chatty worker 1 listening")
    r = cli("logs", "-p", str(c.port), "--worker", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines and all(re.match(rf"{STAMP} ", line) for line in lines), r.stdout
    assert any("[chatty:1] chatty worker 1 listening" in line for line in lines)
    assert any("corral: worker chatty:1 ready" in line for line in lines)  # its events too
    assert not any("chatty:0" in line for line in lines), r.stdout
    r = cli("logs", "-p", str(c.port), "-n", "2")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stdout
    r = cli("logs", "-p", str(c.port), "--json", "-n", "3")
    entries = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(entries) == 3 and all({"seq", "time", "source", "line"} <= set(e) for e in entries)
    assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)


def test_log_ring_is_bounded_and_reads_after_a_sequence_number():
    ring = Ring(3)
    for i in range(5):
        ring.add("corral", f"line {i}")
    ring.add("api:1", "from a worker", app="api", worker=1)
    got = ring.read(after=0, n=100)
    assert [e["line"] for e in got] == ["line 3", "line 4", "from a worker"]  # the oldest fell out
    assert [e["line"] for e in ring.read(after=got[1]["seq"], n=100)] == ["from a worker"]
    assert [e["line"] for e in ring.read(after=0, n=1)] == ["from a worker"]  # the newest n
    assert [e["line"] for e in ring.read(after=0, n=100, worker="api:1")] == ["from a worker"]
    assert ring.read(after=0, n=100, worker="2") == []
    assert Ring(0).add("corral", "nothing kept") is None and Ring(0).read(0, 10) == []


# --- crash loops ------------------------------------------------------------------------------------
def test_a_crash_looping_app_shows_the_state_everywhere_and_backoff_goes_on(corral):
    c = corral(chatty_args("--crash-limit", "3/600"), workers=1, env={"CHATTY_DIE_AFTER": "2"})
    for n in range(1, 4):  # each request is the worker's second: it answers, then dies
        assert get(c.port, f"/x?n={n}", timeout=60).status == 200
        c.wait_for(r"worker chatty:0 stopped: exited with code 1", count=n)
    c.wait_for(r"corral: app chatty is crash-looping: \d+ worker exits in \d+s \(crash_limit 3/600s\)")
    doc = json.loads(cli("status", "--json", "-p", str(c.port)).stdout)
    (app,) = doc["apps"]
    loop = app["crash_loop"]
    assert loop is not None and loop["exits"] >= 3 and loop["limit"] == 3 and loop["window_s"] == 600
    assert any("database connection lost" in line for line in loop["last_lines"]), loop
    table = cli("status", "-p", str(c.port)).stdout
    assert "crash-looping" in table and "database connection lost" in table
    metrics = AdminClient(locate(c.port, None)).ok("GET", "/metrics").decode()
    assert re.search(r'corral_crash_looping\{app="chatty"\} 1\.0', metrics), metrics
    logs = cli("logs", "-p", str(c.port)).stdout
    assert "is crash-looping" in logs and "database connection lost" in logs
    # Backoff goes on: the worker still comes back and serves.
    assert get(c.port, "/x?n=4", timeout=90).status == 200
    c.wait_for(r"worker chatty:0 stopped: exited with code 1", count=4)
    assert c.proc.poll() is None


def test_crash_loop_on_the_dashboard(corral):
    test_dashboard = pytest.importorskip("test_dashboard")
    aport = free_ports(1)
    c = corral(
        chatty_args("--crash-limit", "2/600", "--admin", f"127.0.0.1:{aport}"),
        workers=1,
        env={"CHATTY_DIE_AFTER": "2"},
    )
    for n in range(1, 3):
        assert get(c.port, f"/x?n={n}", timeout=60).status == 200
        c.wait_for(r"worker chatty:0 stopped: exited with code 1", count=n)
    c.wait_for("is crash-looping")
    html = test_dashboard.browser(f"http://127.0.0.1:{aport}/", "--dump-dom")
    assert 'class="note crash"' in html and "crash-looping" in html and "database connection lost" in html


def test_crash_limit_is_validated():
    for bad in ("5", "0/60", "5/0", "x/60", "5/60s"):
        r = corral_cli("check", "--crash-limit", bad, "--", sys.executable, STUB, "{port}")
        assert r.returncode == 2 and "crash_limit: must be K/T" in r.stderr, (bad, r.stderr)


# --- SIGUSR1: logrotate ---------------------------------------------------------------------------------
def test_sigusr1_reopens_a_rotated_access_log_and_worker_log(corral, tmp_path):
    access = tmp_path / "access.log"
    logs = tmp_path / "workers"
    c = corral(chatty_args("--access-log", str(access), "--log-dir", str(logs)), workers=1)
    worker_log = logs / "chatty-0.log"
    assert get(c.port, "/say?msg=before-rotation").status == 200
    poll("the first lines", lambda: "msg=before" in access.read_text() and "said before" in worker_log.read_text())
    access.rename(tmp_path / "access.log.1")
    worker_log.rename(logs / "chatty-0.log.1")
    c.proc.send_signal(signal.SIGUSR1)
    c.wait_for(r"corral: SIGUSR1: reopened the access log and 1 worker log")
    assert get(c.port, "/say?msg=after-rotation").status == 200
    poll("the new access log", lambda: access.exists() and "msg=after-rotation" in access.read_text())
    poll("the new worker log", lambda: worker_log.exists() and "said after-rotation" in worker_log.read_text())
    assert "after-rotation" not in (tmp_path / "access.log.1").read_text()
    assert "after-rotation" not in (logs / "chatty-0.log.1").read_text()
    assert c.proc.poll() is None


# --- timestamps and colour ---------------------------------------------------------------------------
def test_log_lines_carry_timestamps_and_no_colour_when_piped(corral):
    c = corral(chatty_args(), workers=1)
    c.wait_for(r"\[chatty:0\] chatty worker 0 listening")
    log = c.log()
    assert "\x1b[" not in log
    for pattern in (r"corral: all workers ready", r"\[chatty:0\] chatty worker 0 listening", r"corral: worker "):
        assert re.search(rf"^{STAMP} {pattern}", log, re.M), (pattern, log)


def _run_on_a_terminal(tmp_path: Path, env: dict[str, str]) -> str:
    port = free_ports(4)
    master, slave = pty.openpty()
    argv = [sys.executable, "-m", "corral", "run", "-p", str(port), "-w", "1", *chatty_args()]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=tmp_path, env=dict(os.environ, **env)
    )
    os.close(slave)
    out = Reader(master)
    try:
        out.until("all workers ready", timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        os.close(master)
    return out.text


def test_colour_on_a_terminal_and_never_with_no_color(tmp_path):
    coloured = _run_on_a_terminal(tmp_path, {"NO_COLOR": ""})  # empty: not set, as no-color.org says
    assert "\x1b[" in coloured and re.search(r"all workers ready", coloured)
    without = _run_on_a_terminal(tmp_path, {"NO_COLOR": "1"})
    assert "\x1b[" not in without and re.search(rf"{STAMP} corral: all workers ready", without)


# --- a second Ctrl-C --------------------------------------------------------------------------------------
def test_first_ctrl_c_says_what_it_waits_for_and_a_second_one_stops_at_once(corral, tmp_path):
    seen = tmp_path / "seen.log"
    c = corral(stub_args("--graceful-timeout", "600"), workers=1, env={"STUB_LOG": str(seen)})
    worker = psutil.Process(c.worker_pids()[0])
    with socket.create_connection(("127.0.0.1", c.port)) as held:
        held.sendall(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
        poll("the worker to hold /hang", lambda: seen.exists() and "GET /hang" in seen.read_text())
        c.proc.send_signal(signal.SIGINT)
        c.wait_for(r"corral: stopping: draining 1 request, up to 600 s; Ctrl-C again to quit now")
        assert c.proc.poll() is None  # it waits for the request
        c.proc.send_signal(signal.SIGINT)
        rc = c.proc.wait(60)  # far inside the 600 s drain: the second Ctrl-C did not wait for it
    assert rc == 130, c.log()
    assert "corral: second Ctrl-C: stopped at once" in c.log()
    poll("the worker to be gone", lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE)


# --- corral ls --------------------------------------------------------------------------------------------
def test_ls_lists_the_running_instances(corral, tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(run)}
    a = corral(chatty_args(), workers=1, env=env)
    b = corral(["--name", "other", "--", sys.executable, STUB, "{port}"], workers=2, env=env)
    r = cli("ls", env=env)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert str(a.port) in rows and str(b.port) in rows, r.stdout
    assert "chatty" in rows[str(a.port)] and "1/1" in rows[str(a.port)]
    assert "other" in rows[str(b.port)] and "2/2" in rows[str(b.port)]
    assert str(a.proc.pid) in rows[str(a.port)]
    doc = json.loads(cli("ls", "--json", env=env).stdout)
    assert {i["port"] for i in doc} >= {a.port, b.port}
    b.stop()
    r = cli("ls", env=env)
    assert str(a.port) in r.stdout and f"\n{b.port} " not in r.stdout


# --- CORRAL_* environment variables --------------------------------------------------------------------
def test_every_option_can_come_from_a_corral_variable(corral):
    c = corral(
        stub_args(),
        workers=None,
        env={"CORRAL_WORKERS": "3", "CORRAL_MAX_QUEUE": "7", "CORRAL_NAME": "fromenv", "CORRAL_DOCS": "true"},
    )
    doc = json.loads(cli("status", "--json", env={"CORRAL_PORT": str(c.port)}).stdout)
    (app,) = doc["apps"]
    assert app["name"] == "fromenv" and app["desired"] == 3 and app["queue"]["max"] == 7
    r = cli("run", "--", sys.executable, STUB, "{port}", env={"CORRAL_WORKERS": "many"})
    assert r.returncode == 2
    assert r.stderr.strip() == "corral: environment: CORRAL_WORKERS: must be an integer (got 'many')"
    help_text = cli("run", "--help").stdout
    assert "CORRAL_QUEUE_TIMEOUT" in help_text and "CORRAL_WORKERS" in help_text


# --- corral run with no APP ------------------------------------------------------------------------------
def test_no_app_argument_serves_plumber_r_in_the_current_directory(tmp_path):
    api = tmp_path / "myapi"
    api.mkdir()
    (api / "plumber.R").write_text("#* @get /\nfunction() 'hi'\n")
    r = cli("check", cwd=api)
    assert r.returncode == 0, r.stderr
    assert "myapi / -> " in r.stdout and f"plumber {api}" in r.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("run", cwd=empty)
    assert r.returncode == 2 and "no plumber.R or entrypoint.R here" in r.stderr, r.stderr


@pytest.mark.r
@pytest.mark.skipif(not HAVE_R, reason="needs R")
def test_run_with_no_argument_starts_the_plumber_file_here(corral, tmp_path):
    shutil.copy(EXAMPLE_R, tmp_path / "plumber.R")
    c = corral([], workers=1)
    assert "no APP given: serving" in c.log()
    assert get(c.port, "/echo?msg=hi").json()["msg"] == ["The message is: 'hi'"]


# --- check and export take run's flags ----------------------------------------------------------------
def test_check_and_export_accept_the_flags_of_run():
    port = 18000
    cmd = ["--", sys.executable, STUB, "{port}"]
    r = corral_cli("check", "-w", "3", "-p", str(port), *cmd)
    assert r.returncode == 0, r.stderr
    assert f"3 workers on 127.0.0.1:{port + 1}-{port + 3}" in r.stdout
    r = corral_cli("export", "nginx", "-w", "2", "-p", str(port), *cmd)
    assert r.returncode == 0, r.stderr
    assert f"server 127.0.0.1:{port + 1} " in r.stdout and f"server 127.0.0.1:{port + 2} " in r.stdout
    r = corral_cli("export", "systemd", "-w", "2", "--max-queue", "9", *cmd)
    assert r.returncode == 0, r.stderr
    exec_start = next(line for line in r.stdout.splitlines() if line.startswith("ExecStart="))
    assert "run -w 2 --max-queue 9 -- " in exec_start and exec_start.endswith(f"{STUB} '{{port}}'")
    r = corral_cli("check", "-w", "0", *cmd)
    assert r.returncode == 2 and "workers: must be >= 1" in r.stderr


# --- run --help -------------------------------------------------------------------------------------------
def test_run_help_shows_defaults_and_value_placeholders():
    r = corral_cli("run", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # click wraps help lines
    for want in ("-w, --workers N", "--queue-timeout SECONDS", "--max-body BYTES", "--host HOST", "--admin ADDR"):
        assert want in text, want
    assert "[default: 30 s]" in text or "default: 30" in text
    assert re.search(r"--max-queue N .*default: 1000", text)


# --- the forgotten -- -------------------------------------------------------------------------------------
def test_a_forgotten_double_dash_gets_a_hint():
    r = corral_cli("run", "-w", "2", sys.executable, "-m", "http.server", "{port}")
    assert r.returncode == 2
    assert f"-- {sys.executable} -m http.server {{port}}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = corral_cli("run", sys.executable, STUB, "--port", "{port}")
    assert r.returncode == 2 and "put -- before the command" in r.stderr, r.stderr


def test_a_misspelt_app_file_gets_a_did_you_mean(tmp_path):
    (tmp_path / "plumber.R").write_text("#* @get /\nfunction() 'hi'\n")
    r = corral_cli("run", "plumbr.R", cwd=tmp_path)
    assert r.returncode == 2 and "did you mean 'plumber.R'?" in r.stderr, r.stderr
    r = corral_cli("run", "plumbr", cwd=tmp_path)  # no .R: read as a command, still a near miss of a file here
    assert r.returncode == 2 and "did you mean 'plumber.R'?" in r.stderr, r.stderr


# --- relative scale ------------------------------------------------------------------------------------
def test_scale_plus_and_minus_are_relative(corral):
    c = corral(stub_args(), workers=2)
    r = corral_cli("scale", "+1", "-p", str(c.port))
    assert r.returncode == 0 and "3 workers ready" in r.stdout, r.stdout + r.stderr
    r = corral_cli("scale", "-2", "-p", str(c.port))
    assert r.returncode == 0 and "1 worker ready" in r.stdout, r.stdout + r.stderr
    r = corral_cli("scale", "-1", "-p", str(c.port))
    assert r.returncode == 2 and "would leave 0 workers" in r.stderr, r.stderr
    r = corral_cli("scale", "2", "-p", str(c.port))
    assert r.returncode == 0 and "2 workers ready" in r.stdout


# --- corral's own answers are JSON --------------------------------------------------------------------
def test_corrals_own_502_503_504_bodies_are_json(corral):
    c = corral(stub_args("--request-timeout", "1", "--max-queue", "0"), workers=1)
    r = get(c.port, "/crash")
    assert r.status == 502 and r.header("content-type") == "application/json"
    assert r.json() == {"error": "the worker failed while handling this request", "status": 502}
    c.wait_for(r" ready: pid ", count=2)
    with socket.create_connection(("127.0.0.1", c.port), timeout=30) as held:
        held.sendall(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
        poll("the worker to be busy", lambda: get(c.port, "/x").status == 503)
        full = get(c.port, "/x")
        assert full.status == 503 and full.json()["status"] == 503 and full.header("retry-after")
        late = read_response(held)
    assert late.status == 504 and late.json() == {"error": "the worker did not answer in time", "status": 504}


# --- packaging and docs --------------------------------------------------------------------------------
def test_readme_says_how_to_get_corral_on_the_path_and_lists_the_new_verbs():
    readme = (ROOT / "README.md").read_text()
    assert "pipx install" in readme and ".venv/bin" in readme
    for verb in ("corral logs", "corral ls", "corral scale +"):
        assert verb in readme, verb


def test_license_is_an_spdx_string_so_setuptools_does_not_warn():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT"  # a table is deprecated (setuptools >= 77 warns on every build)
    assert any(re.fullmatch(r"setuptools>=(7[7-9]|[89]\d)(\.\d+)*", r) for r in meta["build-system"]["requires"])


def test_docs_cover_every_operations_feature():
    ops = (ROOT / "docs" / "operations.md").read_text()
    for heading in ("## Logs", "## Crash loops", "## Running under systemd", "## Log rotation", "## corral ls"):
        assert heading in ops, heading
    assert "fresh port" in ops and "CORRAL_" in ops and "NOTIFY_SOCKET" in ops and "LISTEN_FDS" in ops
