"""Issue 20 #4: every replacement corral makes is a restart with its reason. Kills for a request past
request_timeout, failed probes and memory are failures (counted, backed off like a crash, towards
crash_limit); recycling by max_requests is planned (counted by its reason, no backoff, no crash loop)."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime

from conftest import free_ports, get, poll, stub_args
from prometheus_client.parser import text_string_to_metric_families

from corral.cli.verbs import AdminClient, locate

# /health passes once (the readiness probe) and fails from then on: every worker is killed for failed probes.
SICKENS = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

probes = 0

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        global probes
        status = 200
        if self.path == "/health":
            probes += 1
            status = 200 if probes == 1 else 500
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def status_of(c) -> dict:
    return AdminClient(locate(c.port, None)).ok("GET", "/status")["apps"][0]


def restart_samples(c) -> dict[str, float]:
    text = AdminClient(locate(c.port, None)).ok("GET", "/metrics").decode()
    return {
        s.labels["reason"]: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "corral_worker_restarts_total"
    }


def _when(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def test_request_timeout_kills_are_restarts_that_back_off_and_make_a_crash_loop(corral):
    c = corral(stub_args("--request-timeout", "1", "--crash-limit", "3/600"), workers=1)
    for n in range(1, 4):
        assert get(c.port, "/hang", timeout=60).status == 504
        c.wait_for(
            r"worker \S+:0 stopped: killed by SIGKILL \(request exceeded request_timeout \(1s\)\); "
            r"restarting in",
            count=n,
        )
        c.wait_for(r"worker \S+:0 ready: pid ", count=n + 1)
    delays = re.findall(r"request_timeout \(1s\)\); restarting in ([\d.]+)s", c.log())
    assert delays == ["0.1", "0.2", "0.4"]  # doubling, as after a crash
    c.wait_for(r"corral: app \S+ is crash-looping: 3 worker exits in \d+s \(crash_limit 3/600s\)")
    app = status_of(c)
    assert app["restarts"] == {"request exceeded request_timeout": 3} and app["restarts_total"] == 3
    assert [w["restarts"] for w in app["workers"]] == [3]
    assert app["crash_loop"] is not None and app["crash_loop"]["exits"] == 3
    assert restart_samples(c) == {"request exceeded request_timeout": 3}
    assert get(c.port, "/x").status == 200  # restarts went on


def test_failed_probe_kills_back_off_and_make_a_crash_loop(corral, tmp_path):
    script = tmp_path / "sickens.py"
    script.write_text(SICKENS)
    args = [
        "--health-path",
        "/health",
        "--health-interval",
        "0.2",
        "--health-fails",
        "1",
        "--crash-limit",
        "3/600",
        "--",
        sys.executable,
        str(script),
        "{port}",
    ]
    c = corral(args, workers=1)
    c.wait_for(r"corral: app \S+ is crash-looping: 3 worker exits in \d+s \(crash_limit 3/600s\)", timeout=60)
    c.wait_for(r"worker \S+:0 starting: pid ", count=4, timeout=60)
    log = c.log()
    delays = re.findall(
        r"corral: worker \S+:0 stopped: killed by SIGKILL \(1 failed probes while idle "
        r"\(last: status 500\)\); restarting in ([\d.]+)s$",
        log,
        re.M,
    )
    assert delays[:3] == ["0.1", "0.2", "0.4"], log[-3000:]
    # each next start came no sooner than that backoff after the kill (10 ms for the log's rounding)
    kills = re.findall(r"^(\S+) corral: worker \S+:0 stopping: 1 failed probes while idle", log, re.M)
    starts = re.findall(r"^(\S+) corral: worker \S+:0 starting: pid ", log, re.M)
    for killed, delay, started in zip(kills[:3], delays[:3], starts[1:4], strict=True):
        assert _when(started) - _when(killed) >= float(delay) - 0.01, (killed, delay, started)
    app = status_of(c)
    assert set(app["restarts"]) == {"1 failed probes while idle"} and app["restarts_total"] >= 3
    assert app["crash_loop"] is not None
    assert restart_samples(c)["1 failed probes while idle"] >= 3


def test_a_worker_over_max_memory_is_a_failure_restart(corral):
    c = corral(stub_args("--max-memory", "80", "--crash-limit", "1/600"), workers=1)
    fat = get(c.port, "/mem?mb=120").json()["pid"]
    c.wait_for(r"worker \S+:0 draining: memory \d+MB over max_memory \(80MB\)")
    c.wait_for(r"corral: app \S+ is crash-looping: 1 worker exits in \d+s \(crash_limit 1/600s\)")
    app = poll("the memory restart counted", lambda: (a := status_of(c))["restarts_total"] and a)
    assert app["restarts"] == {"over max_memory": 1}
    assert {w["restarts"] for w in app["workers"]} == {1}
    assert restart_samples(c) == {"over max_memory": 1}
    poll("the fat worker replaced", lambda: get(c.port, "/x").json()["pid"] != fat)


def test_recycling_by_max_requests_is_counted_but_never_backed_off_or_a_crash_loop(corral):
    c = corral(stub_args("--max-requests", "2", "--crash-limit", "1/600"), workers=1)
    recycled = r"worker \S+:0 draining: served max_requests \(2\)"
    poll("two recycles", lambda: get(c.port, "/x").status == 200 and len(re.findall(recycled, c.log())) >= 2)
    app = poll("two recycles counted", lambda: (a := status_of(c))["restarts_total"] >= 2 and a)
    assert set(app["restarts"]) == {"served max_requests"}
    assert {w["restarts"] for w in app["workers"]} == {0}  # a slot's restarts are its failures
    assert app["crash_loop"] is None
    assert set(restart_samples(c)) == {"served max_requests"}
    log = c.log()
    assert "crash-looping" not in log and "restarting in" not in log


def test_a_worker_killed_for_startup_timeout_is_a_failed_start(tmp_path):
    # Killed as never ready, it counts as a start that failed: an app none of whose workers gets ready
    # exits 3 with their output, as when they exit by themselves (it used to restart them forever, unpaced).
    port = free_ports(4)
    argv = [
        sys.executable,
        "-m",
        "corral",
        "run",
        "-p",
        str(port),
        "-w",
        "2",
        "--startup-timeout",
        "1",
        "--",
        "sh",
        "-c",
        "echo 'booting, waiting for a database'; exec sleep 600",
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 3, r.stdout[-3000:]
    assert "cannot start" in r.stderr and "not ready after startup_timeout (1s)" in r.stderr, r.stderr
    assert "booting, waiting for a database" in r.stderr
    assert (
        len(
            re.findall(
                r"stopped: killed by SIGKILL \(not ready after startup_timeout \(1s\)\); restarting in", r.stdout
            )
        )
        == 2
    )
