"""stub_worker.py's single-threaded HTTP/1.1 worker, on a Unix socket instead of a port.

Usage: python3 unix_stub_worker.py PATH   (or $CORRAL_WORKER_SOCKET, which corral sets for unix workers)
Same endpoints as stub_worker.py (/whoami-style JSON on any path, /health, /sleep, /crash, ...).
"""

from __future__ import annotations

import os
import socketserver
import sys
from typing import Any

from stub_worker import INDEX, Handler


class UnixHandler(Handler):
    def address_string(self) -> str:
        return "unix"  # a Unix peer has no (host, port)


class UnixHTTPServer(socketserver.UnixStreamServer):
    """HTTPServer's behaviour on AF_UNIX: one connection at a time, like stub_worker."""

    def server_bind(self) -> None:
        socketserver.UnixStreamServer.server_bind(self)
        self.server_name, self.server_port = "localhost", 0

    def get_request(self) -> tuple[Any, Any]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)  # BaseHTTPRequestHandler reads client_address[0]


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else os.environ["CORRAL_WORKER_SOCKET"]
    srv = UnixHTTPServer(path, UnixHandler)
    print(f"unix stub worker {INDEX} listening on {path}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
