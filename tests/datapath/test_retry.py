"""Issue 23, part 2: a request whose worker is killed from outside goes once to another worker; one whose worker
dies on its own gets 502 and is never sent again; a request that keeps killing workers is quarantined.

Real stub workers, real SIGKILLs: the test finds the worker holding a request by the pid the worker wrote in
$STUB_LOG when it read it, and kills that process.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import sys
from pathlib import Path

from conftest import STUB, corral_cli, get, poll, request

from corral.cli.verbs import AdminClient, locate


def seen(log: Path, path: str) -> list[int]:
    """The pids of the workers that read a request for `path`, in order."""
    if not log.exists():
        return []
    return [int(line.split()[0]) for line in log.read_text().splitlines() if line.split()[2] == path]


def kill_holder(log: Path, path: str, n: int = 1) -> int:
    """SIGKILL the worker that read the n-th request for `path` (from outside: corral did not send it)."""
    pids = poll(f"a worker reading {path}", lambda: (p := seen(log, path)) and len(p) >= n and p)
    os.kill(pids[n - 1], signal.SIGKILL)
    return pids[n - 1]


def start(corral, tmp_path: Path, *extra: str, workers: int = 2):
    log = tmp_path / "stub.log"
    access = tmp_path / "access.log"
    args = ["--access-log", str(access), *extra, "--", sys.executable, STUB, "{port}"]
    return corral(args, workers=workers, env={"STUB_LOG": str(log)}), log, access


def raw(method: str, path: str, body: bytes = b"", headers: str = "") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body or method in ("POST", "PUT") else ""
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n{length}{headers}Connection: close\r\n\r\n".encode() + body


def status_doc(c) -> dict:
    r = corral_cli("status", "--json", "-p", str(c.port))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["apps"][0]


def test_a_get_whose_worker_is_killed_from_outside_is_answered_by_another_worker(corral, tmp_path):
    c, log, access = start(corral, tmp_path)
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(get, c.port, "/sleep?s=2")
        victim = kill_holder(log, "/sleep?s=2")
        r = pending.result()
    assert r.status == 200, r.body
    assert r.json()["pid"] != victim  # served by the other worker
    assert seen(log, "/sleep?s=2") == [victim, r.json()["pid"]]  # once on each: sent again exactly once
    c.wait_for(r"stopped: killed by SIGKILL; exited; restarting")
    line = poll("the access log line", lambda: [x for x in access.read_text().splitlines() if "/sleep" in x])
    assert len(line) == 1 and " 200 " in line[0] and line[0].endswith(" redispatched"), line
    app = status_doc(c)
    assert app["redispatched"] == 1 and app["failed"] == 0 and app["quarantine"]["requests"] == []


def test_a_post_without_idempotency_key_is_not_sent_again(corral, tmp_path):
    c, log, _ = start(corral, tmp_path)
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(request, c.port, raw("POST", "/sleep?s=2", b"x=1"))
        kill_holder(log, "/sleep?s=2")
        assert pending.result().status == 502
    assert len(seen(log, "/sleep?s=2")) == 1


def test_a_post_with_idempotency_key_is_sent_again(corral, tmp_path):
    c, log, _ = start(corral, tmp_path)
    with cf.ThreadPoolExecutor(1) as pool:
        body = b"payload" * 1000
        pending = pool.submit(request, c.port, raw("POST", "/sleep?s=2", body, "Idempotency-Key: k-1\r\n"))
        victim = kill_holder(log, "/sleep?s=2")
        r = pending.result()
    assert r.status == 200 and r.json()["len"] == len(body)  # the whole body went out again
    assert r.json()["pid"] != victim and len(seen(log, "/sleep?s=2")) == 2


def test_a_worker_that_exits_on_its_own_costs_that_request_a_502_and_it_is_never_sent_again(corral, tmp_path):
    c, log, _ = start(corral, tmp_path)
    r = get(c.port, "/crash")
    assert r.status == 502
    c.wait_for(r"stopped: exited with code 3")
    assert len(seen(log, "/crash")) == 1  # the other worker never saw it
    assert get(c.port, "/x").status == 200


def test_a_route_with_retry_off_gets_502(corral, tmp_path):
    log = tmp_path / "stub.log"
    toml = tmp_path / "corral.toml"
    toml.write_text(
        f'[[app]]\nname = "api"\nworkers = 2\ncommand = ["{sys.executable}", "{STUB}", "{{port}}"]\n'
        'no_retry_routes = ["GET /sleep-report*"]\n'
    )
    c = corral(["-c", str(toml)], workers=None, env={"STUB_LOG": str(log)})
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(get, c.port, "/sleep-report?s=2")
        kill_holder(log, "/sleep-report?s=2")
        assert pending.result().status == 502
    assert len(seen(log, "/sleep-report?s=2")) == 1
    with cf.ThreadPoolExecutor(1) as pool:  # the app's other routes are sent again
        pending = pool.submit(get, c.port, "/sleep?s=2")
        kill_holder(log, "/sleep?s=2")
        assert pending.result().status == 200


def test_a_response_already_begun_is_cut_not_sent_twice(corral, tmp_path):
    c, log, _ = start(corral, tmp_path)
    with socket.create_connection(("127.0.0.1", c.port), timeout=30) as s:
        s.sendall(raw("GET", "/drip"))
        got = bytearray()
        while b"0123456789" not in got:  # the head and the first 10 bytes of the body have reached the client
            got += s.recv(65536)
        kill_holder(log, "/drip")
        while data := s.recv(65536):
            got += data
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: 1000" in head.lower()
    assert body == b"0123456789"  # what the worker wrote, then the connection closes: a cut, no second response
    assert len(seen(log, "/drip")) == 1


def test_a_request_that_kills_workers_is_quarantined_after_two(corral, tmp_path):
    c, log, _ = start(corral, tmp_path, "--quarantine-period", "120")
    assert get(c.port, "/crash?n=1").status == 502
    c.wait_for(r"stopped: exited with code 3")
    assert get(c.port, "/x").status == 200  # a worker is free
    assert get(c.port, "/crash?n=1").status == 502
    c.wait_for(r"quarantined GET /crash: this request made 2 workers exit")
    c.wait_for(r"stopped: exited with code 3", count=2)
    refused = get(c.port, "/crash?n=1")
    assert refused.status == 502 and int(refused.header("retry-after")) > 0
    assert len(seen(log, "/crash?n=1")) == 2  # two workers, then refused without reaching one
    assert c.log().count("quarantined GET /crash") == 1  # one line, however many are refused
    c.wait_for(r" ready: pid ", count=4)
    other = get(c.port, "/crash?n=2")  # another query string: another request, not quarantined
    assert other.status == 502 and len(seen(log, "/crash?n=2")) == 1
    app = status_doc(c)
    (entry,) = app["quarantine"]["requests"]
    assert entry["route"] == "GET /crash" and entry["deaths"] == 2 and 0 < entry["left_s"] <= 120
    assert app["quarantine"]["refused"] == 1
    table = corral_cli("status", "-p", str(c.port)).stdout
    assert "quarantined" in table and "GET /crash" in table
    _, metrics = AdminClient(locate(c.port, None)).call("GET", "/metrics")
    metrics = metrics.decode() if isinstance(metrics, bytes) else metrics
    assert 'corral_quarantined{app="python",route="GET /crash"} 1.0' in metrics
    assert 'corral_quarantine_refused_total{app="python"} 1.0' in metrics


def test_a_kill_from_outside_does_not_quarantine(corral, tmp_path):
    c, log, _ = start(corral, tmp_path)
    for n in (1, 2, 3):  # the same request, its first worker killed each time: an operator's kill -9
        with cf.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(get, c.port, "/sleep?s=1")
            kill_holder(log, "/sleep?s=1", 2 * n - 1)
            assert pending.result().status == 200
        c.wait_for(r" ready: pid ", count=2 + n)
    assert len(seen(log, "/sleep?s=1")) == 6
    assert "quarantined" not in c.log()
    app = status_doc(c)
    assert app["redispatched"] == 3 and app["quarantine"]["requests"] == []


def test_a_streamed_body_that_kills_workers_does_not_quarantine_other_bodies(corral, tmp_path):
    # request_buffering off: the body goes out as it comes, so corral never holds it to fingerprint. Counting
    # its deaths would quarantine the route's every upload, whatever its body: one client's two crashing
    # uploads would refuse everyone else's for quarantine_period (the red team's finding).
    c, log, _ = start(corral, tmp_path, "--no-request-buffering", "--quarantine-period", "120")
    for n, body in enumerate((b"evil", b"evil", b"someone else's upload"), 1):
        assert request(c.port, raw("POST", "/crash", body)).status == 502
        c.wait_for(r"stopped: exited with code 3", count=n)
        c.wait_for(r" ready: pid ", count=2 + n)
    assert len(seen(log, "/crash")) == 3  # each reached a worker: none was refused without reaching one
    assert "quarantined" not in c.log()
    assert status_doc(c)["quarantine"]["requests"] == []
