"""Attacks on the public port over raw sockets, against a real corral in front of the stub worker.

Every refusal is checked twice: the status the client gets, and that the worker never received the
request. The stub appends each request line it reads to $STUB_LOG; one worker serving one connection
at a time means that once a later sentinel request is in the log, anything forwarded before it is too.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
import uuid
from pathlib import Path

import pytest
from conftest import CorralProc, Response, closed_by_peer, get, read_response, stub_args

LIMITS = [
    "--max-header-bytes", "4096",
    "--max-headers", "30",
    "--max-body", "10000",
    "--header-timeout", "1",
    "--body-timeout", "1",
    "--keepalive-timeout", "1.5",
    "--trusted-proxies", "127.0.0.2/32",
]  # fmt: skip


@pytest.fixture(scope="module")
def edge(tmp_path_factory) -> CorralProc:
    tmp = tmp_path_factory.mktemp("edge")
    log = tmp / "stub.log"
    c = CorralProc(tmp, stub_args(*LIMITS), workers=1, env={"STUB_LOG": str(log)})
    c.stub_log = log  # type: ignore[attr-defined]
    yield c
    c.stop()


def marker(name: str) -> bytes:
    return f"/atk-{name}-{uuid.uuid4().hex[:8]}".encode()


def stub_seen(c: CorralProc) -> str:
    log: Path = c.stub_log  # type: ignore[attr-defined]
    return log.read_text() if log.exists() else ""


def assert_never_forwarded(c: CorralProc, mark: bytes) -> None:
    sentinel = f"/sentinel-{uuid.uuid4().hex[:8]}"
    r = get(c.port, sentinel, timeout=10)
    assert r.status == 200  # also proves the single worker is free, not stuck on a half-forwarded request
    seen = stub_seen(c)
    assert sentinel in seen
    assert mark.decode() not in seen


def send(port: int, raw: bytes, src: str = "127.0.0.1", timeout: float = 10) -> tuple[Response | None, bool]:
    """Send raw bytes; the one response (None if the connection ended without one) and whether corral closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(src, 0)) as s:
        with contextlib.suppress(OSError):  # refused mid-send: the answer may still be readable
            s.sendall(raw)
        try:
            resp = read_response(s)
        except (ConnectionError, OSError):
            return None, True
        return resp, closed_by_peer(s, timeout)


