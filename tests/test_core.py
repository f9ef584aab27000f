"""corral run with the single-threaded stub worker: supervision, central queue, HTTP/1.1 both ways."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import signal
import socket
import sys
import time

import psutil
from conftest import STUB, corral_cli, free_ports, get, read_response, request, stub_args


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


def test_one_request_per_worker_rest_wait_in_central_queue(corral):
    """Two workers, four 1 s requests: never more than one on a worker; the 3rd and 4th wait at the proxy."""
    c = corral(stub_args(), workers=2)
    with cf.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(get, c.port, "/sleep?s=1") for _ in range(4)]
        # while the first two run, a fast request also waits (FIFO): it is the fifth in line
        results = [f.result() for f in futs]
    assert [r.status for r in results] == [200] * 4
    by_pid: dict[int, int] = {}
    for r in results:
        by_pid[r.json()["pid"]] = by_pid.get(r.json()["pid"], 0) + 1
    assert sorted(by_pid.values()) == [2, 2]
    # Each stub numbers the requests it sees: per worker, the two are consecutive, nothing in between.
    for pid in by_pid:
        seen = sorted(r.json()["seen"] for r in results if r.json()["pid"] == pid)
        assert seen[1] - seen[0] == 1


def test_queued_request_goes_to_first_worker_that_frees_up(corral):
    c = corral(stub_args(), workers=2)
    with cf.ThreadPoolExecutor(3) as pool:
        long = pool.submit(get, c.port, "/sleep?s=4")
        time.sleep(0.3)
        short = pool.submit(get, c.port, "/sleep?s=0.5")
        time.sleep(0.1)
        queued = pool.submit(get, c.port, "/x")  # both workers busy: waits centrally
        q = queued.result()
        assert short.result().json()["pid"] == q.json()["pid"]  # not stuck behind the 4 s one
        assert long.result().json()["pid"] != q.json()["pid"]


def test_queue_full_answers_503_with_retry_after_at_once(corral):
    c = corral(stub_args("--max-queue", "1"), workers=1)
    with cf.ThreadPoolExecutor(2) as pool:
        busy = pool.submit(get, c.port, "/sleep?s=2")
        time.sleep(0.3)
        waiting = pool.submit(get, c.port, "/x")
        time.sleep(0.3)
        r = get(c.port, "/x")
        assert r.status == 503
        assert r.header("retry-after") is not None and int(r.header("retry-after")) >= 1
        assert busy.result().status == 200 and waiting.result().status == 200


def test_queue_timeout_answers_503_with_retry_after(corral, tmp_path):
    log = tmp_path / "stub.log"
    c = corral(stub_args("--queue-timeout", "0.5"), workers=1, env={"STUB_LOG": str(log)})
    with cf.ThreadPoolExecutor(2) as pool:
        busy = pool.submit(get, c.port, "/sleep?s=2.5")
        time.sleep(0.3)
        r = get(c.port, "/never-reached")
        assert r.status == 503 and int(r.header("retry-after")) >= 1
        assert busy.result().status == 200
    assert get(c.port, "/after").status == 200
    seen = log.read_text()
    assert "/never-reached" not in seen and "/after" in seen


def test_client_that_leaves_while_queued_never_reaches_a_worker(corral, tmp_path):
    log = tmp_path / "stub.log"
    c = corral(stub_args(), workers=1, env={"STUB_LOG": str(log)})
    with cf.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(get, c.port, "/sleep?s=1.5")
        time.sleep(0.3)
        s = socket.create_connection(("127.0.0.1", c.port))
        s.sendall(b"GET /abandoned HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.3)
        s.close()
        assert busy.result().status == 200
    assert get(c.port, "/after").status == 200
    lines = log.read_text().splitlines()
    assert not any("/abandoned" in line for line in lines)
    assert any("/after" in line for line in lines)


def test_keepalive_and_pipelining_answer_in_order(corral):
    c = corral(stub_args(), workers=2)
    with socket.create_connection(("127.0.0.1", c.port), timeout=20) as s:
        s.sendall(b"".join(f"GET /p{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for i in range(5)))
        buf = bytearray()
        paths = [read_response(s, buf).json()["path"] for _ in range(5)]
        assert paths == [f"/p{i}" for i in range(5)]
        s.sendall(b"GET /again HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s, buf).json()["path"] == "/again"


def test_content_length_body_streams_both_ways(corral):
    c = corral(stub_args(), workers=1)
    body = os.urandom(8 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", c.port), timeout=60) as s:
        s.sendall(f"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        s.sendall(body)
        r = read_response(s)
    assert r.status == 200
    assert r.json() == {
        "len": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "index": "0",
        "pid": r.json()["pid"],
    }
    big = get(c.port, "/big?n=20000000", timeout=60)
    assert len(big.body) == 20_000_000


def test_chunked_request_body_is_reframed_for_the_worker(corral):
    c = corral(stub_args(), workers=1)
    parts = [os.urandom(n) for n in (1, 1000, 70000, 5)]
    raw = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    r = request(c.port, b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + raw)
    assert r.status == 200
    whole = b"".join(parts)
    assert r.json()["len"] == len(whole) and r.json()["sha256"] == hashlib.sha256(whole).hexdigest()


def test_chunked_and_close_delimited_responses(corral):
    c = corral(stub_args(), workers=1)
    r = get(c.port, "/chunked")
    assert r.body == b"hello chunked world" and r.header("transfer-encoding") == "chunked"
    r = get(c.port, "/eof")
    assert r.status == 200 and r.body == b"until-close"
    assert r.header("transfer-encoding") == "chunked"  # re-framed for an HTTP/1.1 client
    r10 = request(c.port, b"GET /eof HTTP/1.0\r\n\r\n")
    assert r10.body == b"until-close"


def test_forwarding_headers_and_hop_by_hop(corral):
    c = corral(stub_args(), workers=1)
    r = get(c.port, "/h", headers="X-Forwarded-For: 6.6.6.6\r\nKeep-Alive: 5\r\nX-Drop: 1\r\nConnection: X-Drop\r\n")
    seen = r.json()["headers"]
    assert seen["x-forwarded-for"] == "127.0.0.1"  # untrusted peer: replaced, not appended
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "t"
    assert seen["via"] == "1.1 corral"
    assert "x-drop" not in seen and "keep-alive" not in seen
    assert seen["x-request-id"] == r.header("x-request-id")
    hop = get(c.port, "/hop")
    assert hop.header("x-secret") is None and hop.header("keep-alive") is None
    assert hop.header("via") == "1.1 corral"


def test_killed_worker_restarts_and_only_its_request_fails(corral):
    c = corral(stub_args(), workers=2)
    with cf.ThreadPoolExecutor(2) as pool:
        victim = pool.submit(get, c.port, "/sleep?s=3")
        time.sleep(0.5)
        pids = c.worker_pids()
        # the busy worker is the one whose /x answers do not come from
        other_pid = get(c.port, "/x").json()["pid"]
        victim_pid = next(p for p in pids.values() if p != other_pid)
        os.kill(victim_pid, signal.SIGKILL)
        assert victim.result().status == 502
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


def test_no_worker_outlives_a_sigkilled_corral(corral):
    c = corral(stub_args(), workers=2)
    pids = list(c.worker_pids().values())
    assert len(pids) == 2
    c.proc.kill()
    c.proc.wait()
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(psutil.pid_exists(p) for p in pids)


def test_client_disconnect_mid_response_keeps_worker_usable(corral):
    c = corral(stub_args(), workers=1)
    s = socket.create_connection(("127.0.0.1", c.port))
    s.sendall(b"GET /big?n=50000000 HTTP/1.1\r\nHost: t\r\n\r\n")
    s.recv(1000)
    s.close()
    for _ in range(3):
        assert get(c.port, "/x").status == 200


def test_connect_failure_moves_the_request_to_another_worker(corral, tmp_path):
    """A worker that went away (refuses connections) costs nothing: the request goes elsewhere."""
    import subprocess

    base = free_ports(2, start=30000)
    ports = [base, base + 1]
    stubs = [subprocess.Popen([sys.executable, STUB, str(p)], stdout=subprocess.DEVNULL) for p in ports]
    try:
        c = corral(["--upstream", f"127.0.0.1:{ports[0]}-{ports[1]}", "--health-interval", "60"], workers=None,
                   ready=False)
        c.wait_for(rf"ready: 127.0.0.1:{ports[1]}", timeout=30)
        c.wait_for(rf"ready: 127.0.0.1:{ports[0]}", timeout=30)
        stubs[0].kill()
        stubs[0].wait()
        statuses = [get(c.port, "/x").status for _ in range(20)]
        assert statuses == [200] * 20
        c.wait_for(rf"127.0.0.1:{ports[0]}.*(refused|connect failed)")
    finally:
        for p in stubs:
            p.kill()
            p.wait()
