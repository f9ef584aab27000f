"""Every way an exchange can end, driven over real sockets: each test is a reproduction from issue 11.

No request lost, no response crossed: a worker's surplus bytes never reach another client, a client that
leaves or stops reading never holds a worker, and every exchange is logged and counted exactly once.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from pathlib import Path

from conftest import SUPPORT, closed_by_peer, get, poll, read_response, request, stub_args

EVIL = str(SUPPORT / "evil_worker.py")


def evil_args(*extra: str) -> list[str]:
    return [*extra, "--", sys.executable, EVIL, "{port}"]


def send(port: int, raw: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(raw)
    return s


def _get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


def lines_seen(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


# --- defect 1: HEAD, 204 and 304 must not break the request queued behind them ---------------------
def test_head_answer_does_not_break_the_next_queued_request(corral, tmp_path):
    log = tmp_path / "seen.log"
    c = corral(stub_args(), workers=1, env={"STUB_LOG": str(log)})
    slow = send(c.port, _get("/sleep?s=1"))
    time.sleep(0.1)
    head = send(c.port, _get("/whoami", "HEAD"))
    time.sleep(0.1)
    third = send(c.port, _get("/after-head"))
    assert read_response(slow).status == 200
    r = read_response(head, head_only=True)
    assert r.status == 200
    r3 = read_response(third)
    assert r3.status == 200, r3.body
    assert r3.json()["path"] == "/after-head"
    assert sum("/after-head" in line for line in lines_seen(log)) == 1  # reached the worker once
    for s in (slow, head, third):
        s.close()


def test_bodyless_status_with_body_bytes_never_reaches_the_next_client(corral):
    c = corral(evil_args(), workers=1)
    for path, status in (("/204-body", 204), ("/304-body", 304)):
        first = send(c.port, _get(path))
        second = send(c.port, _get("/plain"))
        assert read_response(first).status == status
        r = read_response(second)
        assert r.status == 200 and r.body == b"ok:/plain", r.body
        first.close()
        second.close()
    assert "upstream sent more data than specified" in c.log()


# --- defect 2: surplus bytes are detected, the connection dropped, never read as a response -------
def test_surplus_bytes_never_reach_another_client(corral):
    c = corral(evil_args(), workers=1)
    for _ in range(5):
        a = send(c.port, _get("/surplus"))
        b = send(c.port, _get("/plain"))
        ra, rb = read_response(a), read_response(b)
        assert ra.status == 200 and ra.body == b"hello"
        assert rb.status == 200 and rb.body == b"ok:/plain", rb.body
        assert rb.header("x-forged") is None
        a.close()
        b.close()
    assert "upstream sent more data than specified" in c.log()


def test_surplus_arriving_on_an_idle_connection_drops_it(corral):
    c = corral(evil_args(), workers=1)
    assert get(c.port, "/late-surplus").body == b"hello"
    c.wait_for("upstream sent more data than specified")
    assert get(c.port, "/plain").body == b"ok:/plain"


# --- defect 3: a client that aborts a download must not lock its worker --------------------------
def test_aborted_downloads_free_their_workers(corral):
    c = corral(stub_args("--queue-timeout", "5"), workers=2)
    socks = [send(c.port, _get("/big?n=20000000")) for _ in range(2)]
    for s in socks:
        got = 0
        while got < 128 * 1024:
            got += len(s.recv(65536))
        s.close()
    # Both workers must take requests again: two at once, each on a free worker.
    results: list[int] = []

    def one() -> None:
        results.append(get(c.port, "/sleep?s=0.3").status)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200, 200]


def test_client_leaving_mid_response_is_logged_once(corral, tmp_path):
    access = tmp_path / "access.log"
    c = corral(stub_args("--access-log", str(access)), workers=1)
    s = send(c.port, _get("/big?n=20000000"))
    s.recv(65536)
    s.close()
    assert get(c.port, "/next").status == 200
    poll("the access log line of /next", lambda: "/next" in access.read_text())
    lines = access.read_text().splitlines()
    big = [line for line in lines if "/big" in line]
    assert len(big) == 1, lines


# --- defect 4: slow readers never hold a worker; the response is buffered -----------------------
def test_slow_readers_do_not_hold_workers(corral):
    c = corral(stub_args("--queue-timeout", "10"), workers=2)
    readers = [send(c.port, _get("/big?n=200000")) for _ in range(50)]
    try:
        # The 50 responses sit in corral's buffers: the workers are free for everyone else.
        for _ in range(4):
            assert get(c.port, "/fast").status == 200
        # And each slow reader still gets its whole response.
        for s in readers[:3]:
            r = read_response(s)
            assert r.status == 200 and r.body == b"z" * 200000
    finally:
        for s in readers:
            s.close()


def test_response_larger_than_memory_buffer_spills_to_a_file_and_arrives_whole(corral):
    c = corral(stub_args("--response-buffer", "65536", "--queue-timeout", "10"), workers=1)
    n = 8_000_000
    slow = send(c.port, _get(f"/big?n={n}"))
    # Not reading: the worker is freed once the response is all in corral (memory, then a temp file).
    assert get(c.port, "/fast").status == 200
    r = read_response(slow)
    assert r.status == 200 and len(r.body) == n and hashlib.sha256(r.body).digest() == hashlib.sha256(b"z" * n).digest()
    slow.close()


def test_client_that_stops_reading_is_cut_after_send_timeout(corral):
    c = corral(
        stub_args(
            "--response-buffer", "65536", "--response-buffer-file", "0", "--send-timeout", "1", "--queue-timeout", "20"
        ),
        workers=1,
    )
    stalled = send(c.port, _get("/big?n=50000000"))
    # Back-pressure reaches the worker (no file room); only the send timeout can free it for /after.
    assert get(c.port, "/after").status == 200
    got = 0
    stalled.settimeout(10)
    try:
        while data := stalled.recv(1 << 20):
            got += len(data)
    except ConnectionResetError:
        pass
    stalled.close()
    assert got < 50_000_000  # cut short: the stalled client never gets the whole response


# --- cut responses are logged and counted exactly once -------------------------------------------
def test_worker_dying_mid_body_is_logged_and_counted(corral, tmp_path):
    access = tmp_path / "access.log"
    c = corral(evil_args("--access-log", str(access)), workers=1)
    s = send(c.port, _get("/die-mid"))
    r = read_response(s, head_only=True)
    assert r.status == 200
    assert closed_by_peer(s)
    s.close()
    c.wait_for(r"worker \S+:0 ready", count=2)
    assert get(c.port, "/plain").status == 200
    poll("the access log line of /plain", lambda: "/plain" in access.read_text())
    cut = [line for line in access.read_text().splitlines() if "/die-mid" in line]
    assert len(cut) == 1 and " 502 " in cut[0], cut


# --- 15-18: the edges of the grammar -------------------------------------------------------------
def test_http10_keepalive_is_announced_and_kept(corral):
    c = corral(stub_args(), workers=1)
    with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
        for path in ("/one", "/two"):
            s.sendall(f"GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
            r = read_response(s)
            assert r.status == 200 and r.json()["path"] == path
            assert (r.header("connection") or "").lower() == "keep-alive"


def test_http10_without_keepalive_is_closed(corral):
    c = corral(stub_args(), workers=1)
    with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
        s.sendall(b"GET /one HTTP/1.0\r\n\r\n")
        r = read_response(s)
        assert r.status == 200
        assert closed_by_peer(s)


def test_connection_header_cannot_strip_host_or_forwarding_headers(corral):
    c = corral(stub_args(), workers=1)
    r = request(
        c.port,
        b"GET /h HTTP/1.1\r\nHost: example.test\r\nConnection: Host, X-Forwarded-For, Via, X-Keep\r\n"
        b"X-Keep: gone\r\n\r\n",
    )
    seen = r.json()["headers"]
    assert seen["host"] == "example.test"
    assert "x-forwarded-for" in seen and "via" in seen
    assert "x-keep" not in seen  # a header the client really named as hop-by-hop is still stripped


def test_no_100_continue_to_an_http10_client(corral):
    c = corral(stub_args(), workers=1)
    with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
        s.sendall(b"POST /p HTTP/1.0\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        time.sleep(0.3)
        s.sendall(b"abcd")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert b"100 Continue" not in data
    assert data.startswith(b"HTTP/1.1 200")


def test_http09_line_is_refused_at_once(corral):
    c = corral(stub_args("--header-timeout", "60"), workers=1)
    with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
        s.sendall(b"GET /v\r\n")
        r = read_response(s)  # within the socket timeout, far below the 60 s header timeout
    assert r.status == 400


def test_http12_is_served_as_http11(corral):
    c = corral(stub_args(), workers=1)
    r = request(c.port, b"GET /v12 HTTP/1.2\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert r.status == 200 and r.json()["path"] == "/v12"


# --- defect 8: running out of file descriptors must not kill healthy workers ----------------------
def _limit_fds(n: int):
    import resource

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return apply


def _fd_limits(spare: int) -> int:
    """The descriptor limit to give corral: 200, or less where this machine's hard limit is low, so that
    this process (whose soft limit is raised as far as allowed) can always hold `spare` more than corral."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/self/fd"))
    want = used + 200 + spare
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return min(200, want - used - spare)


