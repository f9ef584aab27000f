"""A WebSocket echo worker for tests (the `websockets` package), one process, one port.

Usage: python3 ws_echo_worker.py PORT   (or PORT from the environment)

Plain HTTP (no `Upgrade: websocket`), any path: 200 with `worker INDEX PID PATH`, so readiness probes
and front ends' health checks pass and a test can tell workers apart without a WebSocket.

WebSocket, any path: every message is echoed back as it came (text as text, binary as binary, up to
16 MiB), except these text commands:
    whoami          -> CORRAL_WORKER_INDEX
    pid             -> this process's pid
    path            -> the request path the handshake carried (what a front end forwarded)
    headers         -> the handshake's request headers as JSON (lower-case names)
    close           -> the worker starts the close handshake (code 1000, reason "bye")
    flood N         -> N binary messages of 64 KiB, sent as fast as the client takes them
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

INDEX = os.environ.get("CORRAL_WORKER_INDEX", "?")
HOST = os.environ.get("CORRAL_WORKER_HOST", "127.0.0.1")
MAX_MESSAGE = 16 * 1024 * 1024  # a 1 MB message and then some; the library's default is 1 MiB
CHUNK = b"x" * 65536


def plain_http(connection: ServerConnection, request: Request) -> Response | None:
    """Answer requests that are not WebSocket handshakes with a plain 200 (probes, curl)."""
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return None  # go on with the handshake
    return connection.respond(HTTPStatus.OK, f"worker {INDEX} {os.getpid()} {request.path}\n")


async def session(ws: ServerConnection) -> None:
    async for message in ws:
        if isinstance(message, str) and await command(ws, message):
            continue
        await ws.send(message)


async def command(ws: ServerConnection, text: str) -> bool:
    """Run a text command; False when the text is not one (then it is echoed)."""
    request = ws.request
    assert request is not None
    if text == "whoami":
        await ws.send(INDEX)
    elif text == "pid":
        await ws.send(str(os.getpid()))
    elif text == "path":
        await ws.send(request.path)
    elif text == "headers":
        await ws.send(json.dumps({k.lower(): v for k, v in request.headers.raw_items()}))
    elif text == "close":
        await ws.close(1000, "bye")
    elif text.startswith("flood ") and text[6:].isdigit():
        for _ in range(int(text[6:])):
            await ws.send(CHUNK)  # waits while the transport's buffer is full: the client's pace
    else:
        return False
    return True


async def main(port: int) -> None:
    async with serve(session, HOST, port, process_request=plain_http, max_size=MAX_MESSAGE) as server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1] if len(sys.argv) > 1 else os.environ["PORT"])))
