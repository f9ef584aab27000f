"""Issue 23, part 3: scale to zero (min_workers 0) and cold starts on demand, with stub workers (fast).

The same with a real plumber app, whose R process is checked gone and then served from a cold start, is in
tests/interop/test_scale_to_zero_r.py. idle_timeout is 1 s here, the least that leaves a request time to
land between two looks of the autoscaler."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import re
import socket
import sys
import time

import psutil
import pytest
from conftest import STUB, SUPPORT, corral_cli, free_ports, get, poll, stub_args
from prometheus_client.parser import text_string_to_metric_families

from corral.cli.verbs import AdminClient, locate

PY = sys.executable
ZERO = ("--min-workers", "0", "--max-workers", "4", "--idle-timeout", "1")
IDLE = "idle (scaled to zero)"


def slow_start(seconds: float, *extra: str) -> list[str]:
    """The stub worker, starting `seconds` late: time for several requests to arrive during a cold start."""
    return [*extra, "--", "sh", "-c", f'sleep {seconds}; exec "{PY}" "{STUB}" "$0"', "{port}"]


def status(c) -> dict:
    r = corral_cli("status", "--json", "-p", str(c.port))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["apps"][0]


def zero_state(c) -> str:
    return status(c)["scale_to_zero"]["state"]


def at_zero(c, count: int = 1) -> None:
    """Wait for the app's `count`th time at zero: the last worker drained and gone."""
    c.wait_for(re.escape(f"{IDLE}: no worker runs"), timeout=30, count=count)


def metric(c, name: str) -> float:
    _, text = AdminClient(locate(c.port, None)).call("GET", "/metrics")
    for fam in text_string_to_metric_families(text if isinstance(text, str) else text.decode()):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"no {name} in /metrics")


def starts(c) -> int:
    return len(re.findall(r"worker \S+ starting:", c.log()))


def test_an_idle_app_scales_to_zero_and_the_next_request_starts_a_worker(corral):
    c = corral(stub_args(*ZERO), workers=None)
    pid = c.worker_pids()[0]
    at_zero(c)
    assert c.log().count("scaling to zero") >= 1
    poll("the worker's process to be gone", lambda: not psutil.pid_exists(pid), timeout=10)
    app = status(c)
    assert (app["desired"], app["ready"], app["workers"]) == (0, 0, [])
    assert app["scale_to_zero"]["state"] == IDLE and app["scale_to_zero"]["cold_starts"] == 0
    text = corral_cli("status", "-p", str(c.port)).stdout
    assert f"[{IDLE}]" in text and "the next request starts one" in text
    assert metric(c, "corral_scaled_to_zero") == 1

    t0 = time.monotonic()
    r = get(c.port, "/first?after=zero")
    took = time.monotonic() - t0
    assert r.status == 200 and r.json()["path"] == "/first?after=zero"
    assert r.json()["pid"] != pid
    line = c.wait_for(r"app \S+: cold start: worker ready in ([\d.]+) s, 1 request waited")
    assert float(line.group(1)) <= took + 0.1
    zero = status(c)["scale_to_zero"]
    assert zero["cold_starts"] == 1 and zero["last_cold_start_s"] == pytest.approx(float(line.group(1)), abs=0.01)
    assert metric(c, "corral_cold_starts_total") == 1
    at_zero(c, count=2)  # and back to zero once idle again


def test_requests_arriving_during_a_cold_start_all_wait_and_are_served_by_one_start(corral):
    # scale_up_wait 5: the queue's own rule may not add a worker during this test; the cold start adds one.
    c = corral(slow_start(1.0, *ZERO, "--scale-up-wait", "5"), workers=None)
    at_zero(c)
    before = starts(c)
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: get(c.port, f"/sleep?s=0.05&n={i}"), range(8)))
    assert [r.status for r in results] == [200] * 8
    assert sorted(r.json()["path"] for r in results) == sorted(f"/sleep?s=0.05&n={i}" for i in range(8))
    c.wait_for(r"cold start: worker ready in [\d.]+ s, 8 requests waited")
    assert starts(c) - before == 1  # one worker for all of them, not one per request
    assert status(c)["queue"]["timed_out"] == 0


