"""The same data path on both event loops corral runs on (`--loop uvloop`, `--loop asyncio`): where asyncio's
selector transports call the protocol back in another order than uvloop's, corral must not trip them.

The client's view first (status, every byte, the close), then corral's output: no error from the loop.
"""

from __future__ import annotations

import socket

import pytest
from conftest import get, read_response, stub_args

MiB = 1024 * 1024


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_an_answer_that_closes_once_its_slow_client_has_it_all_closes_once(corral, loop):
    # The response is whole in corral while most of it still waits in the client transport's buffer, so the
    # exchange ends (Connection: close) from resume_writing, when that buffer empties: inside asyncio's write
    # callback, which then calls connection_lost itself (CPython gh-156512).
    c = corral(stub_args("--loop", loop, "--response-buffer", str(16 * MiB)), workers=1)
    n = 8 * MiB  # more than the client's small receive buffer and corral's send buffer hold
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(60)
        s.connect(("127.0.0.1", c.port))
        s.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % n)
        # The only worker answers another request once corral holds the whole response and has let it go.
        assert get(c.port, "/whoami", timeout=30).status == 200
        resp = read_response(s)
        assert s.recv(1) == b""  # closed after the last byte
    assert resp.status == 200 and len(resp.body) == n and resp.body == b"z" * n
    assert get(c.port, "/whoami", timeout=30).status == 200  # corral still serves, and has logged what it would
    assert "Traceback" not in c.log() and "Exception in callback" not in c.log(), c.log()[-3000:]
