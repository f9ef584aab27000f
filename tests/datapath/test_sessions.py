"""Issue 20 (1-3): WebSocket sessions through restarts and stops, over real sockets.

The worker is tests/support/ws_echo_worker.py (plain HTTP answers `worker INDEX PID PATH`, WebSocket messages are
echoed; `whoami`, `pid`, `flood N` drive the cases). What is asserted is what the client received; then
corral's own account (its log, `corral status --json`) is checked to agree.

* a worker draining (scale-down, recycling) keeps getting the requests of the sessions it still holds;
* a stop drains open sessions like a reload, then says 1001 Going Away;
* a tunnel's client that takes nothing for send_timeout is cut, and its session place freed.

Shiny in a real browser (session ids learned from the WebSocket, downloads and uploads through a reload,
tabs spreading) is in tests/interop/test_shiny.py."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import time

import pytest
from conftest import corral_cli, get, poll, read_response

websockets = pytest.importorskip("websockets")
from test_websocket import run, ws_args  # noqa: E402  (the echo worker and the runner the tunnel tests use)
from websockets.asyncio.client import connect  # noqa: E402


def _status(port: int) -> dict:
    r = corral_cli("status", "--json", "-p", str(port))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["apps"][0]


def _cookie_of(resp) -> str | None:
    value = resp.header("set-cookie")
    return value.split(";", 1)[0] if value else None


def _who(resp) -> tuple[str, int]:
    """'worker INDEX PID PATH' -> (index, pid)"""
    _, index, pid, _ = resp.body.decode().split()
    return index, int(pid)


class RawClient(socket.socket):
    buffered = b""  # bytes that came with the 101's head


def _handshake(port: int, rcvbuf: int = 0) -> RawClient:
    s = RawClient(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # set before connecting: no autotuning
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16))
    s.sendall(
        b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key
    )
    buf = bytearray()
    assert read_response(s, buf, head_only=True).status == 101
    s.buffered = bytes(buf)
    return s


def _masked(opcode: int, payload: bytes, length: int | None = None) -> bytes:
    """A client frame (masked, RFC 6455 5.3); `length` may announce more payload than is given."""
    n = len(payload) if length is None else length
    head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# --- 1. a draining worker still serves the sessions it holds -------------------------------------------
@pytest.mark.parametrize("retire", ["scale-down", "recycle"])
def test_a_draining_worker_gets_every_request_of_its_open_sessions(corral, retire):
    extra = ("--max-requests", "4") if retire == "recycle" else ()
    c = corral(ws_args("--sticky", "cookie", "--graceful-timeout", "60", *extra), workers=2)

    # A browser whose cookie names worker 1 (clients without a cookie spread, each gets one).
    def cookie_for_worker_1():
        r = get(c.port, "/page")
        return _cookie_of(r) if _who(r)[0] == "1" else None

    cookie = poll("a cookie naming worker 1", cookie_for_worker_1)
    xhr = f"Cookie: {cookie}\r\nAccept: */*\r\n"  # what a page's scripts send: not a page load
    page = f"Cookie: {cookie}\r\nSec-Fetch-Mode: navigate\r\nAccept: text/html\r\n"

    async def go() -> None:
        async with connect(f"ws://127.0.0.1:{c.port}/ws", additional_headers={"Cookie": cookie}) as ws:
            await ws.send("pid")
            home = int(await ws.recv())
            if retire == "scale-down":
                r = await asyncio.to_thread(corral_cli, "scale", "1", "-p", str(c.port))
                assert r.returncode == 0, r.stderr
            else:  # recycling by count: worker 1's own requests use it up; its successor starts first

                def used_up() -> bool:
                    assert get(c.port, "/use", headers=xhr).status == 200
                    return "worker python:1 draining" in c.log()

                await asyncio.to_thread(poll, "worker 1 to be recycled", used_up)
            await asyncio.to_thread(c.wait_for, r"worker \S+:1 draining")
            # The session's requests still reach its process, cookie untouched ...
            for _ in range(3):
                r = await asyncio.to_thread(get, c.port, "/session-request", 30, xhr)
                assert r.status == 200 and _who(r) == ("1", home), r.body
                assert r.header("set-cookie") is None
            await ws.send("still here")
            assert await ws.recv() == "still here"
            # ... while a page load and a new session go to a live worker (and the cookie moves there).
            r = await asyncio.to_thread(get, c.port, "/page", 30, page)
            assert r.status == 200 and _who(r)[1] != home
            moved = _cookie_of(r)
            assert moved is not None and moved != cookie
            async with connect(f"ws://127.0.0.1:{c.port}/ws", additional_headers={"Cookie": cookie}) as new:
                await new.send("pid")
                assert int(await new.recv()) != home
            # corral's account: the draining process served them, and holds the one session.
            app = await asyncio.to_thread(_status, c.port)
            (draining,) = [w for w in app["workers"] if w["pid"] == home]
            assert draining["state"] == "draining" and draining["sessions"] == 1
            assert "drained" not in c.log()
        # The session closed: nothing holds the worker any more, and it stops.
        await asyncio.to_thread(c.wait_for, r"worker \S+:1 stopping: drained")

    run(go())


# --- 2. stop drains sessions, then closes them with 1001 --------------------------------------------
def test_stop_lets_open_sessions_work_until_graceful_timeout_then_closes_them_with_1001(corral):
    c = corral(ws_args("--graceful-timeout", "6"), workers=1)

    async def go() -> None:
        async with connect(f"ws://127.0.0.1:{c.port}/ws") as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            c.proc.send_signal(signal.SIGTERM)
            for n in range(6):  # the session keeps working through the drain
                await ws.send(f"after {n}")
                assert await ws.recv() == f"after {n}"
                if n == 2:  # half of them once corral says what it waits for
                    await asyncio.to_thread(c.wait_for, r"corral: stopping: draining 1 WebSocket session, up to 6 s")
                await asyncio.sleep(0.25)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()  # nothing more comes until graceful_timeout passes: then a close frame
            assert closed.value.rcvd is not None, "closed without a close frame"
            assert closed.value.rcvd.code == 1001  # Going Away

    run(go())
    assert c.proc.wait(30) == 0
    log = c.log()
    assert "graceful_timeout passed: closing 1 WebSocket session (1001 going away)" in log
    assert "nothing in flight" not in log


def test_the_going_away_close_frame_never_lands_inside_a_message(corral):
    c = corral(ws_args("--graceful-timeout", "1"), workers=1)
    s = _handshake(c.port, rcvbuf=64 * 1024)
    s.sendall(_masked(0x1, b"flood 1000000"))  # 64 KiB messages, with no end in sight when the deadline comes
    c.proc.send_signal(signal.SIGTERM)
    c.wait_for(r"corral: stopping: draining 1 WebSocket session")  # held back meanwhile: we read nothing
    messages, last, rest = _read_flood(s)  # from here, as fast as we can, until corral closes
    s.close()
    # Whole messages only, then the close frame: one cut inside a message would garble everything after it.
    assert rest == 0, f"the stream ended inside a frame ({rest} bytes of it)"
    assert last == (0x8, (1001).to_bytes(2, "big")), last
    assert 0 < messages < 1000000
    assert c.proc.wait(30) == 0


def _read_flood(s: RawClient) -> tuple[int, tuple[int, bytes] | None, int]:
    """Read a server's frames to EOF: every one but the last must be a whole `flood` message (binary, 64 KiB
    of x). Returns how many were, the last frame (opcode, payload), and the bytes left over after it."""
    whole, buf, count, last = b"x" * 65536, bytearray(s.buffered), 0, None
    while True:
        i = 0
        while len(buf) - i >= 2 and last is None:
            opcode, n, h = buf[i] & 0x0F, buf[i + 1] & 0x7F, 2
            if n == 126:
                n, h = int.from_bytes(buf[i + 2 : i + 4], "big"), 4
            elif n == 127:
                n, h = int.from_bytes(buf[i + 2 : i + 10], "big"), 10
            if len(buf) - i < h + n:
                break
            frame = (opcode, bytes(buf[i + h : i + h + n]))
            assert buf[i] & 0x80, "a fragmented message"
            if frame == (0x2, whole):
                count += 1
            else:
                last = frame
            i += h + n
        del buf[:i]
        if last is not None:
            assert not buf, f"{len(buf)} bytes after the last frame"
        try:
            chunk = s.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return count, last, len(buf)
        buf += chunk


def test_stop_waits_no_longer_than_the_sessions_it_holds(corral):
    c = corral(ws_args("--graceful-timeout", "60"), workers=1)

    async def go() -> None:
        ws = await connect(f"ws://127.0.0.1:{c.port}/ws")
        await ws.send("x")
        assert await ws.recv() == "x"
        c.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(c.wait_for, r"corral: stopping")
        await ws.send("y")
        assert await ws.recv() == "y"
        assert "draining 1 WebSocket session" in c.log()
        await ws.close()  # the last session ends by itself: the stop goes on at once, not at the deadline

    run(go())
    assert c.proc.wait(30) == 0
    assert "graceful_timeout passed" not in c.log()


# --- 3. send_timeout on a tunnel ----------------------------------------------------------------------
def test_a_tunnel_client_that_takes_nothing_is_cut_after_send_timeout(corral):
    c = corral(ws_args("--send-timeout", "2", "--ws-idle-timeout", "3", "--max-sessions", "1"), workers=1)
    s = _handshake(c.port)
    s.sendall(_masked(0x1, b"flood 2000"))  # 125 MiB the client will never read
    # One byte every 0.5 s of a frame that never ends: the tunnel is never idle, the client never reads.
    s.sendall(_masked(0x2, b"", length=10_000))
    cut = False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            s.send(b"\x00")
        except (ConnectionResetError, BrokenPipeError):
            cut = True
            break
        time.sleep(0.5)
    s.close()
    assert cut, "the tunnel was still open 30 s after its client stopped reading (send_timeout 2 s)"
    # corral's account: the session is gone and counted as cut by send_timeout; its place is free again.
    app = poll("the cut session to leave the status", lambda: (a := _status(c.port))["sessions"]["open"] == 0 and a)
    assert app["cut"].get("send_timeout") == 1, app["cut"]

    async def again() -> str:
        async with connect(f"ws://127.0.0.1:{c.port}/ws", open_timeout=10) as ws:  # max_sessions 1: the place is free
            await ws.send("served")
            return await ws.recv()

    assert run(again()) == "served"


# --- the pieces, without sockets ------------------------------------------------------------------------
def _frame(payload: bytes, opcode: int = 1) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
    return head + payload


CONFIG = b'{"config":{"workerId":"","sessionId":"af741da77f94d218f0d7113e9b8d98f1","user":null}}'


@pytest.mark.unit
def test_frames_find_the_session_id_and_every_frame_boundary_however_the_bytes_are_split():
    from corral.datapath.tunnel import Frames

    frames = [_frame(b"\x00" * 300, 2), _frame(b"", 9), _frame(CONFIG), _frame(b"x" * 70_000), _frame(b"y" * 200)]
    stream = b"".join(frames)
    ends = {sum(len(f) for f in frames[: i + 1]) for i in range(len(frames))}
    for cut in range(1, len(stream), 11):
        f = Frames()
        assert f.feed(stream[:cut]) == cut and f.feed(stream[cut:]) == len(stream) - cut
        assert f.found == "af741da77f94d218f0d7113e9b8d98f1" and f.at_boundary()
        g = Frames()
        g.feed(stream[:cut])
        taken = g.feed(stream[cut:], upto_boundary=True)  # a going-away tunnel's stop: the frame's end
        assert g.at_boundary() and (cut + taken in ends or (taken == 0 and cut in ends))


@pytest.mark.unit
def test_only_the_first_frames_are_read_for_a_session_id():
    from corral.datapath.tunnel import Frames, session_id

    f = Frames()
    for _ in range(4):
        f.feed(_frame(b"hello"))
    f.feed(_frame(CONFIG))
    assert f.found is None and not f.learning
    g = Frames()
    g.feed(_frame(b"z" * 20_000))  # past LEARN_BYTES
    g.feed(_frame(CONFIG))
    assert g.found is None and not g.learning
    assert session_id(b'{"config":{"sessionId":"../../etc"}}') is None
    assert session_id(b'{"config":{"sessionId":"ab12"}}') == "ab12"


@pytest.mark.unit
def test_session_in_path_and_page_loads():
    from corral.datapath import sticky

    assert sticky.session_in_path(b"/session/ab12/download/d?w=") == b"ab12"
    assert sticky.session_in_path(b"/dash/session/ab12/upload/7?w=") == b"ab12"
    assert sticky.session_in_path(b"/session/ab12") == b"ab12"
    assert sticky.session_in_path(b"/?next=/session/ab12/") is None
    assert sticky.session_in_path(b"/shared/shiny.min.js") is None
    assert sticky.is_navigation(b"GET", b"navigate", b"*/*")
    assert not sticky.is_navigation(b"GET", b"cors", b"text/html")
    assert sticky.is_navigation(b"GET", None, b"text/html,application/xhtml+xml")  # no Fetch Metadata (plain http)
    assert not sticky.is_navigation(b"GET", None, b"*/*")
    assert not sticky.is_navigation(b"POST", b"navigate", b"text/html")