def test_a_cold_start_longer_than_queue_timeout_still_serves_what_waits(corral):
    # queue_timeout 1 s, a start of 2.5 s: what waits for a start is bounded by startup_timeout instead.
    c = corral(slow_start(2.5, *ZERO, "--queue-timeout", "1"), workers=None, ready=False)
    c.wait_for("all workers ready", timeout=60)
    at_zero(c)
    with cf.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda i: get(c.port, f"/x{i}"), range(3)))
    assert [r.status for r in results] == [200] * 3
    c.wait_for(r"cold start: worker ready in (2|3)\.\d+ s, 3 requests waited")


def test_a_start_from_zero_that_fails_answers_503_with_retry_after_at_once(corral, tmp_path):
    health = free_ports(1)
    fail = tmp_path / "cannot-start"
    c = corral(
        stub_args(*ZERO, "--queue-timeout", "30", "--health-listen", f"127.0.0.1:{health}"),
        workers=None,
        env={"STUB_FAIL_START": str(fail)},
    )
    at_zero(c)
    assert get(health, "/readyz").status == 200
    fail.write_text("")  # the app's next start fails (a package removed, a broken deploy)
    t0 = time.monotonic()
    r = get(c.port, "/x")
    assert r.status == 503 and int(r.header("retry-after") or 0) >= 1
    assert "failed to start" in r.json()["error"]
    assert time.monotonic() - t0 < 10  # the failed start's own time, not queue_timeout (30 s) nor a hang
    c.wait_for(r"cold start failed \(exited before ready\): 1 waiting request answered 503")
    assert zero_state(c) == "start failed"
    assert get(health, "/readyz").status == 503  # it cannot start: not ready, so an outer balancer looks elsewhere
    text = corral_cli("status", "-p", str(c.port)).stdout
    assert "[start failed]" in text

    # Between attempts, a request is answered 503 at once, never left to wait for nothing.
    def refused_at_once():
        t = time.monotonic()
        r = get(c.port, "/y")
        return r.status == 503 and r.header("retry-after") and time.monotonic() - t < 0.5

    poll("a 503 at once between two attempts", refused_at_once, timeout=20)
    assert metric(c, "corral_cold_start_failures_total") >= 1

    fail.unlink()  # fixed: the next attempt starts, and the app goes back to serving (then to zero)
    poll("a start to succeed", lambda: get(c.port, "/z").status == 200, timeout=30)
    c.wait_for(r"cold start: worker ready in [\d.]+ s \(after \d+ failed starts?\)")
    poll("/readyz ready again", lambda: get(health, "/readyz").status == 200, timeout=10)


def test_readyz_is_ready_at_zero_and_probes_neither_keep_the_app_awake_nor_wake_it(corral):
    health = free_ports(1)
    c = corral(stub_args(*ZERO, "--health-path", "/health", "--health-listen", f"127.0.0.1:{health}"), workers=None)
    deadline = time.monotonic() + 30
    seen = set()
    while IDLE + ": no worker runs" not in c.log():  # probed every 50 ms all along: still goes to zero
        assert time.monotonic() < deadline, "never reached zero"
        seen.add(get(health, "/readyz").status)
        time.sleep(0.05)
    before = starts(c)
    for _ in range(40):  # 2 s at zero, probed all along
        seen.add(get(health, "/readyz").status)
        time.sleep(0.05)
    assert seen == {200}
    assert starts(c) == before and zero_state(c) == IDLE  # no probe started a worker


def test_an_open_websocket_session_keeps_the_worker_alive(corral):
    pytest.importorskip("websockets")
    from websockets.asyncio.client import connect

    c = corral([*ZERO, "--", PY, str(SUPPORT / "ws_echo_worker.py"), "{port}"], workers=None)
    # Start from zero: the start-up worker idles out on its own clock, which a slow start of the session below
    # could outlast; the session's own cold start gives the worker whose life it must keep.
    at_zero(c)
    scaled = c.log().count("scaling to zero")

    async def hold() -> int:
        async with connect(f"ws://127.0.0.1:{c.port}/ws") as ws:
            await ws.send("pid")
            pid = int(await ws.recv())
            for _ in range(4):  # 4 s: four idle_timeouts without a request, one session open
                await asyncio.sleep(1.0)
                await ws.send("pid")
                assert int(await ws.recv()) == pid
            assert psutil.pid_exists(pid) and c.log().count("scaling to zero") == scaled
            return pid

    pid = asyncio.run(asyncio.wait_for(hold(), 60))
    at_zero(c, count=2)  # the session closed: now it goes
    assert not psutil.pid_exists(pid)


