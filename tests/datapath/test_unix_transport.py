"""Issue 13: workers on Unix sockets (worker_transport = unix) in corral's private directory."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import EXAMPLE_R, HAVE_R, HERE, SUPPORT, corral_cli, get, post_bodies_reach_r

UNIX_STUB = str(SUPPORT / "unix_stub_worker.py")
NOBODY = 65534
DEFAULT_TRANSPORT: dict[str, str | None] = {"CORRAL_AUTO_TRANSPORT": None}  # whatever the CI pass sets
IS_ROOT = os.geteuid() == 0
needs_r = pytest.mark.skipif(not HAVE_R, reason="R is not installed (scripts/setup installs it)")
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (another uid; a private network namespace)")


def unix_stub(*extra: str, placeholder: bool = True) -> list[str]:
    """corral args for unix stub workers: the path as {socket}, or only in $CORRAL_WORKER_SOCKET."""
    tail = ["{socket}"] if placeholder else []
    return ["--worker-transport", "unix", *extra, "--", sys.executable, UNIX_STUB, *tail]


def workers(c) -> list[dict]:
    r = corral_cli("status", "--json", "-p", str(c.port))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["apps"][0]["workers"]


def sockets(c) -> list[str]:
    return [w["socket"] for w in workers(c)]


def connect_as(uid: int, path: str) -> subprocess.CompletedProcess[str]:
    """Connect to `path` from a process running as `uid` (its own group too, no supplementary groups)."""

    def drop() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({path!r})\n"
        "except OSError as exc:\n"
        "    print(exc.errno); sys.exit(1)\n"
        "print('connected')\n"
    )
    python = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"  # runnable by any uid
    return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=30, preexec_fn=drop, cwd="/")


# --- plumber on a socket -------------------------------------------------------------------------
@pytest.mark.r
@needs_r
def test_plumber_workers_serve_on_unix_sockets(corral):
    c = corral([EXAMPLE_R, "--worker-transport", "unix"], workers=2)
    for i in (0, 1):  # both: the fixture returns once the app is ready, which one worker makes it
        assert "socket " in c.wait_for(rf"worker \S+:{i} ready: pid \d+ socket \S+").group(0)
    seen = {}
    for _ in range(8):
        body = get(c.port, "/whoami").json()
        seen[body["index"][0]] = body["port"][0]
    assert seen == {"0": "", "1": ""}  # both answer, and neither was given a port
    post_bodies_reach_r(c.port)  # keep-alive, bodies both ways
    ws = workers(c)
    assert [w["port"] for w in ws] == [0, 0]
    for w in ws:
        mode = os.stat(w["socket"]).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) & 0o077 == 0  # startPipeServer's mask 077
    table = corral_cli("status", "-p", str(c.port)).stdout
    assert "SOCKET" in table and os.path.basename(ws[0]["socket"]) in table


def _delayed_acks(transport: str, n: int, log: Path, portable: str = "") -> dict:
    """tests/support/delayed_acks.py in a network namespace of its own (see there). `portable`: CORRAL_PORTABLE
    for that corral, Linux's paths (TCP_QUICKACK on) unless "1"."""
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)  # keep a checkout's src/
    env = dict(os.environ, DELAYED_ACKS_LOG=str(log), PYTHONPATH=path, CORRAL_PORTABLE=portable)
    script = f"ip link set lo up && exec {sys.executable} {SUPPORT / 'delayed_acks.py'} {transport} {n}"
    r = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stdout + r.stderr + (log.read_text() if log.exists() else "")
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.r
@needs_r
@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("ip") is None, reason="needs unshare and ip")
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_keepalive_to_plumber_through_corral_has_no_40ms_stall(transport, tmp_path):
    # Counted, not timed: each 40 ms stall is one delayed ACK the kernel sends, and in a network
    # namespace of its own the TcpExt DelayedACKs counter sees this test's connections only.
    n = 60
    got = _delayed_acks(transport, n, tmp_path / "corral.log")
    # A stall costs a delayed ACK on every request (the control below). On a loaded machine a request that
    # merely takes longer than the 40 ms ACK timer costs one too (8 of 60 seen with 4 test processes on 2
    # cores), so the bound is a quarter of the requests: half of the control's lowest, 0 on a quiet machine.
    assert got["through"] <= n // 4, got  # through corral: no stall, on either transport
    if transport == "tcp":
        assert got["direct"] >= n // 2, got  # the control: straight to plumber, a reused connection stalls