def wait_until(cond, timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


LEAKS = re.compile(rb"traceback|python|httptools|llhttp|corral|\.py|/usr|/home|/work|/tmp|exception", re.I)


def assert_plain_error(resp: Response, status: int) -> None:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.header("connection") == "close"
    assert resp.header("server") is None
    assert (resp.header("content-type") or "").startswith("text/plain")
    assert len(resp.body) < 100 and resp.body.startswith(b"%d " % status)
    assert not LEAKS.search(resp.raw_head + resp.body), resp.body


# --- one test per rule: the template's {P} is replaced by a path unique to the run --------------------
HOST = b"Host: t\r\n"
TE = b"Transfer-Encoding: chunked\r\n"
RULES = {
    "cl-with-te": (b"POST {P} HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n" + TE + b"\r\n0\r\n\r\n", 400),
    "te-with-cl": (b"POST {P} HTTP/1.1\r\n" + HOST + TE + b"Content-Length: 5\r\n\r\n0\r\n\r\n", 400),
    "cl-differing": (b"POST {P} HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    "cl-list": (b"POST {P} HTTP/1.1\r\n" + HOST + b"Content-Length: 3, 4\r\n\r\nabcd", 400),
    "cl-not-decimal": (b"POST {P} HTTP/1.1\r\n" + HOST + b"Content-Length: 0x3\r\n\r\nabc", 400),
    "cl-signed": (b"POST {P} HTTP/1.1\r\n" + HOST + b"Content-Length: +3\r\n\r\nabc", 400),
    "te-final-not-chunked": (b"POST {P} HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip\r\n\r\nabc", 400),
    "te-chunked-then-gzip": (b"POST {P} HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
    "te-unknown": (b"POST {P} HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: rot13, chunked\r\n\r\n0\r\n\r\n", 501),
    "te-gzip-chunked": (b"POST {P} HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    "chunk-size-not-hex": (b"POST {P} HTTP/1.1\r\n" + HOST + TE + b"\r\nxyz\r\nabc\r\n0\r\n\r\n", 400),
    "chunk-size-negative": (b"POST {P} HTTP/1.1\r\n" + HOST + TE + b"\r\n-3\r\nabc\r\n0\r\n\r\n", 400),
    "chunk-data-overrun": (b"POST {P} HTTP/1.1\r\n" + HOST + TE + b"\r\n3\r\nabcdef\r\n0\r\n\r\n", 400),
    "chunk-ext-too-long": (
        b"POST {P} HTTP/1.1\r\n" + HOST + TE + b"\r\n3;x=" + b"e" * 5000 + b"\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "ws-before-colon": (b"GET {P} HTTP/1.1\r\n" + HOST + b"X-A : 1\r\n\r\n", 400),
    "obs-fold": (b"GET {P} HTTP/1.1\r\n" + HOST + b"X-A: 1\r\n  folded\r\n\r\n", 400),
    "bare-cr": (b"GET {P} HTTP/1.1\r\n" + HOST + b"X-A: 1\r2\r\n\r\n", 400),
    "bare-lf": (b"GET {P} HTTP/1.1\r\n" + HOST + b"X-A: 1\n\r\n", 400),
    "nul-in-field": (b"GET {P} HTTP/1.1\r\n" + HOST + b"X-A: 1\x002\r\n\r\n", 400),
    "ctl-in-field": (b"GET {P} HTTP/1.1\r\n" + HOST + b"X-A: 1\x1b[2J\r\n\r\n", 400),
    "line-double-space": (b"GET  {P} HTTP/1.1\r\n" + HOST + b"\r\n", 400),
    "line-http09": (b"GET {P}\r\n\r\n", 400),
    "line-no-version": (b"GET {P} \r\n" + HOST + b"\r\n", 400),
    "line-bad-version": (b"GET {P} HTTP/1.x\r\n" + HOST + b"\r\n", 400),
    "line-tab": (b"GET\t{P} HTTP/1.1\r\n" + HOST + b"\r\n", 400),
    "line-http2": (b"GET {P} HTTP/2.0\r\n" + HOST + b"\r\n", 505),
    "connect": (b"CONNECT {P} HTTP/1.1\r\n" + HOST + b"\r\n", 501),
    "connect-authority": (b"CONNECT internal:22 HTTP/1.1\r\nHost: internal:22\r\nX-M: {P}\r\n\r\n", 501),
    "no-host": (b"GET {P} HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (b"GET {P} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "expect-unknown": (b"GET {P} HTTP/1.1\r\n" + HOST + b"Expect: 102-processing\r\n\r\n", 417),
    "too-many-headers": (b"GET {P} HTTP/1.1\r\n" + HOST + b"X-N: 1\r\n" * 30 + b"\r\n", 431),
    "header-too-large": (b"GET {P} HTTP/1.1\r\n" + HOST + b"X-Big: " + b"b" * 5000 + b"\r\n\r\n", 431),
    "line-too-long": (b"GET {P}?" + b"q" * 5000 + b" HTTP/1.1\r\n" + HOST + b"\r\n", 414),
    "body-too-large": (b"POST {P} HTTP/1.1\r\n" + HOST + b"Content-Length: 10001\r\n\r\n" + b"x" * 10001, 413),
    "chunk-too-large": (b"POST {P} HTTP/1.1\r\n" + HOST + TE + b"\r\n2711\r\n" + b"x" * 10001 + b"\r\n0\r\n\r\n", 413),
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_refused_and_never_forwarded(edge, name):
    template, status = RULES[name]
    mark = marker(name)
    resp, closed = send(edge.port, template.replace(b"{P}", mark))
    assert resp is not None, "no answer"
    assert_plain_error(resp, status)
    assert closed
    assert_never_forwarded(edge, mark)


def test_h2_preface_is_refused(edge):
    resp, closed = send(edge.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert resp is not None and closed
    assert_plain_error(resp, 505)
    assert_never_forwarded(edge, b"PRI ")


def test_request_after_a_good_one_on_the_same_read_is_refused_after_the_good_answer(edge):
    good, bad = marker("good"), marker("bad")
    raw = b"GET %s HTTP/1.1\r\nHost: t\r\n\r\nGET  %s HTTP/1.1\r\nHost: t\r\n\r\n" % (good, bad)
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        s.sendall(raw)
        first = read_response(s)
        assert first.status == 200 and first.json()["path"] == good.decode()
        assert closed_by_peer(s)
    assert_never_forwarded(edge, bad)


# --- timeouts ----------------------------------------------------------------------------------------
def test_header_timeout_answers_408_even_when_bytes_keep_trickling(edge):
    # Slowloris: one header line at a time keeps the socket busy; the head deadline must not move.
    mark = marker("slowloris")
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n" % mark)
        s.settimeout(0.3)
        data = b""
        for i in range(20):  # 6 s of trickle; the head timeout is 1 s
            try:
                s.sendall(b"X-Trickle-%d: 1\r\n" % i)
                data = s.recv(65536)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        else:
            s.sendall(b"\r\n")  # finish the head: without a head timeout this would now be served
        s.settimeout(10)
        buf = bytearray(data)
        resp = read_response(s, buf)
        assert_plain_error(resp, 408)
        assert closed_by_peer(s)
    assert_never_forwarded(edge, mark)


def test_body_timeout_answers_408_and_the_worker_never_sees_the_request(edge):
    mark = marker("slowbody")
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n" % mark + b"x" * 100)
        resp = read_response(s)
        assert_plain_error(resp, 408)
        assert closed_by_peer(s)
    assert_never_forwarded(edge, mark)  # request_buffering: a body that never came never reached a worker


def test_chunked_body_over_max_body_is_413_and_never_forwarded(edge):
    mark = marker("bigstream")
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1f40\r\n" % mark + b"a" * 8000)
        s.sendall(b"\r\n1f40\r\n" + b"b" * 8000 + b"\r\n0\r\n\r\n")
        resp = read_response(s)
        assert_plain_error(resp, 413)
        assert closed_by_peer(s)
    assert_never_forwarded(edge, mark)


@pytest.fixture(scope="module")
def streaming_edge(tmp_path_factory) -> CorralProc:
    tmp = tmp_path_factory.mktemp("streaming-edge")
    log = tmp / "stub.log"
    c = CorralProc(tmp, stub_args(*LIMITS, "--no-request-buffering"), workers=1, env={"STUB_LOG": str(log)})
    c.stub_log = log  # type: ignore[attr-defined]
    yield c
    c.stop()


def test_streamed_body_timeout_answers_408_and_aborts_the_workers_request(streaming_edge):
    edge = streaming_edge
    mark = marker("slowbody")
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n" % mark + b"x" * 100)
        wait_until(lambda: mark.decode() in stub_seen(edge), what="the worker to get the head")
        resp = read_response(s)
        assert_plain_error(resp, 408)
        assert closed_by_peer(s)
    # The single-threaded stub would still be waiting for 4900 bytes if corral had not dropped that request.
    assert get(edge.port, "/after-slowbody", timeout=10).status == 200


def test_streamed_chunked_body_over_max_body_is_413_and_the_worker_request_aborted(streaming_edge):
    edge = streaming_edge
    mark = marker("bigstream")
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1f40\r\n" % mark + b"a" * 8000)
        wait_until(lambda: mark.decode() in stub_seen(edge), what="the worker to get the head")
        s.sendall(b"\r\n1f40\r\n" + b"b" * 8000 + b"\r\n0\r\n\r\n")
        resp = read_response(s)
        assert_plain_error(resp, 413)
        assert closed_by_peer(s)
    assert get(edge.port, "/after-bigstream", timeout=10).status == 200


def test_idle_keepalive_connection_is_closed_silently(edge):
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        s.sendall(b"GET /ka HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s).status == 200
        s.settimeout(10)
        assert s.recv(65536) == b""  # closed, no 408 for a connection between requests
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        s.settimeout(10)
        assert s.recv(65536) == b""  # connected, never sent anything


def test_keepalive_connection_in_use_is_not_cut(edge):
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        for i in range(4):  # each request starts well inside the idle timeout of the one before
            s.sendall(b"GET /busy-%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
            assert read_response(s).status == 200
            time.sleep(0.5)  # pacing, under the 1.5 s idle timeout: no synchronisation involved


# --- Expect, forwarding --------------------------------------------------------------------------------
def test_expect_100_continue_is_answered_by_corral_and_not_forwarded(edge):
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += s.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
        rest = bytearray(interim.split(b"\r\n\r\n", 1)[1])
        s.sendall(b"hello")
        resp = read_response(s, rest)
        assert resp.status == 200 and resp.json()["len"] == 5
        s.sendall(b"GET /expect-echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n")
        echoed = read_response(s).json()["headers"]
    assert "expect" not in echoed


HOPS = (
    b"GET /hops HTTP/1.1\r\nHost: app.example\r\nConnection: keep-alive, X-Private\r\nX-Private: secret\r\n"
    b"Keep-Alive: timeout=99\r\nTE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\nProxy-Authorization: Basic Zm9v\r\n"
    b"Proxy-Connection: keep-alive\r\nX-Kept: yes\r\n\r\n"
)


def test_hop_by_hop_and_connection_named_headers_never_reach_the_worker(edge):
    resp, _ = send(edge.port, HOPS)
    assert resp is not None and resp.status == 200
    seen = resp.json()["headers"]
    for name in (
        "connection",
        "x-private",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    ):
        assert name not in seen or (name == "connection" and seen[name].lower() in ("close", "keep-alive")), name
    assert seen["x-kept"] == "yes" and seen["host"] == "app.example"
    assert seen["via"] == "1.1 corral"
    assert seen["x-request-id"] == resp.header("x-request-id") and seen["x-request-id"]


def test_client_request_id_is_kept_and_returned(edge):
    r = get(edge.port, "/rid", headers="X-Request-Id: trace-42\r\n")
    assert r.json()["headers"]["x-request-id"] == "trace-42" and r.header("x-request-id") == "trace-42"


SPOOF = (
    "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n"
    "X-Forwarded-Prefix: /evil\r\nForwarded: for=6.6.6.6;proto=https\r\n"
)


def _spoofed(port: int, src: str) -> dict[str, str]:
    raw = f"GET /fwd HTTP/1.1\r\nHost: app.example\r\n{SPOOF}Connection: close\r\n\r\n".encode()
    resp, _ = send(port, raw, src=src)
    assert resp is not None and resp.status == 200
    return resp.json()["headers"]


def test_untrusted_peer_forwarding_headers_are_replaced(edge):
    seen = _spoofed(edge.port, "127.0.0.1")
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "app.example"
    assert "forwarded" not in seen and "x-forwarded-prefix" not in seen


def test_trusted_proxy_forwarding_headers_are_kept_and_appended_to(edge):
    seen = _spoofed(edge.port, "127.0.0.2")
    assert seen["x-forwarded-for"] == "6.6.6.6, 127.0.0.2"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == "evil.example"
    assert seen["x-forwarded-prefix"] == "/evil"
    assert seen["forwarded"] == "for=6.6.6.6;proto=https, for=127.0.0.2;proto=http"


def test_chunked_request_is_reframed_toward_the_worker(edge):
    body = b"3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Trailer: dropped\r\n\r\n"
    raw = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body
    resp, _ = send(edge.port, raw)
    assert resp is not None and resp.status == 200 and resp.json()["len"] == 7


# --- responses ---------------------------------------------------------------------------------------
def test_malformed_worker_response_is_502_and_the_worker_stays_usable(edge):
    r = get(edge.port, "/garbage")
    assert r.status == 502 and len(r.body) < 100 and not LEAKS.search(r.body)
    assert get(edge.port, "/after-garbage").status == 200


def test_hop_by_hop_headers_are_stripped_from_responses(edge):
    r = get(edge.port, "/hop")
    assert r.status == 200
    names = {k.lower() for k, _ in r.headers}
    assert "x-secret" not in names and "keep-alive" not in names
    assert r.header("connection") in (None, "close")
    assert r.header("via") == "1.1 corral" and r.header("x-request-id")


def test_close_delimited_response_is_reframed_and_the_client_connection_survives(edge):
    with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as s:
        s.sendall(b"GET /eof HTTP/1.1\r\nHost: t\r\n\r\n")
        r = read_response(s)
        assert r.status == 200 and r.body == b"until-close"
        assert r.header("transfer-encoding") == "chunked" and r.header("connection") is None
        s.sendall(b"GET /after-eof HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s).status == 200


# --- admin isolation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/status", "/metrics", "/series", "/"])
def test_admin_paths_on_the_public_port_reach_the_app(edge, path):
    r = get(edge.port, path)
    assert r.status == 200
    assert r.json()["path"] == path  # the stub's echo, not corral's admin data


def test_admin_actions_on_the_public_port_reach_the_app(edge):
    for path in ("/reload", "/scale?n=5"):
        resp, _ = send(edge.port, f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n".encode())
        assert resp is not None and resp.status == 200 and resp.json()["len"] == 0
    assert "reload" not in edge.log().split("all workers ready", 1)[1].lower()


# --- max connections ------------------------------------------------------------------------------------
def test_max_connections_refuses_new_ones_politely_and_keeps_serving_the_open_ones(corral, tmp_path):
    log = tmp_path / "stub.log"
    c = corral(stub_args("--max-connections", "3"), workers=1, env={"STUB_LOG": str(log)})
    held = []
    for i in range(3):
        s = socket.create_connection(("127.0.0.1", c.port), timeout=10)
        s.sendall(b"GET /held-%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
        assert read_response(s).status == 200
        held.append(s)
    try:
        mark = marker("over-limit")
        resp, closed = send(c.port, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % mark)
        assert resp is not None and closed
        assert_plain_error(resp, 503)
        assert resp.header("retry-after") is not None
        for i, s in enumerate(held):
            s.sendall(b"GET /still-%d HTTP/1.1\r\nHost: t\r\n\r\n" % i)
            assert read_response(s).status == 200
        assert mark.decode() not in log.read_text()
        held.pop().close()

        def served() -> bool:
            r, _ = send(c.port, b"GET /freed HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            return r is not None and r.status == 200

        wait_until(served, what="a slot to free up")
    finally:
        for s in held:
            s.close()


# --- the clocks stop while corral is the one not reading ------------------------------------------------
def test_timeouts_do_not_fire_while_corral_holds_the_client_back(corral, tmp_path):
    log = tmp_path / "stub.log"
    c = corral(stub_args("--header-timeout", "1", "--body-timeout", "1"), workers=1, env={"STUB_LOG": str(log)})
    with socket.create_connection(("127.0.0.1", c.port), timeout=20) as busy:
        busy.sendall(b"GET /sleep?s=2.5 HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_until(lambda: log.exists() and "/sleep" in log.read_text(), what="the only worker to be taken")
        with socket.create_connection(("127.0.0.1", c.port), timeout=20) as s:
            # A prompt client whose big body outgrows the queue buffer: corral pauses reading it.
            body = b"x" * 600_000
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            r = read_response(s)
            assert r.status == 200 and r.json()["len"] == len(body)
        assert read_response(busy).status == 200
    with socket.create_connection(("127.0.0.1", c.port), timeout=20) as s:
        # A pipelined head that is partly sent while corral is still answering the request before it.
        s.sendall(b"GET /sleep?s=2.5 HTTP/1.1\r\nHost: t\r\n\r\nGET /next HTTP/1.1\r\n")
        assert read_response(s).status == 200
        s.sendall(b"Host: t\r\n\r\n")
        r = read_response(s)
        assert r.status == 200 and r.json()["path"] == "/next"
