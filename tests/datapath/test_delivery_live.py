"""Every byte delivered, every failure visible (issue #19), over real sockets: a real corral in front of the
stub worker (tests/support/stub_worker.py), clients on raw sockets.

The client's view is asserted first (status, every byte, when the connection closed), then corral's own
account (the JSON access log, /metrics) is checked against it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import closed_by_peer, get, poll, read_response, stub_args
from prometheus_client.parser import text_string_to_metric_families

from corral.cli.verbs import AdminClient, locate

# Seeing a client leave while its socket is not read takes TCP_INFO: Linux's path, pinned in both passes of
# scripts/test (the portable one has none: docs/operations.md, macOS).
TCP_INFO = {"CORRAL_PORTABLE": None}


def access_log(path: Path, n: int) -> list[dict]:
    """Wait for n lines (each is written as its exchange ends), then all of them."""

    def lines() -> list[dict] | None:
        got = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return got if len(got) >= n else None

    return poll(f"{n} access-log lines", lines)


def stub_seen(log: Path, what: str) -> int:
    return log.read_text().count(what) if log.exists() else 0


def metrics(port: int) -> dict[tuple[str, str], float]:
    _, text = AdminClient(locate(port, None)).call("GET", "/metrics")
    return {
        (s.name, s.labels.get("code") or s.labels.get("outcome") or s.labels.get("reason") or ""): s.value
        for f in text_string_to_metric_families(text.decode())
        for s in f.samples
    }


# --- 3: a full temporary directory -------------------------------------------------------------------
@pytest.fixture
def tiny_tmpdir(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a 2 MB tmpfs needs root (CI runs as root)")
    where = tmp_path / "tiny"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_slow_reader_gets_every_byte_when_the_temp_directory_is_full(corral, tiny_tmpdir, tmp_path):
    log = tmp_path / "access.jsonl"
    c = corral(
        stub_args("--response-buffer", "65536", "--access-log", str(log), "--log-format", "json"),
        workers=1,
        env={"TMPDIR": str(tiny_tmpdir)},
    )
    n = 30_000_000
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.settimeout(60)
        s.connect(("127.0.0.1", c.port))
        s.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % n)
        c.wait_for("cannot buffer a response in a temporary file")  # the 2 MB spill file is full
        resp = read_response(s)
    assert resp.status == 200 and len(resp.body) == n and resp.body == b"z" * n
    [rec] = access_log(log, 1)
    assert rec["status"] == 200 and rec["bytes"] == n and rec["cut"] == "" and rec["outcome"] == "served"
    assert c.log().count("cannot buffer a response in a temporary file") == 1  # said once, not per read


# --- 4, 5: request bodies -------------------------------------------------------------------------------
def test_a_slow_uploader_does_not_hold_the_only_worker(corral, tmp_path):
    stub_log = tmp_path / "stub.log"
    c = corral(stub_args(), workers=1, env={"STUB_LOG": str(stub_log)})
    with socket.create_connection(("127.0.0.1", c.port), timeout=30) as up:
        up.sendall(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 20000\r\n\r\n")
        for _ in range(5):
            up.sendall(b"u" * 10)
            time.sleep(0.3)
        # The uploader is 19950 bytes short; another client is served all the same, by the only worker.
        assert get(c.port, "/whoami", timeout=10).status == 200
        assert stub_seen(stub_log, "/upload") == 0, "the worker saw a request whose body had not arrived"
        up.sendall(b"u" * 19950)
        resp = read_response(up)
    assert resp.status == 200 and resp.json()["len"] == 20000


def test_a_streamed_slow_upload_never_gets_a_healthy_worker_killed(corral):
    c = corral(stub_args("--no-request-buffering", "--request-timeout", "3", "--body-timeout", "5"), workers=1)
    pid = c.worker_pids()[0]
    with socket.create_connection(("127.0.0.1", c.port), timeout=30) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n")
        for _ in range(5):
            time.sleep(0.9)  # 4.5 s of client time: past request_timeout, never past body_timeout
            s.sendall(b"x")
        resp = read_response(s)
    assert resp.status == 200 and resp.json()["len"] == 5 and resp.json()["pid"] == pid
    assert "request_timeout" not in c.log()


# --- 7: a client that leaves frees no worker that is still computing -----------------------------------
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_abandoned_requests_never_stack_work_on_the_worker(corral, tmp_path, loop):
    # asyncio's loop reads a request and the close behind it in two turns: the next request finds the queue
    # full of a client that has left, unless corral looks before its 503 (Exchange._submit: drop_departed).
    stub_log = tmp_path / "stub.log"
    log = tmp_path / "access.jsonl"
    c = corral(
        stub_args("--loop", loop, "--max-queue", "1", "--access-log", str(log), "--log-format", "json"),
        workers=1,
        env={"STUB_LOG": str(stub_log), **TCP_INFO},
    )
    for i in range(5):  # five clients send a 2 s request and leave
        with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
            s.sendall(b"GET /sleep?s=2&n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
            if i == 0:  # the first leaves once the worker has its request, the others at once
                poll("the worker to start on the first", lambda: stub_seen(stub_log, "/sleep"))
    records = access_log(log, 5)
    assert get(c.port, "/whoami", timeout=30).status == 200
    assert stub_seen(stub_log, "/sleep") == 1, "requests whose clients had left were dispatched"
    assert sorted(r["status"] for r in records) in ([499] * 5, [499] * 4 + [503], [499] * 3 + [503] * 2)
    assert all(r["outcome"] in ("abandoned", "refused") for r in records)


# --- 8: Expect: 100-continue ---------------------------------------------------------------------------
@pytest.mark.parametrize("buffering", [True, False])
def test_expect_continue_waiting_for_a_busy_worker_is_not_answered_408(corral, tmp_path, buffering):
    extra = [] if buffering else ["--no-request-buffering"]
    stub_log = tmp_path / "stub.log"
    c = corral(stub_args("--body-timeout", "1", *extra), workers=1, env={"STUB_LOG": str(stub_log)})
    busy = threading.Thread(target=get, args=(c.port, "/sleep?s=3"), kwargs={"timeout": 30})
    busy.start()
    poll("the worker to be busy", lambda: stub_seen(stub_log, "/sleep"))
    with socket.create_connection(("127.0.0.1", c.port), timeout=30) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += s.recv(1)
        # buffering: at once; streaming: once the worker is free; never a 408 meanwhile
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"abc")
        resp = read_response(s)
    busy.join()
    assert resp.status == 200 and resp.json()["len"] == 3


# --- 9, 10: refusals at the edge ------------------------------------------------------------------------
def test_edge_refusals_are_in_the_access_log_and_the_metrics(corral, tmp_path):
    log = tmp_path / "access.jsonl"
    c = corral(
        stub_args("--max-body", "100", "--header-timeout", "1", "--access-log", str(log), "--log-format", "json"),
        workers=1,
    )
    refusals = [
        (b"GARBAGE\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 101\r\n\r\n", 413),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: t\r\n", 408),  # a head that never ends
    ]
    for raw, status in refusals:
        with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
            with contextlib.suppress(OSError):
                s.sendall(raw)
            assert read_response(s).status == status
            assert closed_by_peer(s)
    records = access_log(log, len(refusals))
    assert sorted(r["status"] for r in records) == sorted(st for _, st in refusals)
    assert all(r["outcome"] == "refused" and r["worker"] is None for r in records)
    m = metrics(c.port)
    assert m[("corral_requests_total", "4xx")] == len(refusals) - 1 and m[("corral_requests_total", "5xx")] == 1
    assert m[("corral_exchanges_total", "refused")] == len(refusals)


def test_a_pipelined_request_refused_at_the_edge_gets_its_error(corral, tmp_path):
    log = tmp_path / "access.jsonl"
    c = corral(stub_args("--access-log", str(log), "--log-format", "json"), workers=1)
    bad = b"GET /two HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
    with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
        s.sendall(b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n" + bad)
        buf = bytearray()
        first = read_response(s, buf)
        second = read_response(s, buf)
        assert first.status == 200 and first.json()["path"] == "/one"
        assert second.status == 400
        assert closed_by_peer(s)
    assert sorted(r["status"] for r in access_log(log, 2)) == [200, 400]
