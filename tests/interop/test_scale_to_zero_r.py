"""Issue 23, part 3, with a real plumber app: the idle R process is stopped (its PID gone), and the next
requests start one and are served by it. The rest of scale to zero (failed starts, probes, sessions, scale
and reload at zero) runs on stub workers in tests/supervision/test_scale_to_zero.py."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import time

import psutil
import pytest
from conftest import EXAMPLE_R, HAVE_R, corral_cli, get, poll

pytestmark = [pytest.mark.r, pytest.mark.skipif(not HAVE_R, reason="R is not installed (scripts/setup installs it)")]

IDLE = "idle (scaled to zero)"


def _zero(c) -> dict:
    r = corral_cli("status", "--json", "-p", str(c.port))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["apps"][0]["scale_to_zero"]


def test_plumber_scales_to_zero_and_cold_starts_on_the_next_requests(corral):
    # scale_up_wait 30: the waiting requests are served by the one worker the cold start brings.
    c = corral(
        [EXAMPLE_R, "--min-workers", "0", "--max-workers", "2", "--idle-timeout", "1", "--scale-up-wait", "30"],
        workers=None,
    )
    r_pid = c.worker_pids()[0]  # R's process (it may be gone already: idle_timeout is 1 s)
    c.wait_for(re.escape(f"{IDLE}: no worker runs"))
    poll("the R process to be gone", lambda: not psutil.pid_exists(r_pid), timeout=15)
    assert _zero(c)["state"] == IDLE
    assert f"[{IDLE}]" in corral_cli("status", "-p", str(c.port)).stdout

    # One request, alone: it waits for R to start, then gets plumber's own answer.
    t0 = time.monotonic()
    r = get(c.port, "/echo?msg=cold", timeout=60)
    took = time.monotonic() - t0
    assert r.status == 200 and r.json() == {"msg": ["The message is: 'cold'"]}
    line = c.wait_for(r"cold start: worker ready in ([\d.]+) s, 1 request waited")
    assert 0 < float(line.group(1)) <= took + 0.1
    new_pid = c.worker_pids()[0]
    assert new_pid != r_pid and psutil.pid_exists(new_pid)
    zero = _zero(c)
    assert zero["cold_starts"] == 1 and zero["last_cold_start_s"] > 0

    # Back to zero, then several requests at once during the next cold start: every one is served.
    c.wait_for(re.escape(f"{IDLE}: no worker runs"), count=2)
    poll("the second R process to be gone", lambda: not psutil.pid_exists(new_pid), timeout=15)
    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: get(c.port, f"/echo?msg=m{i}", timeout=60), range(4)))
    assert [r.status for r in results] == [200] * 4
    assert [r.json()["msg"][0] for r in results] == [f"The message is: 'm{i}'" for i in range(4)]
    c.wait_for(r"cold start: worker ready in [\d.]+ s, 4 requests waited")
    assert len(re.findall(r"worker \S+ starting:", c.log())) == 3  # the first start, and one per cold start
