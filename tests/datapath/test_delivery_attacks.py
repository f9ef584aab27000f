"""Attacks on the data path over real sockets, found by a red-team review of the issue-19 rewrite.

Each failed on 91e9b81.

Client's view first (status, every byte), then corral's own account (access log) and the worker's.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

from conftest import poll, read_response, stub_args

from corral.cli.verbs import AdminClient, locate

# Seeing a client leave while its socket is not read takes TCP_INFO: Linux's path, pinned in both passes of
# scripts/test (the portable one has none: docs/operations.md, macOS).
TCP_INFO = {"CORRAL_PORTABLE": None}

WS_HEAD = (
    b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def access_log(path: Path, n: int) -> list[dict]:
    def lines() -> list[dict] | None:
        got = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return got if len(got) >= n else None

    return poll(f"{n} access-log lines", lines)


def test_declined_upgrade_does_not_smuggle_early_bytes_into_the_next_clients_answer(corral, tmp_path):
    """A WebSocket upgrade the worker declines (a plain 200, kept alive): the bytes the client sent behind
    its upgrade request went to the worker as 'tunnel data', and the worker read them as a second request.
    corral keeps that worker connection for the next client, whose request then gets the smuggled
    request's answer (with the smuggler's X-Forwarded-For, which corral strips from every real request)."""
    log = tmp_path / "access.log"
    seen = tmp_path / "stub.log"
    c = corral(stub_args("--access-log", str(log), "--log-format", "json"), workers=1, env={"STUB_LOG": str(seen)})
    smuggled = b"GET /sleep?s=2&smuggled=1 HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    with socket.create_connection(("127.0.0.1", c.port), timeout=30) as a:
        a.sendall(WS_HEAD + smuggled)
        ra = read_response(a)
        assert ra.status == 200 and ra.json()["path"] == "/ws"  # declined: the worker's plain answer
    with socket.create_connection(("127.0.0.1", c.port), timeout=30) as b:
        b.sendall(b"GET /mine HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        rb = read_response(b)
    assert rb.status == 200
    body = rb.json()
    # The client gets the answer to its own request, never another client's.
    assert body["path"] == "/mine", f"client B got the answer to A's smuggled request: {body['path']}"
    assert body["headers"]["x-forwarded-for"] == "127.0.0.1"
    records = access_log(log, 2)
    assert [r["path"] for r in records] == ["/ws", "/mine"]
    # ...and the worker never saw a request corral did not log.
    assert "smuggled" not in seen.read_text()


def queue_depth(port: int) -> int:
    _, doc = AdminClient(locate(port, None)).call("GET", "/status")
    return doc["apps"][0]["queue"]["depth"]


def reset(sock: socket.socket) -> None:
    """Leave with a reset (SO_LINGER 0): the client is gone, nothing more can reach it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_queued_request_of_a_client_that_left_while_pipelining_is_never_dispatched(corral, tmp_path):
    """A client pipelines two requests while the only worker is busy, then leaves (RST). corral stopped
    reading its socket (PAUSE_PIPELINE) and so never sees it go: the queued request is dispatched to the
    worker anyway, computed, and logged `served` 200 with every byte, though its client had gone."""
    log = tmp_path / "access.log"
    seen = tmp_path / "stub.log"
    c = corral(
        stub_args("--access-log", str(log), "--log-format", "json"), workers=1, env={"STUB_LOG": str(seen), **TCP_INFO}
    )
    with socket.create_connection(("127.0.0.1", c.port), timeout=30) as x:
        x.sendall(b"GET /sleep?s=3&who=x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        poll("x on the worker", lambda: seen.exists() and "who=x" in seen.read_text())
        y = socket.create_connection(("127.0.0.1", c.port), timeout=30)
        y.sendall(b"GET /sleep?s=0.5&who=y1 HTTP/1.1\r\nHost: t\r\n\r\nGET /?who=y2 HTTP/1.1\r\nHost: t\r\n\r\n")
        poll("y1 queued", lambda: queue_depth(c.port) == 1)
        reset(y)
        assert read_response(x).status == 200
    with socket.create_connection(("127.0.0.1", c.port), timeout=30) as z:
        z.sendall(b"GET /?who=z HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert read_response(z).status == 200
    records = {r["path"].split("who=")[1]: r for r in access_log(log, 4)}
    # The client that left gets nothing, and its queued request never reached a worker...
    assert "who=y1" not in seen.read_text(), "a queued request whose client left was dispatched"
    # ...and it is not logged as served whole to a client that was gone.
    assert records["y1"]["outcome"] == "abandoned", records["y1"]


def test_response_to_a_client_that_left_while_pipelining_is_not_logged_as_served(corral, tmp_path):
    """The same blind spot for the exchange in flight: a client sends a slow request and a pipelined one
    behind it, and resets its connection while the worker computes. corral is not reading that socket
    (a pipelined request waits), writes the answer into a dead socket, and logs it `served` 200 whole."""
    log = tmp_path / "access.log"
    seen = tmp_path / "stub.log"
    c = corral(
        stub_args("--access-log", str(log), "--log-format", "json"), workers=1, env={"STUB_LOG": str(seen), **TCP_INFO}
    )
    y = socket.create_connection(("127.0.0.1", c.port), timeout=30)
    y.sendall(b"GET /sleep?s=1.5&who=y1 HTTP/1.1\r\nHost: t\r\n\r\nGET /?who=y2 HTTP/1.1\r\nHost: t\r\n\r\n")
    poll("y1 on the worker", lambda: seen.exists() and "who=y1" in seen.read_text())
    reset(y)  # the client got not one byte of an answer
    records = {r["path"].split("who=")[1]: r for r in access_log(log, 2)}
    assert records["y1"]["outcome"] == "abandoned", records["y1"]
    assert records["y1"]["bytes"] == 0
