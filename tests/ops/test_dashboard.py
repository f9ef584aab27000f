"""The dashboard in a real headless Chromium: it renders a running corral's workers and follows a scale."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from conftest import ROOT, free_ports, get, stub_args

from corral.cli.verbs import AdminClient

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROW = re.compile(r'<tr class="worker" data-index="(\d+)" data-pid="(\d+)" data-state="([a-z]+)"')
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def browser(url: str, *extra: str) -> str:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=3000", *extra, url],
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def rows(html: str) -> dict[int, tuple[int, str]]:
    """pid -> (index, state) of the worker rows the page rendered."""
    return {int(pid): (int(i), state) for i, pid, state in ROW.findall(html)}


def admin_corral(corral, *opts: str):
    aport = free_ports(1)
    c = corral(stub_args("--admin", f"127.0.0.1:{aport}", *opts), workers=2)
    return c, aport


def test_dashboard_renders_workers_and_follows_a_scale(corral, tmp_path):
    c, aport = admin_corral(corral)
    for _ in range(5):
        assert get(c.port, "/x").status == 200
    url = f"http://127.0.0.1:{aport}/"
    html = browser(url, "--dump-dom")
    assert 'data-loaded="1"' in html, html[-3000:]
    seen = rows(html)
    assert seen == {pid: (i, "ready") for i, pid in c.worker_pids().items()}
    assert 'id="conn">live<' in html
    assert 'data-route="GET /x" data-class="short"' in html  # the learned route table
    assert re.search(r'<button class="primary" data-act="scale" data-app="[^$"]+">Scale</button>', html)
    ceiling = AdminClient(f"127.0.0.1:{aport}").ok("GET", "/status")["apps"][0]["worker_ceiling"]
    assert f'<input type="number" min="1" max="{ceiling}" value="2"' in html  # the browser stops at /scale's bound
    assert re.search(r'<button data-act="reload" data-app="[^$"]+">Reload</button>', html)

    r = subprocess.run(
        [sys.executable, "-m", "corral", "scale", "3", "--admin", f"127.0.0.1:{aport}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    html = browser(url, "--dump-dom")
    after = rows(html)
    assert len(after) == 3 and set(seen) < set(after)
    (new_pid,) = set(after) - set(seen)
    assert after[new_pid] == (2, "ready")

    shot = tmp_path / "dashboard.png"
    browser(url, f"--screenshot={shot}", "--window-size=1280,800")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dashboard_with_token_reads_it_from_the_fragment(corral):
    c, aport = admin_corral(corral, "--admin-token", "t0ken")
    html = browser(f"http://127.0.0.1:{aport}/#token=t0ken", "--dump-dom")
    assert set(rows(html)) == set(c.worker_pids().values())
    html = browser(f"http://127.0.0.1:{aport}/", "--dump-dom")
    assert not rows(html) and 'id="conn">not connected: admin token required' in html


def test_series_feeds_the_charts(corral):
    c, aport = admin_corral(corral)
    client = AdminClient(f"127.0.0.1:{aport}")
    for _ in range(10):
        assert get(c.port, "/sleep?s=0.02").status == 200
    import time

    deadline = time.monotonic() + 10
    while True:  # one sample a second: wait for one taken after the requests
        doc = client.ok("GET", "/series")
        s = next(iter(doc["apps"].values()))
        if s["service_p50"] and s["service_p50"][-1] is not None and len(s["t"]) >= 2:
            break
        assert time.monotonic() < deadline, doc
        time.sleep(0.2)
    assert set(s) >= {"t", "depth", "rate", "wait_p50", "wait_p99", "service_p50", "service_p99"}
    assert all(len(v) == len(s["t"]) for v in s.values())
    assert 0.01 < s["service_p50"][-1] < 1.0  # /sleep?s=0.02 lands in the 10-25 ms bucket or near it
    assert sum(s["rate"]) > 0


def test_dashboard_page_is_self_contained():
    page = (ROOT / "src" / "corral" / "ops" / "dashboard.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # no CDN, works offline
    assert "fetch(" in page and "/status" in page and "/series" in page


def test_dashboard_shows_an_app_scaled_to_zero(corral):
    aport = free_ports(1)
    c = corral(
        stub_args("--admin", f"127.0.0.1:{aport}", "--min-workers", "0", "--max-workers", "2", "--idle-timeout", "1"),
        workers=None,
    )
    c.wait_for(r"idle \(scaled to zero\): no worker runs")
    html = browser(f"http://127.0.0.1:{aport}/", "--dump-dom")
    assert 'data-loaded="1"' in html, html[-3000:]
    assert '<b class="zero-state">idle (scaled to zero)</b>' in html
    assert rows(html) == {} and '<input type="number" min="0"' in html  # `corral scale 0` is allowed for it
