"""The R path: real plumber workers under corral."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from conftest import (
    EXAMPLE_R,
    HAVE_R,
    SUPPORT,
    free_ports,
    get,
    plumber_transport,
    post_bodies_reach_r,
    read_response,
    thread_policies,
)

from corral import portable

pytestmark = [pytest.mark.r, pytest.mark.skipif(not HAVE_R, reason="R is not installed (scripts/setup installs it)")]


@pytest.fixture
def plumber(corral):
    return corral([EXAMPLE_R], workers=2)


def test_plumber_workers_answer_with_their_index_and_port(plumber):
    seen = {}
    for _ in range(8):
        r = get(plumber.port, "/whoami")
        assert r.status == 200
        body = r.json()
        seen[body["index"][0]] = body["port"][0]
    if plumber_transport() == "tcp":
        assert seen == {"0": str(plumber.base_port), "1": str(plumber.base_port + 1)}
    else:  # on Unix sockets (the default) a worker is given no port
        assert seen == {"0": "", "1": ""}


def test_every_thread_of_an_r_worker_is_sched_batch(plumber):
    # httpuv reads requests on a thread of its own: that thread is the one woken by corral's write.
    # Under CORRAL_PORTABLE=1 (scripts/test's second pass) there is no policy to set: the system's default.
    policy = os.SCHED_OTHER if portable.forced() else os.SCHED_BATCH
    for pid in plumber.worker_pids().values():
        assert len(psutil.Process(pid).threads()) > 1
        assert thread_policies(pid) == {policy}


def test_plumber_docs_are_off_by_default(plumber):
    assert get(plumber.port, "/__docs__/").status == 404


def test_slow_request_does_not_block_a_fast_one(plumber):
    with cf.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(get, plumber.port, "/slow?s=3")
        fast = get(plumber.port, "/echo?msg=hi")
        assert fast.status == 200 and fast.json()["msg"] == ["The message is: 'hi'"]
        assert not slow.done()  # the fast answer came while the slow one still ran elsewhere
        assert slow.result().status == 200


def test_post_bodies_reach_r(plumber):
    r = get(plumber.port, "/echo?msg=x")
    assert r.status == 200
    post_bodies_reach_r(plumber.port)  # keep-alive, bodies both ways


def test_plumber_worker_killed_mid_request_is_restarted_and_its_request_served_elsewhere(plumber):
    with cf.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(get, plumber.port, "/slow?s=5")
        pid = None
        while pid is None:  # the worker not holding the slow request answers whoami
            other = int(get(plumber.port, "/whoami").json()["pid"][0])
            pids = set(plumber.worker_pids().values())
            pid = next(iter(pids - {other}), None)
        os.kill(pid, signal.SIGKILL)
        # killed from outside: the GET goes once to another worker (issue 23, part 2)
        assert slow.result().status == 200
    plumber.wait_for(r"ready: pid \d+", count=3, timeout=60)
    assert {get(plumber.port, "/whoami").status for _ in range(6)} == {200}


def test_directory_app_with_entrypoint_runs_in_its_own_directory(corral):
    c = corral([str(SUPPORT / "apps" / "entry")], workers=1)
    assert get(c.port, "/ping").json() == ["pong"]
    assert get(c.port, "/cwd").json() == {"cwd": ["entry"]}


def test_app_that_cannot_start_exits_nonzero_showing_the_r_error():
    port = free_ports(4)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral",
            "run",
            "-p",
            str(port),
            "-w",
            "2",
            str(SUPPORT / "apps" / "broken" / "plumber.R"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "cannot start" in r.stderr
    assert "unexpected" in r.stderr.lower() or "error" in r.stderr.lower()


def test_head_answer_does_not_break_the_request_queued_behind_it(corral):
    # Issue 11 #1, the exact reproduction: one plumber worker; GET /slow, HEAD /whoami, POST /sum.
    # The POST must run once and be reported as it ran (it used to get a 502 after reaching the worker).
    c = corral([EXAMPLE_R], workers=1)
    raws = [
        b"GET /slow?s=1 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"HEAD /whoami HTTP/1.1\r\nHost: t\r\n\r\n",
        b"POST /sum?a=1&b=2 HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
    ]
    socks = []
    for raw in raws:
        s = socket.create_connection(("127.0.0.1", c.port), timeout=30)
        s.sendall(raw)
        socks.append(s)
        time.sleep(0.05)  # the 50 ms spacing: all three are queued behind /slow in this order
    try:
        assert read_response(socks[0]).status == 200
        assert read_response(socks[1], head_only=True).status in (200, 405)  # plumber 1.2 has no HEAD for @get
        r = read_response(socks[2])
        assert r.status == 200 and r.json()["sum"] == [3]
    finally:
        for s in socks:
            s.close()
