"""corral's worker processes, end to end (a real corral, real stub workers): their environment, ports and
output, refusing to start on a busy port, restarting a killed worker, and stopping (SIGTERM drains; no worker
outlives a SIGKILLed corral). The supervisor's decisions in-process are in test_supervisor.py."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import sys
import time

import psutil
import pytest
from conftest import STUB, corral_cli, free_ports, get, stub_args, thread_policies


def test_workers_get_port_index_and_pm2_env(corral):
    c = corral(stub_args(), workers=3)
    seen = {}
    for _ in range(12):
        r = get(c.port, "/env")
        assert r.status == 200
        body = r.json()
        seen[body["index"]] = body["pid"]
    assert set(seen) == {"0", "1", "2"}
    for idx, pid in seen.items():
        env = psutil.Process(pid).environ()
        assert env["CORRAL_WORKER_INDEX"] == idx == env["NODE_APP_INSTANCE"]
        assert env["PORT"] == str(c.base_port + int(idx))
        assert env.get("HOME") == os.environ.get("HOME")  # parent's environment is passed on


def test_workers_run_as_sched_batch_unless_told_normal(corral):
    linux = {"CORRAL_PORTABLE": None}  # Linux's own paths, in both passes of scripts/test
    batch = corral(stub_args(), workers=1, env=linux)
    normal = corral(stub_args("--worker-scheduling", "normal"), workers=1, env=linux)
    assert thread_policies(get(batch.port, "/env").json()["pid"]) == {os.SCHED_BATCH}
    assert thread_policies(get(normal.port, "/env").json()["pid"]) == {os.SCHED_OTHER}
    assert os.sched_getscheduler(batch.proc.pid) == os.SCHED_OTHER  # corral itself keeps the default


def test_no_scheduling_policy_on_the_portable_path(corral):
    """What a machine without SCHED_BATCH gets: the system's default, whatever worker_scheduling says."""
    c = corral(stub_args(), workers=1, env={"CORRAL_PORTABLE": "1"})
    assert "worker scheduling default (no SCHED_BATCH)" in c.log()
    assert thread_policies(get(c.port, "/env").json()["pid"]) == {os.SCHED_OTHER}


def test_ready_lines_and_public_url(corral):
    c = corral(stub_args(), workers=2)
    log = c.log()
    assert f"listening on http://127.0.0.1:{c.port}" in log
    assert log.count(" ready: pid ") == 2
    assert f"port {c.base_port}" in log and f"port {c.base_port + 1}" in log


def test_placeholders_replaced_in_every_argument(corral, tmp_path):
    c = corral(["--", sys.executable, STUB, "{port}", "idx={index}"], workers=2)
    pids = {get(c.port, "/x").json()["pid"] for _ in range(6)}
    cmdlines = {" ".join(psutil.Process(p).cmdline()[-2:]) for p in pids}
    assert cmdlines == {f"{c.base_port} idx=0", f"{c.base_port + 1} idx=1"}


def test_worker_output_is_relayed_with_prefix(corral):
    c = corral(stub_args(), workers=2)
    c.wait_for(r"\[python3?[\d.]*:0\] stub worker 0 listening|\[\S+:0\] stub worker 0 listening")
    c.wait_for(r"\[\S+:1\] stub worker 1 listening")


def test_busy_public_port_is_refused_before_starting_anything(tmp_path):
    port = free_ports(4)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        r = _run_fail(["-p", str(port), "-w", "2", "--", sys.executable, STUB, "{port}"])
    assert r.returncode == 2
    assert f"public port {port}" in r.stderr and "\n" not in r.stderr.strip()


def test_busy_worker_port_is_refused_naming_the_port(tmp_path):
    port = free_ports(4)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port + 2))
        s.listen()
        r = _run_fail(["-p", str(port), "-w", "3", "--", sys.executable, STUB, "{port}"])
    assert r.returncode == 2
    assert f"worker port {port + 2}" in r.stderr
    assert "starting" not in r.stdout


def _run_fail(args):
    return corral_cli("run", *args, timeout=30)


def test_killed_worker_restarts_and_its_request_goes_to_the_other_worker(corral):
    c = corral(stub_args(), workers=2)
    with cf.ThreadPoolExecutor(2) as pool:
        victim = pool.submit(get, c.port, "/sleep?s=3")
        time.sleep(0.5)
        pids = c.worker_pids()
        # the busy worker is the one whose /x answers do not come from
        other_pid = get(c.port, "/x").json()["pid"]
        victim_pid = next(p for p in pids.values() if p != other_pid)
        os.kill(victim_pid, signal.SIGKILL)
        r = victim.result()  # killed from outside: the GET goes once to the other worker (issue 23, part 2)
        assert r.status == 200 and r.json()["pid"] == other_pid
    c.wait_for(r"stopped: killed by SIGKILL.*restarting in")
    c.wait_for(" ready: pid ", count=3)
    statuses = [get(c.port, "/x").status for _ in range(20)]
    assert statuses == [200] * 20


def test_sigterm_drains_inflight_then_stops_workers(corral):
    c = corral(stub_args(), workers=2)
    pids = list(c.worker_pids().values())
    with cf.ThreadPoolExecutor(1) as pool:
        inflight = pool.submit(get, c.port, "/sleep?s=1.5")
        time.sleep(0.4)
        c.proc.send_signal(signal.SIGTERM)
        assert inflight.result().status == 200
    assert c.proc.wait(20) == 0
    for p in pids:
        assert not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize(("portable", "lifetime"), [(None, "PDEATHSIG"), ("1", "death-pipe")])
def test_no_worker_outlives_a_sigkilled_corral(corral, portable, lifetime):
    """Linux's PDEATHSIG, and the death pipe every other POSIX system gets (CORRAL_PORTABLE=1 forces it)."""
    c = corral(stub_args(), workers=2, env={"CORRAL_PORTABLE": portable})
    assert f"worker lifetime {lifetime}" in c.log()
    pids = list(c.worker_pids().values())
    assert len(pids) == 2
    c.proc.kill()
    c.proc.wait()
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(psutil.pid_exists(p) for p in pids)
