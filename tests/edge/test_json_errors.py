"""Issue 14: the answers corral gives itself (502, 503, 504) have JSON bodies.

Real corral processes over real sockets; every wait is a bounded poll, nothing asserts on timing.
"""

from __future__ import annotations

import socket

from conftest import get, poll, read_response, stub_args


def test_corrals_own_502_503_504_bodies_are_json(corral):
    c = corral(stub_args("--request-timeout", "1", "--max-queue", "0"), workers=1)
    r = get(c.port, "/crash")
    assert r.status == 502 and r.header("content-type") == "application/json"
    assert r.json() == {"error": "the worker failed while handling this request", "status": 502}
    c.wait_for(r" ready: pid ", count=2)
    with socket.create_connection(("127.0.0.1", c.port), timeout=30) as held:
        held.sendall(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
        poll("the worker to be busy", lambda: get(c.port, "/x").status == 503)
        full = get(c.port, "/x")
        assert full.status == 503 and full.json()["status"] == 503 and full.header("retry-after")
        late = read_response(held)
    assert late.status == 504 and late.json() == {"error": "the worker did not answer in time", "status": 504}
