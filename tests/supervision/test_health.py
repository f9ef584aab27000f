"""Issue 3: busy-aware health checks, hung-worker deadlines, recycling, crash loops, no lost requests."""

from __future__ import annotations

import concurrent.futures as cf
import re
import subprocess
import sys
import time

from conftest import free_ports, get, stub_args


def _load(port: int, n: int, path: str = "/x", threads: int = 4) -> list[int]:
    with cf.ThreadPoolExecutor(threads) as pool:
        return [f.result().status for f in [pool.submit(get, port, path) for _ in range(n)]]


def test_crash_mid_request_fails_that_request_alone_and_is_not_retried(corral, tmp_path):
    log = tmp_path / "stub.log"
    c = corral(stub_args(), workers=2, env={"STUB_LOG": str(log)})
    with cf.ThreadPoolExecutor(6) as pool:
        others = [pool.submit(get, c.port, "/sleep?s=0.2") for _ in range(10)]
        crash = pool.submit(get, c.port, "/crash")
        statuses = [f.result().status for f in others]
        assert crash.result().status == 502
    assert statuses == [200] * 10
    # no query-of-death cascade: the crashing request reached exactly one worker, once
    assert log.read_text().count("GET /crash") == 1
    c.wait_for(r"worker \S+ stopped: exited with code 3")
    c.wait_for(r" ready: pid ", count=3)


def test_hung_worker_gets_504_and_is_replaced_while_the_queue_flows(corral):
    c = corral(stub_args("--request-timeout", "1"), workers=2)
    with cf.ThreadPoolExecutor(8) as pool:
        hung = pool.submit(get, c.port, "/hang")
        flowing = [pool.submit(get, c.port, "/sleep?s=0.1") for _ in range(15)]
        assert hung.result().status == 504
        assert [f.result().status for f in flowing] == [200] * 15
    c.wait_for(r"stopping: request exceeded request_timeout \(1s\)")
    c.wait_for(r"stopped: killed by SIGKILL")
    c.wait_for(r" ready: pid ", count=3)


def test_busy_worker_is_not_probed_or_restarted_across_health_intervals(corral):
    c = corral(
        stub_args(
            "--health-path", "/health", "--health-interval", "0.2", "--health-timeout", "0.1", "--health-fails", "1"
        ),
        workers=1,
    )
    pid = c.worker_pids()[0]
    r = get(c.port, "/sleep?s=2.5")  # >10 health intervals, each far longer than the probe timeout
    assert r.status == 200 and r.json()["pid"] == pid
    assert "unhealthy" not in c.log() and "stopping" not in c.log()
    assert get(c.port, "/x").json()["pid"] == pid


def test_idle_worker_failing_probes_is_taken_out_and_replaced(corral, tmp_path):
    sick = tmp_path / "sick"
    sick.mkdir()
    c = corral(
        stub_args(
            "--health-path", "/health", "--health-interval", "0.2", "--health-timeout", "1", "--health-fails", "2"
        ),
        workers=2,
        env={"STUB_SICK_DIR": str(sick)},
    )
    victim = c.worker_pids()[0]
    (sick / str(victim)).write_text("0")
    c.wait_for(r"worker \S+:0 unhealthy: 2 failed probes while idle \(last: status 500\)")
    c.wait_for(r"worker \S+:0 stopped: killed by SIGKILL")
    c.wait_for(r"worker \S+:0 ready: pid ", count=2)
    assert victim not in c.worker_pids().values()
    assert _load(c.port, 10) == [200] * 10


def test_request_arriving_during_a_probe_does_not_wait_for_it(corral, tmp_path):
    sick = tmp_path / "sick"
    sick.mkdir()
    log = tmp_path / "stub.log"
    c = corral(
        stub_args(
            "--health-path", "/health", "--health-interval", "0.3", "--health-timeout", "5", "--health-fails", "3"
        ),
        workers=2,
        env={"STUB_SICK_DIR": str(sick), "STUB_LOG": str(log)},
    )
    pids = c.worker_pids()
    slow_probe = pids[0]
    (sick / str(slow_probe)).write_text("3")  # worker 0's probes take 3 s from now on
    before = log.read_text().count(f"{slow_probe} GET /health")
    deadline = time.monotonic() + 10
    while log.read_text().count(f"{slow_probe} GET /health") <= before:  # a slow probe is under way
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r = get(c.port, "/x")
    assert r.json()["pid"] == pids[1]  # sent to the other worker, not queued behind the probe


