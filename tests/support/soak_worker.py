"""A misbehaving HTTP/1.1 worker for soak and delivery tests: single-threaded, one connection at a time, raw sockets.

Usage: python3 soak_worker.py PORT [--idle-close-ms MS] [--idle-close-lag-ms MS]

  --idle-close-ms MS      a kept-alive connection on which no request starts within MS is closed, as gunicorn
                          (--keep-alive) and uvicorn (--timeout-keep-alive) do; a new connection waits as long
  --idle-close-lag-ms MS  time between deciding a connection is idle and closing it (a busy server's own
                          delay; bytes arriving meanwhile are lost with the connection, as they are there)

Every response body is deterministic: `pattern(seed, n)` for the query's seed and n, so a client can check
each byte of what it got, and a byte from another request's answer never matches. What happens is chosen by
the query (any path; every parameter optional):

  seed=S n=N      body = pattern(S, N) (default: seed 0, n 0)
  echo=1          body = the request body instead (Content-Length or chunked uploads)
  frame=cl        Content-Length (default) | chunked (random chunk sizes from the seed) | close (no length,
                  `Connection: close`, the body ends when the connection closes)
  cont=1          `100 Continue` before reading the request body
  early=1         the whole response before reading the request body, then the body is read and dropped
                  (the connection is kept); early=close: `Connection: close`, the response, then a
                  lingering close (shutdown, read the body to its end, close)
  delay_ms=D      wait D ms (after the request body) before answering
  pieces=K gap_ms=G  the body in K writes, G ms apart (a trickled answer)
  die_at=M        the head and M body bytes, then the process exits (os._exit(3)); die_at=-1: exits before the head
  cut_at=M        the head and M body bytes, then the connection is closed (the process lives on)

Each response carries `X-Soak-Seed: S` and `X-Soak-Rid: <the request's X-Request-Id>`. When $SOAK_LOG is set,
`seen <rid>` is appended to it as each request head arrives (before any answer) and `done <rid>` once the
whole response has been written, so a test knows which requests reached a worker.
"""

from __future__ import annotations

import os
import random
import select
import socket
import sys
import time
from urllib.parse import parse_qs, urlsplit

BLOCK = 4093  # a prime: the pattern's period never lines up with a buffer or chunk size
PIECE = 65536
LOG = os.environ.get("SOAK_LOG")


# --- the deterministic bodies (imported by the tests) -------------------------------------------------
_blocks: dict[int, bytes] = {}


def _block(seed: int) -> bytes:
    b = _blocks.get(seed)
    if b is None:
        if len(_blocks) > 64:
            _blocks.clear()
        b = _blocks[seed] = random.Random(seed).randbytes(BLOCK)
    return b


def pattern(seed: int, n: int, offset: int = 0) -> bytes:
    """Bytes offset..offset+n of seed's endless body."""
    if n <= 0:
        return b""
    block = _block(seed)
    start = offset % BLOCK
    reps = (start + n) // BLOCK + 1
    return (block * reps)[start : start + n]


