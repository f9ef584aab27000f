"""The admin channel of a running corral: status, metrics, auth, the Host rule, strictness, scale bounds, stop;
access log and log dir; the CLI verbs' imports."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys

from conftest import corral_cli, free_ports, get, request, stub_args
from prometheus_client.parser import text_string_to_metric_families

from corral.cli.verbs import AdminClient, locate
from corral.net import host_names, host_refusal


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return corral_cli(*args, timeout=timeout)


def admin_of(c) -> AdminClient:
    return AdminClient(locate(c.port, None))


def test_status_json_and_table(corral):
    c = corral(stub_args(), workers=2)
    for _ in range(4):
        assert get(c.port, "/x").status == 200
    r = cli("status", "--json", "-p", str(c.port))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    (app,) = doc["apps"]
    assert app["route"] == "/" and app["desired"] == 2 and app["ready"] == 2
    assert app["queue"] == {
        "depth": 0,
        "max": 1000,
        "rejected": 0,
        "timed_out": 0,
        "refused_early": 0,
        "oldest_wait_s": 0.0,
    }
    pids = c.worker_pids()
    assert {w["index"]: w["pid"] for w in app["workers"]} == pids
    for w in app["workers"]:
        for key in (
            "index",
            "pid",
            "port",
            "state",
            "inflight",
            "served",
            "failed",
            "restarts",
            "rss_bytes",
            "cpu_percent",
            "uptime_s",
        ):
            assert key in w, key
        assert w["state"] == "ready" and f"pid {w['pid']} port {w['port']} ready" in c.log()
        assert w["rss_bytes"] > 1_000_000 and w["restarts"] == 0
    assert sum(w["served"] for w in app["workers"]) == 4 == doc["totals"]["served"]
    assert doc["totals"]["workers"] == 2 and doc["corral"]["pid"] == c.proc.pid

    table = cli("status", "-p", str(c.port))
    assert table.returncode == 0, table.stderr
    assert "\x1b[" not in table.stdout  # no colour when not a terminal
    lines = table.stdout.splitlines()
    header = next(line for line in lines if "PID" in line and "STATE" in line)
    rows = [line for line in lines if any(line.split()[1:2] == [str(p)] for p in pids.values())]
    assert len(rows) == 2
    col = header.index("STATE")
    assert all(row[col : col + 5] == "ready" for row in rows)  # aligned under its header


def test_metrics_parse_and_count_requests_failures_restarts(corral):
    c = corral(stub_args(), workers=2)
    for _ in range(5):
        assert get(c.port, "/x").status == 200
    assert get(c.port, "/crash").status == 502
    c.wait_for(r"stopped: exited with code 3.*restarting in")
    c.wait_for(" ready: pid ", count=3)
    status, text = admin_of(c).call("GET", "/metrics")
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(text.decode())}

    samples = [s for fam in fams.values() for s in fam.samples]

    def value(name: str, **labels: str) -> float:
        for s in samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        raise AssertionError(f"no sample {name} {labels}")

    assert value("corral_requests_total", code="2xx") == 5
    assert value("corral_requests_total", code="5xx") == 1
    assert fams["corral_queue_wait_seconds"].type == "histogram"
    assert fams["corral_upstream_service_seconds"].type == "histogram"
    assert value("corral_queue_wait_seconds_count") == 6
    assert value("corral_upstream_service_seconds_count") == 6
    assert value("corral_upstream_service_seconds_bucket", le="+Inf") == 6
    assert value("corral_workers", state="ready") == 2
    assert value("corral_worker_restarts_total", reason="exited") == 1
    assert value("corral_upstream_failures_total") == 1
    assert value("corral_queue_depth") == 0 and value("corral_inflight") == 0
    assert value("corral_rejected_total") == 0 and value("corral_queue_timeouts_total") == 0


def test_queue_rejections_and_timeouts_are_counted(corral):
    import concurrent.futures as cf

    c = corral(stub_args("--max-queue", "1", "--queue-timeout", "0.5"), workers=1)
    with cf.ThreadPoolExecutor(3) as pool:
        busy = pool.submit(get, c.port, "/sleep?s=2")
        c_admin = admin_of(c)
        _wait_status(c_admin, lambda d: d["totals"]["busy"] == 1)
        waiting = pool.submit(get, c.port, "/x")  # queued, then timed out
        _wait_status(c_admin, lambda d: d["totals"]["queued"] == 1)
        assert get(c.port, "/x").status == 503  # queue full: rejected at once
        assert waiting.result().status == 503 and busy.result().status == 200
    doc = c_admin.ok("GET", "/status")
    assert doc["apps"][0]["queue"]["rejected"] == 1 and doc["apps"][0]["queue"]["timed_out"] == 1
    _, text = c_admin.call("GET", "/metrics")
    samples = {s.name: s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples}
    assert samples["corral_rejected_total"] == 1 and samples["corral_queue_timeouts_total"] == 1


def _wait_status(client: AdminClient, cond, timeout: float = 20) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while True:
        doc = client.ok("GET", "/status")
        if cond(doc):
            return doc
        assert time.monotonic() < deadline, doc
        time.sleep(0.05)


def test_admin_socket_is_private_and_removed_on_stop(corral):
    c = corral(stub_args(), workers=1)
    path = locate(c.port, None).removeprefix("unix:")
    assert f"admin on unix:{path}" in c.log()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    r = cli("stop", "-p", str(c.port))
    assert r.returncode == 0, r.stderr
    assert "stopped" in r.stdout
    assert c.proc.wait(10) == 0
    assert not os.path.exists(path)


def test_non_loopback_admin_without_token_is_refused(tmp_path):
    port = free_ports(4)
    r = corral_cli(
        "run", "-p", str(port), "-w", "1", "--admin", f"0.0.0.0:{port + 3}", *stub_args(), timeout=30, cwd=tmp_path
    )
    assert r.returncode == 2
    err = r.stderr.strip()
    assert "\n" not in err and "0.0.0.0" in err and "--admin-token" in err
    assert "starting" not in r.stdout  # refused before any worker started


def test_admin_is_never_the_public_port(tmp_path):
    port = free_ports(4)
    r = corral_cli(
        "run", "-p", str(port), "-w", "1", "--admin", f"127.0.0.1:{port}", *stub_args(), timeout=30, cwd=tmp_path
    )
    assert r.returncode == 2 and "public port" in r.stderr


def test_token_required_when_set(corral):
    aport = free_ports(1)
    c = corral(stub_args("--admin", f"0.0.0.0:{aport}", "--admin-token", "s3cret"), workers=1)
    no = request(aport, b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert no.status == 401 and no.header("www-authenticate") is not None
    wrong = get(aport, "/status", headers="Authorization: Bearer nope\r\n")
    assert wrong.status == 401
    for path in ("/metrics", "/series"):
        assert get(aport, path).status == 401
    assert request(aport, b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").status == 401
    ok = get(aport, "/status", headers="Authorization: Bearer s3cret\r\n")
    assert ok.status == 200 and ok.json()["totals"]["workers"] == 1
    assert get(aport, "/").status == 200  # the static dashboard shell; its calls carry the token
    r = cli("status", "--json", "--admin", f"127.0.0.1:{aport}")
    assert r.returncode == 1 and "token" in r.stderr
    r = cli("status", "--json", "--admin", f"127.0.0.1:{aport}", "--admin-token", "s3cret")
    assert r.returncode == 0 and json.loads(r.stdout)["totals"]["workers"] == 1
    assert "reload" not in c.log()  # the refused POST did nothing


def admin_call(aport: int, method: str, path: str, host: str | None = None, headers: str = ""):
    """One request to a TCP admin channel, by default with the Host a browser on 127.0.0.1:PORT sends."""
    host_line = "" if host == "" else f"Host: {host or f'127.0.0.1:{aport}'}\r\n"
    body = "Content-Length: 0\r\n" if method == "POST" else ""
    raw = f"{method} {path} HTTP/1.1\r\n{host_line}{headers}{body}Connection: close\r\n\r\n"
    return request(aport, raw.encode())


def test_admin_http_is_strict(corral):
    aport = free_ports(1)
    c = corral(stub_args("--admin", f"127.0.0.1:{aport}"), workers=1)

    def call(raw: bytes):
        return request(aport, raw)

    assert admin_call(aport, "POST", "/status").status == 405
    r = admin_call(aport, "GET", "/reload")
    assert r.status == 405 and r.header("allow") == "POST"
    assert admin_call(aport, "GET", "/nope").status == 404
    assert admin_call(aport, "GET", "/status/").status == 404
    assert admin_call(aport, "POST", "/scale?workers=0").status == 400
    assert admin_call(aport, "POST", "/scale?workers=%C2%B2").status == 400  # "²".isdigit(), yet no int
    assert admin_call(aport, "POST", "/scale").status == 400
    assert admin_call(aport, "POST", "/scale?workers=2&app=ghost").status == 404
    assert call(b"GARBAGE\r\n\r\n").status == 400
    # a page on another site cannot make the operator's browser reload or stop us
    evil = b"POST /stop HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nOrigin: http://evil.example\r\nContent-Length: 0\r\n\r\n"
    assert call(evil % aport).status == 403
    same = b"POST /reload HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nOrigin: http://127.0.0.1:%d\r\nContent-Length: 0\r\n\r\n"
    assert call(same % (aport, aport)).status == 202  # the dashboard's own buttons
    c.wait_for("draining: replaced by pid")
    assert c.proc.poll() is None
    # keep-alive: several requests on one connection, answered in order
    with socket.create_connection(("127.0.0.1", aport), timeout=10) as s:
        from conftest import read_response

        h = b"Host: localhost:%d\r\n" % aport
        s.sendall(b"GET /status HTTP/1.1\r\n" + h + b"\r\nGET /nope HTTP/1.1\r\n" + h + b"\r\n")
        buf = bytearray()
        assert read_response(s, buf).status == 200
        assert read_response(s, buf).status == 404
    # public port does not serve the admin API: /status there goes to the worker
    assert "pid" in get(c.port, "/status").json()


# --- the Host rule (DNS rebinding) -------------------------------------------------------------------
def test_a_rebound_page_cannot_read_or_stop_a_loopback_admin(corral):
    """attacker.example rebound to 127.0.0.1: same origin to the browser, but its Host names the attacker."""
    aport = free_ports(1)
    c = corral(stub_args("--admin", f"127.0.0.1:{aport}"), workers=1)
    evil = f"attacker.example:{aport}"
    r = admin_call(aport, "GET", "/status", host=evil)
    assert r.status == 421 and "attacker.example" in r.json()["error"] and b"pid" not in r.body
    for path in ("/metrics", "/series", "/"):
        assert admin_call(aport, "GET", path, host=evil).status == 421
    stop = admin_call(aport, "POST", "/stop", host=evil, headers=f"Origin: http://{evil}\r\n")
    assert stop.status == 421
    assert admin_call(aport, "POST", "/reload", host=evil, headers=f"Origin: http://{evil}\r\n").status == 421
    assert admin_call(aport, "GET", "/status", host="").status == 400  # HTTP/1.1 without Host
    assert admin_call(aport, "GET", "/status", host="127.0.0.1:1").status == 421  # another port is another origin
    for good in (f"127.0.0.1:{aport}", f"LOCALHOST:{aport}", "localhost", f"[::1]:{aport}", "127.0.0.1"):
        assert admin_call(aport, "GET", "/status", host=good).status == 200, good
    # the refused stop did nothing: scaling up (which waits for a new worker to be ready) still works
    r = cli("scale", "2", "--admin", f"127.0.0.1:{aport}")
    assert r.returncode == 0, r.stderr
    assert c.proc.poll() is None and "stopping" not in c.log() and "reload" not in c.log()


def test_host_names_of_a_tcp_admin_channel():
    names = host_names("127.0.0.1", 9180)
    assert {"127.0.0.1", "127.0.0.1:9180", "localhost:9180", "[::1]:9180", "localhost"} <= names
    assert host_refusal("LocalHost:9180", names) is None
    for bad in ("attacker.example:9180", "attacker.example", "127.0.0.1:9181", "localhost.:9180", "127.0.0.2:9180"):
        assert host_refusal(bad, names), bad
    assert host_refusal(None, names) == "Host header required"
    v6 = host_names("::1", 9180)
    assert "[::1]:9180" in v6 and "[::1]" in v6 and "::1" not in v6
    extra = host_names("127.0.0.1", 9180, ["Admin.Internal", "ops.example:443", " "])
    assert host_refusal("admin.internal:9180", extra) is None and host_refusal("admin.internal", extra) is None
    assert host_refusal("ops.example:443", extra) is None and host_refusal("ops.example:9180", extra)
    assert "" not in extra
    long = host_refusal("x" * 500, names)
    assert long is not None and len(long) < 200  # a short reason, whatever was sent


# --- the scale ceiling -----------------------------------------------------------------------------
def test_scale_above_the_worker_ceiling_is_refused_and_changes_nothing(corral):
    c = corral(stub_args(), workers=1)
    admin = admin_of(c)
    ceiling = admin.ok("GET", "/status")["apps"][0]["worker_ceiling"]
    assert isinstance(ceiling, int) and ceiling >= 1
    status, doc = admin.call("POST", "/scale?workers=100000")
    assert status == 400 and doc["ceiling"] == ceiling
    assert doc["error"].startswith(f"workers must be between 1 and {ceiling} (")
    assert admin.call("POST", f"/scale?workers={ceiling + 1}")[0] == 400
    r = cli("scale", "100000", "-p", str(c.port))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == f"corral: {doc['error']}" and "Traceback" not in r.stderr
    (app,) = admin.ok("GET", "/status")["apps"]
    assert app["desired"] == 1 and len(app["workers"]) == 1
    assert "scaling" not in c.log()


# --- the CLI verbs ---------------------------------------------------------------------------------
def test_a_bad_admin_address_is_one_line_not_a_traceback():
    r = cli("status", "--admin", "garbage")
    want = "corral: admin address: must be HOST:PORT with a port in 1..65535, or unix:/path (got 'garbage')"
    assert r.returncode == 2 and r.stderr.strip() == want


def test_the_cli_verbs_do_not_import_the_server_stack():
    code = (
        "import corral.cli.verbs, sys; "
        "assert 'corral.supervision.supervisor' not in sys.modules and 'corral.ops.admin' not in sys.modules "
        "and 'prometheus_client' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_access_log_json_to_file_and_metrics_both_observe(corral, tmp_path):
    log = tmp_path / "access.jsonl"
    c = corral(stub_args("--access-log", str(log), "--log-format", "json"), workers=1)
    for i in range(3):
        assert get(c.port, f"/a{i}", headers=f"X-Request-Id: rid-{i}\r\n").status == 200
    lines = _lines(log, 3)
    assert [rec["path"] for rec in lines] == ["/a0", "/a1", "/a2"]
    assert [rec["request_id"] for rec in lines] == ["rid-0", "rid-1", "rid-2"]
    for rec in lines:
        assert rec["status"] == 200 and rec["method"] == "GET" and rec["worker"] == 0
        assert rec["queue_wait_ms"] >= 0 and rec["service_ms"] > 0 and rec["client"] == "127.0.0.1"
    _, text = admin_of(c).call("GET", "/metrics")
    samples = {
        (s.name, s.labels.get("code")): s.value
        for f in text_string_to_metric_families(text.decode())
        for s in f.samples
    }
    assert samples[("corral_requests_total", "2xx")] == 3  # the access log did not displace the metrics


def _lines(path, n: int, timeout: float = 10) -> list[dict]:
    """The log line is written just after the response went out: wait for it, do not race it."""
    import time

    deadline = time.monotonic() + timeout
    while len(lines := path.read_text().splitlines()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return [json.loads(line) for line in lines]


def test_access_log_text_to_stdout(corral):
    c = corral(stub_args("--access-log", "-"), workers=1)
    assert get(c.port, "/hello?x=1").status == 200
    m = c.wait_for(r'127\.0\.0\.1 "GET /hello\?x=1" 200 \d+ wait=[\d.]+ms service=[\d.]+ms worker=0 id=\S+')
    assert m.group(0)


def test_log_dir_keeps_one_file_per_worker(corral, tmp_path):
    logs = tmp_path / "logs"
    c = corral(stub_args("--log-dir", str(logs)), workers=2)
    c.wait_for(r"\[\S+:1\] stub worker 1 listening")
    names = sorted(p.name for p in logs.iterdir())
    assert len(names) == 2 and all(re.fullmatch(r".+-[01]\.log", n) for n in names)
    for i, name in enumerate(names):
        assert f"stub worker {i} listening" in (logs / name).read_text()