def test_fd_exhaustion_answers_503_and_never_counts_against_workers(tmp_path):
    import subprocess

    from conftest import free_ports

    port = free_ports(10)
    out = tmp_path / "corral.log"
    argv = [
        sys.executable,
        "-m",
        "corral",
        "run",
        "-p",
        str(port),
        "-w",
        "2",
        "--max-connections",
        "2000",
        # The idle connections below must hold corral's descriptors until the test closes them: cut at the
        # default header_timeout (10 s) on a loaded machine, they freed them before a probe found none left.
        "--header-timeout",
        "60",
        "--health-path",
        "/health",
        "--health-interval",
        "0.2",
        "--health-fails",
        "1",
        "--",
        sys.executable,
        str(SUPPORT / "stub_worker.py"),
        "{port}",
    ]
    limit = _fd_limits(spare=100)  # this client must be able to hold more sockets than corral may
    with open(out, "wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=_limit_fds(limit))
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 60
        while "all workers ready" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        for _ in range(limit + 100):  # far past what corral's descriptors can hold
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        assert len(idle) > limit, f"the client itself could open only {len(idle)} connections"
        deadline = time.monotonic() + 30
        while "out of file descriptors" not in out.read_text():  # corral accepts them at its own pace
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(1.0)  # several health intervals while corral has no descriptor to spare
        for s in idle:
            s.close()
        idle.clear()
        deadline = time.monotonic() + 20
        while True:  # descriptors come back as corral notices the closes
            try:
                r = get(port, "/after", timeout=5)
                if r.status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, out.read_text()[-3000:]
            time.sleep(0.2)
        log = out.read_text()
        assert "unhealthy" not in log and "SIGKILL" not in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        proc.wait(30)
