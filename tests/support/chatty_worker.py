"""A single-threaded HTTP worker for the operations tests: it prints what it is asked to, and can die.

Usage: python3 chatty_worker.py PORT
    GET /say?msg=TEXT    prints `said TEXT` on stdout, answers 200
    GET /err?msg=TEXT    prints `error TEXT` on stderr, answers 200
    anything else        answers 200 {"index", "pid"}
With CHATTY_DIE_AFTER=N in the environment it prints two error lines on stderr and exits 1 after
answering N requests (the readiness probe is one): a worker that crashes again and again.
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

INDEX = os.environ.get("CORRAL_WORKER_INDEX", "?")
DIE_AFTER = int(os.environ.get("CHATTY_DIE_AFTER", "0"))
SERVED = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        global SERVED
        url = urlsplit(self.path)
        msg = parse_qs(url.query).get("msg", [""])[0]
        if url.path == "/say":
            print(f"said {msg}", flush=True)
        elif url.path == "/err":
            print(f"error {msg}", file=sys.stderr, flush=True)
        body = json.dumps({"index": INDEX, "pid": os.getpid()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        SERVED += 1
        if DIE_AFTER and SERVED >= DIE_AFTER:
            print("Error in connect(): database connection lost", file=sys.stderr, flush=True)
            print("Execution halted", file=sys.stderr, flush=True)
            os._exit(1)


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ["PORT"])
    HTTPServer.allow_reuse_address = True
    srv = HTTPServer(("127.0.0.1", port), Handler)
    print(f"chatty worker {INDEX} listening on {port}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
