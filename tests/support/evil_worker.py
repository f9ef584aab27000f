"""A worker that breaks HTTP on purpose, one connection at a time, on raw sockets.

Usage: python3 evil_worker.py PORT. Paths (the response is scripted byte for byte):
  /surplus     Content-Length: 5, "hello", then a complete forged response, in one write
  /late-surplus  the same, the forged response in a second write 50 ms later
  /204-body    a 204 carrying a Content-Length and body bytes (a 204 has no body)
  /304-body    the same with 304
  /die-mid     a head promising 1000 bytes, 10 of them, then the process exits
  /big?n=N     N bytes of 'z' with a Content-Length, written in 64 KiB pieces
  anything else  200 with body "ok:<path>"; HEAD gets the same head and no body
Every request line is appended to $STUB_LOG when set.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from urllib.parse import parse_qs, urlsplit

LOG = os.environ.get("STUB_LOG")
FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Forged: 1\r\n\r\nforged"


def response(body: bytes, status: bytes = b"200 OK", head_only: bool = False, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    head = b"HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % (status, n)
    return head if head_only else head + body


def read_request(conn: socket.socket, buf: bytearray) -> tuple[str, str] | None:
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    end = buf.index(b"\r\n\r\n")
    head = bytes(buf[:end]).decode("latin-1")
    del buf[: end + 4]
    method, target, _ = head.split("\r\n", 1)[0].split(" ", 2)
    length = 0
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(buf) < length:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    del buf[:length]
    if LOG:
        with open(LOG, "a") as f:
            f.write(f"{os.getpid()} {method} {target}\n")
    return method, target


def answer(conn: socket.socket, method: str, target: str) -> bool:
    """Send the scripted answer; False when the connection must end."""
    url = urlsplit(target)
    path = url.path
    if path == "/surplus":
        conn.sendall(response(b"hello") + FORGED)
    elif path == "/late-surplus":
        conn.sendall(response(b"hello"))
        time.sleep(0.05)
        conn.sendall(FORGED)
    elif path in ("/204-body", "/304-body"):
        status = b"204 No Content" if path == "/204-body" else b"304 Not Modified"
        conn.sendall(response(b"XXXXX", status) + FORGED)
    elif path == "/die-mid":
        conn.sendall(response(b"", length=1000) + b"0123456789")
        os._exit(3)
    elif path == "/big":
        n = int(parse_qs(url.query).get("n", ["1000000"])[0])
        conn.sendall(response(b"", length=n))
        if method != "HEAD":
            piece = b"z" * 65536
            left = n
            while left:
                conn.sendall(piece[: min(left, len(piece))])
                left -= min(left, len(piece))
    else:
        conn.sendall(response(f"ok:{target}".encode(), head_only=method == "HEAD"))
    return True


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ["PORT"])
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    print(f"evil worker listening on {port}", flush=True)
    while True:
        conn, _ = srv.accept()
        buf = bytearray()
        try:
            while True:
                req = read_request(conn, buf)
                if req is None or not answer(conn, *req):
                    break
        except OSError:
            pass
        finally:
            conn.close()


if __name__ == "__main__":
    main()
