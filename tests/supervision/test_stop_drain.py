"""What a graceful stop (SIGTERM) waits for: every exchange not yet ended (found by a red-team review).

docs/operations.md: "stop accepting, let queued and in-flight requests finish (up to --graceful-timeout)". The
drain (server.shutdown) waits for `Proxy.busy()`: exchanges in a pool's `inflight` (holding a worker slot) or
queue, and open sessions. Two kinds of request in flight are in neither, so the stop says "nothing in flight",
stops at once and cuts them, with graceful_timeout 60 s to spare, and they are never logged (the summary says
cut 0):
* an upload whose body is still arriving (request_buffering, the default): not submitted until it is whole;
* a download whose worker has answered whole: its slot is free, the rest waits in corral's buffers (transport
  buffer, spill file) for the client.
Not from the last commits: 93284ab's polling loop waited on the same condition and cut both the same way.
"""

from __future__ import annotations

import contextlib
import signal
import socket

from conftest import read_response, stub_args


def test_an_upload_under_way_at_sigterm_is_let_finish(corral):
    c = corral(stub_args("--graceful-timeout", "60"), workers=1)
    body = b"x" * 20_000
    with socket.create_connection(("127.0.0.1", c.port), timeout=30) as s:
        # Expect: 100-continue: corral (request_buffering) answers 100 once the request is an exchange.
        s.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        got = b""
        while b"\r\n\r\n" not in got:
            got += s.recv(4096)
        assert got.startswith(b"HTTP/1.1 100 "), got
        s.sendall(body[:10_000])
        c.proc.send_signal(signal.SIGTERM)
        c.wait_for(r"corral: stopping: ")  # "nothing in flight": the upload is not counted
        try:
            s.sendall(body[10_000:])
            r = read_response(s)
        except OSError as exc:
            raise AssertionError(f"the upload was cut by the stop ({exc!r}):\n{c.log()[-2000:]}") from None
        assert r.status == 200 and r.json()["len"] == len(body)


def test_a_download_under_way_at_sigterm_is_delivered_whole(corral):
    # The worker's whole answer is in corral's hands (client buffer + spill file), so its slot is free and
    # busy() is False; the client has most of it still to read. The stop says "nothing in flight", exits in a
    # moment, and the rest (spill file, transport buffer) is lost; the summary counts nothing as cut.
    c = corral(stub_args("--graceful-timeout", "60"), workers=1)
    n = 50_000_000
    with socket.create_connection(("127.0.0.1", c.port), timeout=30) as s:
        s.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % n)
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            buf += s.recv(65536)
        # The client reads nothing more for a while: corral holds the rest for it (its transport buffer, then a
        # spill file), as for any slow reader. The wait ends early once corral says it stopped (a corral that
        # waits for this delivery never does, and the client then reads it all).
        c.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(AssertionError):
            c.wait_for(r"corral: stopped", timeout=10)
        r = read_response(s, buf, head_only=True)
        assert r.status == 200 and r.header("content-length") == str(n)
        got = len(buf)
        while got < n:
            data = s.recv(1 << 20)
            if not data:
                break
            got += len(data)
        assert got == n, f"the download was cut by the stop at {got} of {n} bytes:\n{c.log()[-1500:]}"