@pytest.mark.r
@needs_r
@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("ip") is None, reason="needs unshare and ip")
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_without_quickack_tcp_to_plumber_stalls_and_unix_does_not(transport, tmp_path):
    """The portable path's cost (docs/operations.md, macOS): no TCP_QUICKACK, so a reused TCP connection to
    httpuv stalls on the delayed ACK, as nginx's does; plumber's default transport, a Unix socket, has none."""
    n = 60
    got = _delayed_acks(transport, n, tmp_path / "corral.log", portable="1")
    if transport == "tcp":
        assert got["through"] >= n // 2, got
    else:
        assert got["through"] <= n // 4, got


# --- any command: {socket} or $CORRAL_WORKER_SOCKET -----------------------------------------------
@pytest.mark.parametrize("placeholder", [True, False], ids=["placeholder", "environment"])
def test_command_gets_its_socket_and_is_probed_there(corral, placeholder):
    c = corral(unix_stub("--health-path", "/health", placeholder=placeholder), workers=2)
    got = {get(c.port, "/whoami").json()["index"] for _ in range(6)}
    assert got == {"0", "1"}
    paths = sockets(c)
    assert len(set(paths)) == 2 and all(p and stat.S_ISSOCK(os.stat(p).st_mode) for p in paths)
    assert len({os.path.dirname(p) for p in paths}) == 1  # one directory per corral


def test_a_replacement_gets_a_socket_of_its_own_and_the_old_one_is_removed(corral):
    c = corral(unix_stub(), workers=1)
    (old,) = sockets(c)
    assert get(c.port, "/crash").status == 502
    c.wait_for(r"ready: pid \d+ socket", count=2, timeout=30)
    (new,) = sockets(c)
    assert new != old and os.path.dirname(new) == os.path.dirname(old)
    assert not os.path.exists(old)
    assert get(c.port, "/whoami").status == 200
    corral_cli("reload", "-p", str(c.port))
    c.wait_for(r"ready: pid \d+ socket \S+-g1-", timeout=30)  # the new generation is in the name
    assert get(c.port, "/whoami").status == 200


@needs_root
def test_nobody_but_corral_can_connect_to_a_worker_socket(corral):
    c = corral(unix_stub(), workers=1)
    (path,) = sockets(c)
    private = os.path.dirname(path)
    st = os.stat(private)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    assert connect_as(os.getuid(), path).stdout.strip() == "connected"  # the check itself works
    other = connect_as(NOBODY, path)
    assert other.returncode == 1 and other.stdout.strip() == str(errno.EACCES), other.stdout + other.stderr
    assert c.stop() == 0
    assert not os.path.exists(private)  # removed at exit, sockets and all


# --- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--worker-transport", "unix", "--", sys.executable, UNIX_STUB, "{port}"], "pass {socket} instead"),
        (
            ["--worker-transport", "tcp", "--", sys.executable, UNIX_STUB, "{socket}"],
            "{socket} is replaced only with worker_transport unix (or auto)",
        ),
        (["--worker-transport", "unix", "--upstream", "127.0.0.1:9000"], "worker_transport: has no effect"),
        (["--worker-transport", "udp", "--", sys.executable, UNIX_STUB], "must be one of auto, tcp, unix"),
    ],
    ids=["port-placeholder", "socket-on-tcp", "upstreams", "unknown"],
)
def test_transport_mistakes_are_config_errors(args, expected):
    r = corral_cli("check", *args)
    assert r.returncode == 2 and expected in r.stderr, r.stderr


@needs_r
def test_plumber2_apps_are_refused_on_unix(tmp_path):
    app = tmp_path / "plumber.R"
    app.write_text("library(plumber2)\n#* @get /x\nfunction() 1\n")
    r = corral_cli("check", "--worker-transport", "unix", str(app))
    assert r.returncode == 2 and "plumber2 apps run on tcp" in r.stderr, r.stderr


def test_supervise_only_refuses_unix_workers():
    r = corral_cli("run", "--supervise-only", "-p", "18999", *unix_stub(), timeout=30)
    assert r.returncode != 0 and "use worker_transport tcp" in r.stderr, r.stdout + r.stderr