def test_recycling_by_request_count_loses_nothing(corral):
    c = corral(stub_args("--max-requests", "5"), workers=2)
    first = set(c.worker_pids().values())
    statuses = _load(c.port, 60, "/sleep?s=0.01")
    assert statuses == [200] * 60
    c.wait_for(r"draining: served max_requests \(5\)", count=2)
    pids = {get(c.port, "/x").json()["pid"] for _ in range(10)}
    assert pids - first


def test_recycling_by_memory_loses_nothing(corral):
    c = corral(stub_args("--max-memory", "80"), workers=2)
    fat = get(c.port, "/mem?mb=120").json()["pid"]
    with cf.ThreadPoolExecutor(4) as pool:
        futs = []
        while "over max_memory" not in c.log():
            futs.append(pool.submit(get, c.port, "/sleep?s=0.05"))
            time.sleep(0.05)
        c.wait_for(r"worker \S+ draining: memory \d+MB over max_memory \(80MB\)")
        c.wait_for(r"stopped: killed by SIGTERM \(drained\)")
        futs += [pool.submit(get, c.port, "/x") for _ in range(10)]
        assert {f.result().status for f in futs} == {200}
    assert fat not in {get(c.port, "/x").json()["pid"] for _ in range(10)}


def test_app_that_cannot_start_exits_nonzero_with_its_output():
    port = free_ports(4)
    cmd = [sys.executable, "-c", "import sys; print('boom: no module named imaginary'); sys.exit(1)"]
    r = subprocess.run(
        [sys.executable, "-m", "corral", "run", "-p", str(port), "-w", "2", "--", *cmd],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3
    assert "cannot start" in r.stderr and "boom: no module named imaginary" in r.stderr


def test_cannot_start_report_waits_for_output_written_after_the_exit():
    # The worker's exit and its last words are separate events: here a child it left writes them only once
    # the worker is dead (and reaped), so corral sees the exit first whatever the machine's load.
    port = free_ports(4)
    late = "(while kill -0 $$ 2>/dev/null; do sleep 0.01; done; echo 'boom: said after the exit' >&2) & exit 3"
    r = subprocess.run([sys.executable, "-m", "corral", "run", "-p", str(port), "-w", "1", "--", "sh", "-c", late],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 3
    assert "cannot start" in r.stderr and "boom: said after the exit" in r.stderr, r.stderr


def test_app_that_has_served_keeps_retrying_with_backoff(corral, tmp_path):
    flag = tmp_path / "fail-start"
    c = corral(stub_args(), workers=1, env={"STUB_FAIL_START": str(flag)})
    assert get(c.port, "/x").status == 200
    flag.write_text("1")
    pid = c.worker_pids()[0]
    import os
    import signal

    os.kill(pid, signal.SIGKILL)
    c.wait_for(r"restarting in 0\.4s")  # 0.1, 0.2, 0.4: backoff doubles
    assert c.proc.poll() is None  # has served once: never gives up
    flag.unlink()
    c.wait_for(r" ready: pid ", count=2, timeout=30)
    assert get(c.port, "/x").status == 200


def test_every_state_change_is_logged_in_one_format(corral):
    c = corral(stub_args("--max-requests", "2"), workers=1)
    _load(c.port, 4, threads=1)
    c.wait_for("draining")
    c.stop()
    states = re.findall(r"^\S+Z corral: worker (\S+) (\w+): (.+)$", c.log(), re.M)  # after the timestamp
    names = {s for _, s, _ in states}
    assert {"starting", "ready", "draining", "stopping", "stopped"} <= names
    assert all(reason.strip() for _, _, reason in states)


def test_worker_failing_probes_under_steady_load_is_taken_out(corral, tmp_path):
    # Issue 11 #5: a worker that never idles for a whole interval must still be probed every interval.
    sick = tmp_path / "sick"
    sick.mkdir()
    c = corral(
        stub_args(
            "--health-path", "/health", "--health-interval", "0.5", "--health-timeout", "1", "--health-fails", "2"
        ),
        workers=2,
        env={"STUB_SICK_DIR": str(sick)},
    )
    victim = c.worker_pids()[0]
    stop = time.monotonic() + 30  # bounded: the load ends by itself
    statuses: list[int] = []

    def hammer() -> None:
        while time.monotonic() < stop and "unhealthy" not in c.log():
            statuses.append(get(c.port, "/sleep?s=0.05").status)

    with cf.ThreadPoolExecutor(4) as pool:
        loads = [pool.submit(hammer) for _ in range(4)]  # 4 clients on 2 workers: never an idle interval
        time.sleep(1.0)
        (sick / str(victim)).write_text("0")
        c.wait_for(r"worker \S+:0 unhealthy: 2 failed probes", timeout=30)
        for f in loads:
            f.result()
    c.wait_for(r"worker \S+:0 ready: pid ", count=2)
    assert statuses and set(statuses) == {200}
