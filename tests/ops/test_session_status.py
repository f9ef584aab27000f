"""Issue 12: WebSocket sessions in /status, `corral status`, /metrics and the dashboard, read from a running
corral in front of WebSocket echo workers (tests/support/ws_echo_worker.py)."""

from __future__ import annotations

import re
import sys
import time

import pytest
from conftest import SUPPORT, corral_cli, free_ports, stub_args

from corral.cli.verbs import AdminClient

pytest.importorskip("websockets", reason="the websockets package (test extras) is not installed")
from websockets.sync.client import connect

ECHO = str(SUPPORT / "ws_echo_worker.py")


def _metric(text: str, name: str, app: str) -> float:
    m = re.search(rf'^{name}{{app="{re.escape(app)}"}} (\S+)$', text, re.M)
    assert m, f"{name} missing:\n{text}"
    return float(m.group(1))


def _table(*target: str) -> list[str]:
    r = corral_cli("status", *target)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_open_sessions_per_worker_in_status_table_metrics_and_dashboard(corral):
    aport = free_ports(1)
    c = corral(
        [
            "--admin",
            f"127.0.0.1:{aport}",
            "--sticky",
            "cookie",
            "--max-sessions",
            "5",
            "--",
            sys.executable,
            ECHO,
            "{port}",
        ],
        workers=2,
    )
    admin = AdminClient(f"127.0.0.1:{aport}")
    sessions = [connect(f"ws://127.0.0.1:{c.port}/live", open_timeout=30).__enter__() for _ in range(3)]
    try:
        where: dict[int, int] = {0: 0, 1: 0}
        for s in sessions:
            s.send("whoami")
            where[int(s.recv(timeout=30))] += 1
        doc = admin.ok("GET", "/status")
        (app,) = doc["apps"]
        assert app["sticky"] == "cookie"
        assert app["sessions"] == {"open": 3, "max_per_worker": 5, "opened": 3, "rejected": 0}
        assert {w["index"]: w["sessions"] for w in app["workers"]} == where
        assert doc["totals"]["sessions"] == 3
        assert all(w["inflight"] == 0 for w in app["workers"])  # a session holds no request slot

        lines = _table("--admin", f"127.0.0.1:{aport}")
        head = next(line for line in lines if line.startswith(f"app {app['name']} "))
        assert "sessions 3 open (3 opened, 0 rejected)  sticky cookie" in head
        header = next(line for line in lines if "PID" in line and "SESSIONS" in line)
        col = header.index("SESSIONS")
        rows = {int(line.split()[0]): line for line in lines if re.match(r"\d+ +\d+ +\d+ ", line)}
        assert {i: row[col : col + 8].split()[0] for i, row in rows.items()} == {i: f"{n}/5" for i, n in where.items()}

        _, text = admin.call("GET", "/metrics")
        text = text.decode()
        assert _metric(text, "corral_sessions", app["name"]) == 3
        assert _metric(text, "corral_sessions_opened_total", app["name"]) == 3
        assert _metric(text, "corral_sessions_rejected_total", app["name"]) == 0

        from test_dashboard import browser

        html = browser(f"http://127.0.0.1:{aport}/", "--dump-dom")
        shown = {int(i): int(n) for i, n in re.findall(r'data-index="(\d+)"[^>]*data-sessions="(\d+)"', html)}
        assert shown == where, html[-3000:]
        assert '<b class="sessions-open">3</b> open, 3 opened, 0 rejected (sticky cookie)' in html
    finally:
        for s in sessions:
            s.close()
    deadline = time.monotonic() + 30  # closed sessions leave the counts; what was opened stays counted
    while (app := admin.ok("GET", "/status")["apps"][0])["sessions"]["open"]:
        assert time.monotonic() < deadline, app["sessions"]
        time.sleep(0.1)
    assert app["sessions"]["opened"] == 3 and all(w["sessions"] == 0 for w in app["workers"])


def test_a_plain_api_keeps_its_status_table_and_still_reports_zero_sessions(corral):
    c = corral(stub_args(), workers=2)
    lines = _table("-p", str(c.port))
    assert not any("SESSIONS" in line for line in lines) and not any(" sessions " in line for line in lines)
    r = corral_cli("status", "--json", "-p", str(c.port))
    assert '"sessions": {' in r.stdout and '"sticky": "none"' in r.stdout