# --- auto, the default: unix where corral controls how the worker listens ------------------------------
@needs_r
@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ([], "on unix sockets"),
        (["--worker-host", "0.0.0.0"], "on 0.0.0.0:"),  # asked for workers other hosts can reach
        (["--worker-transport", "tcp"], "on 127.0.0.1:"),
    ],
    ids=["plumber", "plumber-open-host", "plumber-tcp"],
)
def test_auto_puts_plumber_on_unix_sockets_unless_told_otherwise(extra, where):
    r = corral_cli("check", "-w", "2", *extra, EXAMPLE_R, env=DEFAULT_TRANSPORT)
    assert r.returncode == 0 and where in r.stdout, r.stdout + r.stderr


@needs_r
def test_auto_transport_tcp_moves_auto_apps_to_ports_but_not_explicit_unix_ones():
    tcp = {"CORRAL_AUTO_TRANSPORT": "tcp"}
    r = corral_cli("check", EXAMPLE_R, env=tcp)
    assert r.returncode == 0 and "on 127.0.0.1:" in r.stdout, r.stdout + r.stderr
    r = corral_cli("check", "--worker-transport", "unix", EXAMPLE_R, env=tcp)
    assert r.returncode == 0 and "on unix sockets" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize(
    ("command", "where"),
    [(["{socket}"], "on unix sockets"), (["{port}"], "on 127.0.0.1:")],
    ids=["socket-placeholder", "port-placeholder"],
)
def test_auto_follows_a_commands_placeholder(command, where):
    r = corral_cli("check", "--", sys.executable, UNIX_STUB, *command, env=DEFAULT_TRANSPORT)
    assert r.returncode == 0 and where in r.stdout, r.stdout + r.stderr


def test_a_socket_command_is_served_with_no_transport_option(corral):
    c = corral(["--", sys.executable, UNIX_STUB, "{socket}"], workers=2, env=DEFAULT_TRANSPORT)
    assert {get(c.port, "/whoami").json()["index"] for _ in range(6)} == {"0", "1"}
    assert all(stat.S_ISSOCK(os.stat(p).st_mode) for p in sockets(c))


@pytest.mark.r
@needs_r
def test_supervise_only_keeps_auto_plumber_workers_on_ports(tmp_path):
    """nginx or HAProxy in front need ports: auto means tcp there, and the ports answer."""
    from conftest import CorralProc, poll

    c = CorralProc(tmp_path, ["--supervise-only", EXAMPLE_R], 1, env=DEFAULT_TRANSPORT)
    try:
        assert "socket" not in c.wait_for(r"worker \S+:0 ready: pid \d+ \S+ \S+").group(0)
        poll("the worker's port answers", lambda: get(c.base_port, "/whoami").status == 200)
    finally:
        c.stop()


# --- the directory itself ----------------------------------------------------------------------------
@pytest.fixture
def short_tmp():
    """A temporary directory with a short path: sockaddr_un holds 107 bytes, pytest's tmp_path is long."""
    d = tempfile.mkdtemp(prefix="cu-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_socket_directory_is_made_private_and_sweeps_dead_corrals(short_tmp):
    from corral.supervision import sockdir

    base = short_tmp / "corral"
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = base / f"workers-{gone.pid}-abc"  # a corral that died without cleaning up (SIGKILL)
    stale.mkdir(parents=True)
    live = base / f"workers-{os.getppid()}-abc"  # a running process's: kept
    live.mkdir()
    d = sockdir.SocketDir(str(base))
    try:
        assert stat.S_IMODE(os.stat(d.path).st_mode) == 0o700
        assert not stale.exists() and live.exists()
        a, b = d.socket_for("api", 0, 0), d.socket_for("api", 0, 0)
        assert a != b and os.path.dirname(a) == d.path  # a replacement of the same slot and generation
        assert sockdir.SocketDir(str(base)).path != d.path  # one directory per instance
    finally:
        d.remove()
    assert not os.path.exists(d.path)


def test_a_socket_directory_others_may_write_to_is_refused(tmp_path):
    from corral.supervision import sockdir

    base = tmp_path / "shared"
    base.mkdir()
    base.chmod(0o777)
    with pytest.raises(sockdir.SocketDirError, match="not a private directory"):
        sockdir.SocketDir(str(base))


def test_a_socket_path_too_long_for_sockaddr_un_is_an_error(tmp_path):
    from corral.supervision import sockdir

    base = tmp_path / ("x" * 90)
    d = sockdir.SocketDir(str(base))
    try:
        with pytest.raises(sockdir.SocketDirError, match="longer than a unix socket allows"):
            d.socket_for("a" * 40, 0, 0)
    finally:
        d.remove()