def test_a_client_that_leaves_during_a_cold_start_costs_nothing_but_the_start(corral):
    c = corral(slow_start(1.0, *ZERO), workers=None)
    at_zero(c)
    with socket.create_connection(("127.0.0.1", c.port)) as s:
        s.sendall(b"GET /gone HTTP/1.1\r\nHost: t\r\n\r\n")
        c.wait_for(r"autoscale \S+: 0 -> 1 workers \(cold start: 1 request waiting\)")
    c.wait_for(r"cold start: worker ready in [\d.]+ s, 0 requests waited")
    assert get(c.port, "/next").status == 200


def test_max_queue_holds_while_cold(corral):
    c = corral(slow_start(1.0, *ZERO, "--max-queue", "2", "--scale-up-wait", "5"), workers=None)
    at_zero(c)
    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: get(c.port, f"/q{i}"), range(4)))
    codes = sorted(r.status for r in results)
    assert codes == [200, 200, 503, 503]
    assert all(r.header("retry-after") for r in results if r.status == 503)


def test_a_sticky_cookie_naming_a_worker_gone_at_zero_gets_a_new_one(corral):
    c = corral(stub_args(*ZERO, "--sticky", "cookie"), workers=None)
    cookie = (get(c.port, "/page").header("set-cookie") or "").split(";", 1)[0]
    assert cookie
    at_zero(c, count=1)
    r = get(c.port, "/again", headers=f"Cookie: {cookie}\r\n")
    assert r.status == 200
    fresh = (r.header("set-cookie") or "").split(";", 1)[0]
    assert fresh and fresh != cookie  # re-issued: it names the new worker


def test_scale_and_reload_of_an_app_at_zero(corral):
    c = corral(stub_args(*ZERO), workers=None)
    at_zero(c)
    r = corral_cli("reload", "--no-wait", "-p", str(c.port))
    assert r.returncode == 0 and "the next start runs the new code" in r.stdout, r.stdout + r.stderr
    assert zero_state(c) == IDLE
    r = corral_cli("scale", "2", "-p", str(c.port))
    assert r.returncode == 0, r.stderr
    c.wait_for(r"worker \S+:1 ready")  # (then back to zero: idle_timeout is 1 s)
    r = corral_cli("scale", "0", "-p", str(c.port))  # an app with min_workers 0 may be sent to zero by hand
    assert r.returncode == 0 and "scaling" in r.stdout and "to zero" in r.stdout, r.stdout + r.stderr
    poll("zero", lambda: zero_state(c) == IDLE, timeout=15)
    assert get(c.port, "/after").status == 200


def test_scale_0_is_refused_for_an_app_that_does_not_scale_to_zero(corral):
    c = corral(stub_args(), workers=1)
    r = corral_cli("scale", "0", "-p", str(c.port))
    assert r.returncode == 2 and "0 only for an app with min_workers 0" in r.stderr
    r = corral_cli("scale", "-1", "-p", str(c.port))
    assert r.returncode == 2 and "the least is 1" in r.stderr


def test_min_workers_0_is_checked():
    ok = corral_cli("check", *ZERO, "--", PY, STUB, "{port}")
    assert ok.returncode == 0 and "1 worker (0 when idle: min_workers 0)" in ok.stdout, ok.stderr
    bad = corral_cli("check", "--min-workers", "-1", "--", PY, STUB, "{port}")
    assert bad.returncode == 2 and "min_workers: must be >= 0 (got -1)" in bad.stderr
    behind = corral_cli("check", "--supervise-only", *ZERO, "--", PY, STUB, "{port}")
    assert behind.returncode == 2 and "no request reaches corral to start a worker again" in behind.stderr
    # ready_min 1 (the default) with min_workers 0 is fine: an app at zero counts as ready
    assert corral_cli("check", "--ready-min", "1", *ZERO, "--", PY, STUB, "{port}").returncode == 0


def test_supervise_only_refuses_min_workers_0(corral):
    r = corral_cli("run", "--supervise-only", "-p", str(free_ports(4)), *ZERO, "--", PY, STUB, "{port}", timeout=30)
    assert r.returncode == 2 and "--supervise-only: app" in r.stderr and "min_workers 0" in r.stderr
