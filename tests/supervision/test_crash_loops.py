"""Issue 14: crash loops: an app whose workers keep exiting is shown as crash-looping in status, metrics,
logs and the dashboard, its workers are still restarted with backoff, and crash_limit is validated.

Real corral processes over real sockets; every wait is a bounded poll, nothing asserts on timing.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
from conftest import STUB, chatty_args, corral_cli, free_ports, get

from corral.cli.verbs import AdminClient, locate


def test_a_crash_looping_app_shows_the_state_everywhere_and_backoff_goes_on(corral):
    c = corral(chatty_args("--crash-limit", "3/600"), workers=1, env={"CHATTY_DIE_AFTER": "2"})
    for n in range(1, 4):  # each request is the worker's second: it answers, then dies
        assert get(c.port, f"/x?n={n}", timeout=60).status == 200
        c.wait_for(r"worker chatty:0 stopped: exited with code 1", count=n)
    c.wait_for(r"corral: app chatty is crash-looping: \d+ worker exits in \d+s \(crash_limit 3/600s\)")
    doc = json.loads(corral_cli("status", "--json", "-p", str(c.port)).stdout)
    (app,) = doc["apps"]
    loop = app["crash_loop"]
    assert loop is not None and loop["exits"] >= 3 and loop["limit"] == 3 and loop["window_s"] == 600
    assert any("database connection lost" in line for line in loop["last_lines"]), loop
    table = corral_cli("status", "-p", str(c.port)).stdout
    assert "crash-looping" in table and "database connection lost" in table
    metrics = AdminClient(locate(c.port, None)).ok("GET", "/metrics").decode()
    assert re.search(r'corral_crash_looping\{app="chatty"\} 1\.0', metrics), metrics
    logs = corral_cli("logs", "-p", str(c.port)).stdout
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
