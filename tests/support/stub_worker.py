"""A single-threaded HTTP/1.1 worker for tests: one connection at a time, like many dev servers.

Usage: python3 stub_worker.py PORT   (or PORT from the environment)
Every request line it receives is appended to $STUB_LOG (when set), so tests can prove what a
worker never saw.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

INDEX = os.environ.get("CORRAL_WORKER_INDEX", "?")
LOG = os.environ.get("STUB_LOG")
HOLD: list[bytes] = []
SEEN = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:
        pass

    def _record(self) -> None:
        global SEEN
        SEEN += 1
        if LOG:
            with open(LOG, "a") as f:
                f.write(f"{os.getpid()} {self.command} {self.path}\n")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes, ctype: str = "application/json", extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: object, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode())

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        self._record()
        body = self._read_body()
        url = urlsplit(self.path)
        if url.path == "/crash":
            os._exit(3)
        if url.path.startswith("/sleep"):
            time.sleep(float(parse_qs(url.query).get("s", ["1"])[0]))
        self._json({"len": len(body), "sha256": hashlib.sha256(body).hexdigest(), "index": INDEX, "pid": os.getpid()})

    do_PUT = do_POST

    def do_GET(self) -> None:
        self._record()
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        if path == "/crash":
            os._exit(3)
        if path == "/hang":
            time.sleep(3600)
        if path.startswith("/sleep"):  # /sleep, /sleep-long, ...: distinct routes, same behaviour
            time.sleep(float(q.get("s", "1")))
        if path == "/health":
            # $STUB_SICK_DIR/<pid> makes this one worker sick; its content is a delay in seconds
            sick = os.path.join(os.environ.get("STUB_SICK_DIR", "/nonexistent"), str(os.getpid()))
            if os.path.exists(sick):
                with open(sick) as f:
                    time.sleep(float(f.read().strip() or 0))
                self._json({"ok": False}, 500)
                return
            self._json({"ok": True})
            return
        if path == "/mem":
            HOLD.append(b"x" * int(float(q.get("mb", "10")) * 1048576))
        if path == "/big":
            n = int(q.get("n", "1000000"))
            self._send(200, b"z" * n, "application/octet-stream")
            return
        if path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        if path == "/eof":  # body delimited by closing the connection
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until-close")
            self.close_connection = True
            return
        if path == "/hop":
            self._send(200, b"{}", extra={"Connection": "X-Secret", "X-Secret": "1", "Keep-Alive": "timeout=5"})
            return
        if path == "/drip":  # a head promising 1000 bytes, 10 of them, then nothing more for an hour
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            time.sleep(3600)
        if path == "/garbage":
            self.wfile.write(b"NOT HTTP AT ALL\r\n\r\n")
            self.close_connection = True
            return
        self._json(
            {
                "index": INDEX,
                "pid": os.getpid(),
                "path": self.path,
                "seen": SEEN,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
        )


def main() -> None:
    fail = os.environ.get("STUB_FAIL_START")
    if fail and os.path.exists(fail):
        print("stub worker: cannot start: missing package 'imaginary'", flush=True)
        sys.exit(1)
    port = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ["PORT"])
    HTTPServer.allow_reuse_address = True
    srv = HTTPServer((os.environ.get("CORRAL_WORKER_HOST", "127.0.0.1"), port), Handler)  # corral's worker_host
    print(f"stub worker {INDEX} listening on {port}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
