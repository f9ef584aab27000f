"""Red team: HEAD on the admin channel. edge.answer (f8187b9) knows HEAD (`head_only`), and the health listener
uses it, but the admin channel's `response()` (src/corral/ops/admin.py) never passes it: a HEAD request gets its
405 *with* a body (RFC 9110 9.3.2: a HEAD answer has none), which on a kept-alive connection is read as the start
of the next response. The same bytes went out before f8187b9: the defect predates it; the builder now has the
flag the channel does not use.
"""

from __future__ import annotations

import re
import socket

from conftest import read_response, stub_args


def _admin_socket(c) -> socket.socket:
    path = re.search(r"admin on unix:(\S+)", c.log()).group(1)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    return s


def test_a_head_answer_on_the_admin_channel_carries_no_body(corral):
    c = corral(stub_args(), workers=1)
    with _admin_socket(c) as s:
        buf = bytearray()
        s.sendall(b"HEAD /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = read_response(s, buf, head_only=True)
        assert head.header("connection") != "close"  # kept alive: the next request goes on this connection
        s.sendall(b"GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n")
        while b"\r\n\r\n" not in buf:
            buf += s.recv(65536)
        # What follows the HEAD answer's head must be the next response, not the HEAD answer's body.
        assert bytes(buf).startswith(b"HTTP/1.1 200 "), f"bytes after a HEAD answer's head: {bytes(buf)[:80]!r}"
