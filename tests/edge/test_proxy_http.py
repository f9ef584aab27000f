"""The proxy's HTTP/1.1 both ways, end to end: keep-alive and pipelining, bodies streamed and re-framed
(Content-Length, chunked, close-delimited), forwarding and hop-by-hop headers, a client leaving mid-response,
and a request that cannot connect to a worker going to another one."""

from __future__ import annotations

import hashlib
import os
import socket
import sys

from conftest import STUB, free_ports, get, read_response, request, stub_args


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

    base = free_ports(2)
    ports = [base, base + 1]
    stubs = [subprocess.Popen([sys.executable, STUB, str(p)], stdout=subprocess.DEVNULL) for p in ports]
    try:
        c = corral(
            ["--upstream", f"127.0.0.1:{ports[0]}-{ports[1]}", "--health-interval", "60"], workers=None, ready=False
        )
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
