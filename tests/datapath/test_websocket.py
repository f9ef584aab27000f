"""Issue 12: WebSocket tunnels, per-worker session limits and sticky sessions, over real sockets.

The worker is tests/support/ws_echo_worker.py (the `websockets` package): plain HTTP answers name the worker,
WebSocket messages are echoed, and a few text commands (whoami, pid, close, flood N) drive the cases.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys

import psutil
import pytest
from conftest import SUPPORT, get, read_response, request

websockets = pytest.importorskip("websockets")
from websockets.asyncio.client import connect  # noqa: E402

WS = str(SUPPORT / "ws_echo_worker.py")


def ws_args(*extra: str) -> list[str]:
    return [*extra, "--", sys.executable, WS, "{port}"]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def url(c, path: str = "/") -> str:
    return f"ws://127.0.0.1:{c.port}{path}"


def _worker_of(body: bytes) -> str:
    return body.decode().split()[1]  # "worker INDEX PID PATH"


# --- the tunnel ------------------------------------------------------------------------------------
def test_text_binary_large_ping_and_close_from_either_side(corral):
    c = corral(ws_args(), workers=2)

    async def go() -> None:
        async with connect(url(c, "/chat?x=1"), max_size=None) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send(b"\x00\x01\xff")
            assert await ws.recv() == b"\x00\x01\xff"
            big = os.urandom(1_000_000)
            await ws.send(big)
            assert await ws.recv() == big
            await (await ws.ping(b"p"))  # the pong came back through the tunnel
            await ws.send("path")
            assert await ws.recv() == "/chat?x=1"
            await ws.send("headers")
            seen = await ws.recv()
            assert '"x-forwarded-for": "127.0.0.1"' in seen and '"via": "1.1 corral"' in seen
        # the client closed: the worker's session ended, and a new one is served
        async with connect(url(c)) as ws:
            await ws.send("close")  # the worker starts the close handshake
            with pytest.raises(websockets.ConnectionClosedOK):
                await ws.recv()
            assert ws.close_code == 1000 and ws.close_reason == "bye"

    run(go())
    assert "Traceback" not in c.log()


def test_200_sessions_spread_over_the_workers(corral):
    c = corral(ws_args("--max-sessions", "100"), workers=2)

    async def go() -> dict[str, int]:
        socks = [await connect(url(c)) for _ in range(200)]
        try:
            seen: dict[str, int] = {}
            for ws in socks:
                await ws.send("whoami")
                who = await ws.recv()
                seen[who] = seen.get(who, 0) + 1
            for ws in socks:  # every tunnel still works with all 200 open
                await ws.send("ping-all")
                assert await ws.recv() == "ping-all"
            return seen
        finally:
            for ws in socks:
                await ws.close()

    assert run(go()) == {"0": 100, "1": 100}


def test_sessions_do_not_hold_request_slots(corral):
    c = corral(ws_args(), workers=1)

    async def go() -> None:
        async with connect(url(c)) as ws:
            # max_inflight is 1, yet plain requests are served while the session stays open
            for _ in range(3):
                assert (await asyncio.to_thread(get, c.port, "/plain")).status == 200
            await ws.send("still here")
            assert await ws.recv() == "still here"

    run(go())


def test_max_sessions_reached_next_session_waits_then_is_served(corral):
    c = corral(ws_args("--max-sessions", "1"), workers=1)

    async def go() -> None:
        first = await connect(url(c))
        waiting = asyncio.ensure_future(connect(url(c)))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # it waits in corral's queue, not refused
        await first.close()
        second = await waiting
        await second.send("served")
        assert await second.recv() == "served"
        await second.close()

    run(go())


def test_session_waiting_past_the_queue_timeout_gets_503(corral):
    c = corral(ws_args("--max-sessions", "1", "--queue-timeout", "1"), workers=1)

    async def go() -> None:
        async with connect(url(c)):
            with pytest.raises(websockets.InvalidStatus) as exc:
                await connect(url(c), open_timeout=30)
            assert exc.value.response.status_code == 503
            assert exc.value.response.headers.get("Retry-After")

    run(go())


def test_client_that_stops_reading_does_not_grow_corral(corral):
    c = corral(ws_args(), workers=1)
    proc = psutil.Process(c.proc.pid)

    async def go() -> None:
        ws = await connect(url(c), max_size=None, max_queue=1)
        before = proc.memory_info().rss
        await ws.send("flood 4000")  # 250 MiB the client will not read
        # websockets stops reading the socket once its small queue is full: the flood backs up into
        # corral, whose tunnel must push back on the worker instead of buffering it all.
        await asyncio.sleep(3)
        grown = proc.memory_info().rss - before
        assert grown < 64 * 1024 * 1024, grown
        await ws.close()

    run(go())


def test_worker_killed_mid_session_closes_its_sessions_only(corral):
    c = corral(ws_args(), workers=2)

    async def go() -> None:
        socks = [await connect(url(c)) for _ in range(6)]
        owner = {}
        for ws in socks:
            await ws.send("pid")
            owner[ws] = int(await ws.recv())
        victim = next(iter(owner.values()))
        os.kill(victim, signal.SIGKILL)
        for ws, pid in owner.items():
            if pid == victim:
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
            else:
                await ws.send("alive")
                assert await ws.recv() == "alive"
        for ws in socks:
            await ws.close()

    run(go())


def test_other_upgrades_are_still_declined(corral):
    c = corral(ws_args(), workers=1)
    r = request(
        c.port,
        b"GET /h2 HTTP/1.1\r\nHost: t\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nConnection: close\r\n\r\n",
    )
    assert r.status == 200 and r.body.startswith(b"worker ")  # answered as a plain request


def test_edge_rules_apply_to_the_upgrade_request(corral):
    c = corral(ws_args(), workers=1)
    r = request(
        c.port,
        b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 3\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nabc",
    )
    assert r.status == 501


# --- sticky sessions -------------------------------------------------------------------------------
def _cookie_of(resp) -> str:
    value = resp.header("set-cookie")
    assert value is not None and value.startswith("corral_sticky=")
    assert "HttpOnly" in value
    return value.split(";", 1)[0]


def _get(port: int, cookie: str = "", xff: str = ""):
    extra = (f"Cookie: {cookie}\r\n" if cookie else "") + (f"X-Forwarded-For: {xff}\r\n" if xff else "")
    return get(port, "/s", headers=extra)


def test_sticky_cookie_same_worker_spread_and_moves_once(corral):
    c = corral(ws_args("--sticky", "cookie"), workers=2)
    first = _get(c.port)
    cookie = _cookie_of(first)
    home = _worker_of(first.body)
    for _ in range(6):
        r = _get(c.port, cookie)
        assert _worker_of(r.body) == home and r.header("set-cookie") is None
    spread = {_worker_of(_get(c.port).body) for _ in range(6)}  # clients without a cookie spread
    assert spread == {"0", "1"}

    async def ws_home() -> str:
        async with connect(url(c), additional_headers={"Cookie": cookie}) as ws:
            await ws.send("whoami")
            return await ws.recv()

    assert run(ws_home()) == home  # the WebSocket of a session reaches the worker of its page
    pid = int(first.body.split()[2])
    os.kill(pid, signal.SIGKILL)
    c.wait_for(rf"worker \S+:{home} stopped")
    moved = _get(c.port, cookie)
    assert moved.status == 200
    new_cookie = _cookie_of(moved)  # re-issued once, naming the worker it moved to
    assert new_cookie != cookie
    for _ in range(4):
        r = _get(c.port, new_cookie)
        assert r.body == moved.body and r.header("set-cookie") is None


def test_sticky_ip_same_worker_spread_and_waits_for_its_slot(corral):
    c = corral(ws_args("--sticky", "ip", "--trusted-proxies", "127.0.0.1/32"), workers=2)
    homes = {}
    for n in range(12):
        xff = f"10.0.0.{n}"
        seen = {_worker_of(_get(c.port, xff=xff).body) for _ in range(3)}
        assert len(seen) == 1, (xff, seen)
        homes[xff] = seen.pop()
    assert set(homes.values()) == {"0", "1"}
    client, slot = next(iter(homes.items()))
    pid = int(_get(c.port, xff=client).body.split()[2])
    os.kill(pid, signal.SIGKILL)
    c.wait_for(rf"worker \S+:{slot} stopped")
    r = _get(c.port, xff=client)  # waits for its slot's replacement rather than moving twice
    assert r.status == 200 and _worker_of(r.body) == slot and int(r.body.split()[2]) != pid


def test_raw_handshake_response_is_a_clean_101(corral):
    c = corral(ws_args(), workers=1)
    with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
        s.sendall(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        r = read_response(s, head_only=True)
    assert r.status == 101
    assert (r.header("upgrade") or "").lower() == "websocket"
    assert (r.header("connection") or "").lower() == "upgrade"
    assert r.header("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert re.fullmatch(r"[0-9a-f-]+", r.header("x-request-id") or "")


# --- draining: reload keeps open sessions until they close or graceful_timeout passes ---------------
def test_reload_drains_a_worker_with_sessions_without_cutting_them(corral):
    c = corral(ws_args("--graceful-timeout", "60"), workers=1)

    async def go() -> None:
        async with connect(url(c)) as old:
            await old.send("pid")
            old_pid = int(await old.recv())
            os.kill(c.proc.pid, signal.SIGHUP)  # rolling reload
            await asyncio.to_thread(c.wait_for, r"worker \S+:0 draining")
            async with connect(url(c)) as new:  # new sessions go to the replacement
                await new.send("pid")
                assert int(await new.recv()) != old_pid
            await old.send("still served")  # the draining worker keeps its session
            assert await old.recv() == "still served"
            assert "drained" not in c.log()
        # the session closed: now the old worker has nothing left and is stopped
        await asyncio.to_thread(c.wait_for, r"worker \S+:0 stopping: drained")

    run(go())


def test_sessions_are_closed_once_graceful_timeout_passes(corral):
    c = corral(ws_args("--graceful-timeout", "1"), workers=1)

    async def go() -> None:
        async with connect(url(c)) as old:
            os.kill(c.proc.pid, signal.SIGHUP)
            await asyncio.to_thread(c.wait_for, r"graceful_timeout passed while draining")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await old.recv()  # closed when its worker stopped; a Shiny client reconnects
            # with a close frame (Going Away), not a bare TCP close (1006 in a browser)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001

    run(go())