def pattern_pieces(seed: int, n: int, piece: int = PIECE):
    """pattern(seed, n) in pieces of at most `piece` bytes, without building it whole."""
    block = _block(seed)
    ring = block * (piece // BLOCK + 2)
    at = 0
    while at < n:
        size = min(piece, n - at)
        start = at % BLOCK
        yield ring[start : start + size]
        at += size


# --- the worker ------------------------------------------------------------------------------------
class Closed(Exception):
    """The peer closed (or reset) the connection."""


def log(what: str, rid: str) -> None:
    if LOG and rid:
        with open(LOG, "a") as f:
            f.write(f"{what} {rid}\n")


class Conn:
    def __init__(self, sock: socket.socket, idle_close: float, idle_lag: float) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.idle_close = idle_close
        self.idle_lag = idle_lag

    def recv(self) -> bytes:
        try:
            data = self.sock.recv(PIECE)
        except OSError:
            data = b""
        if not data:
            raise Closed
        return data

    def wait_request(self) -> bool:
        """False when the connection is to be closed as idle (idle close configured, nothing came)."""
        if self.buf or not self.idle_close:
            return True
        ready, _, _ = select.select([self.sock], [], [], self.idle_close)
        if ready:
            return True
        if self.idle_lag:
            time.sleep(self.idle_lag)
        return False

    def read_head(self) -> tuple[str, str, str, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.recv()
            if len(self.buf) > 65536:
                raise Closed
        end = self.buf.index(b"\r\n\r\n")
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[: end + 4]
        first, *lines = head.split("\r\n")
        method, target, version = first.split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return method, target, version, headers

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self.recv()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self.buf += self.recv()
        end = self.buf.index(b"\r\n")
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def read_body(self, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.read_line().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.read_line():
                        pass
                    return bytes(out)
                out += self.read_exact(size)
                self.read_line()
        return self.read_exact(int(headers.get("content-length") or 0))

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            raise Closed from None


def _chunks(seed: int, data: bytes) -> list[bytes]:
    """data cut at random places (from the seed), each piece chunk-encoded."""
    rng = random.Random(seed ^ 0xC4C4)
    out, at = [], 0
    while at < len(data):
        size = rng.choice((1, 7, 100, 1000, 4096, 65536))
        piece = data[at : at + size]
        out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        at += len(piece)
    return out


def respond(conn: Conn, q: dict[str, str], body: bytes | None, rid: str, keep: bool, head_only: bool = False) -> bool:
    """Write the answer (to a HEAD request: its head alone); True when the connection stays open."""
    seed = int(q.get("seed", "0"))
    n = len(body) if body is not None else int(q.get("n", "0"))
    frame = q.get("frame", "cl")
    die_at = int(q["die_at"]) if "die_at" in q else None
    cut_at = int(q["cut_at"]) if "cut_at" in q else None
    if die_at is not None and die_at < 0:
        os._exit(3)
    lines = [
        "HTTP/1.1 200 OK",
        "Content-Type: application/octet-stream",
        f"X-Soak-Seed: {seed}",
        f"X-Soak-Rid: {rid}",
    ]
    if frame == "chunked":
        lines.append("Transfer-Encoding: chunked")
    elif frame == "close":
        lines.append("Connection: close")
        keep = False
    else:
        lines.append(f"Content-Length: {n}")
    if frame != "close" and not keep:
        lines.append("Connection: close")
    conn.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if head_only:
        log("done", rid)
        return keep

    stop_at = die_at if die_at is not None else cut_at
    pieces = max(1, int(q.get("pieces", "1")))
    gap = float(q.get("gap_ms", "0")) / 1000
    unit = max(1, -(-n // pieces)) if pieces > 1 else PIECE
    parts = (body[i : i + unit] for i in range(0, n, unit)) if body is not None else pattern_pieces(seed, n, unit)
    sent = 0
    for i, out in enumerate(parts):
        if i and gap:
            time.sleep(gap)
        if stop_at is not None and sent + len(out) >= stop_at:
            _write_body(conn, seed, out[: stop_at - sent], frame)
            break
        _write_body(conn, seed, out, frame)
        sent += len(out)
    if stop_at is not None:  # (a stop at or past the end: the body went whole, a chunked end marker never does)
        if die_at is not None:
            os._exit(3)
        conn.sock.close()
        return False
    if frame == "chunked":
        conn.send(b"0\r\n\r\n")
    log("done", rid)
    return keep


def _write_body(conn: Conn, seed: int, data: bytes, frame: str) -> None:
    if not data:
        return
    if frame == "chunked":
        for c in _chunks(seed, data):
            conn.send(c)
    else:
        conn.send(data)


def serve(conn: Conn) -> None:
    while True:
        if not conn.wait_request():
            return
        method, target, version, headers = conn.read_head()
        rid = headers.get("x-request-id", "")
        log("seen", rid)
        q = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
        token = headers.get("connection", "").lower()
        keep = "close" not in token if version == "HTTP/1.1" else "keep-alive" in token
        early = q.get("early")
        if early:
            if early == "close":
                respond(conn, q, None, rid, keep=False)
                conn.sock.shutdown(socket.SHUT_WR)  # lingering close: the client may still be sending
                deadline = time.monotonic() + 5
                conn.sock.settimeout(1)
                try:
                    while time.monotonic() < deadline and conn.sock.recv(PIECE):
                        pass
                except OSError:
                    pass
                return
            keep = respond(conn, q, None, rid, keep)
            conn.read_body(headers)
            if not keep:
                return
            continue
        if q.get("cont") == "1":
            conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = conn.read_body(headers)
        if "delay_ms" in q:
            time.sleep(float(q["delay_ms"]) / 1000)
        if not respond(conn, q, body if q.get("echo") == "1" else None, rid, keep, head_only=method == "HEAD"):
            return


def main() -> None:
    args = sys.argv[1:]
    port = int(args[0]) if args and not args[0].startswith("--") else int(os.environ["PORT"])
    idle_close = float(args[args.index("--idle-close-ms") + 1]) / 1000 if "--idle-close-ms" in args else 0.0
    lag = float(args[args.index("--idle-close-lag-ms") + 1]) / 1000 if "--idle-close-lag-ms" in args else 0.0
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    print(f"soak worker listening on {port}", flush=True)
    while True:
        sock, _ = srv.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock, idle_close, lag)
        try:
            serve(conn)
        except (Closed, OSError, ValueError):
            pass
        finally:
            sock.close()


if __name__ == "__main__":
    main()
