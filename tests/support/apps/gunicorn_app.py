"""A WSGI app for tests/interop/test_interop_delivery.py, served by the real gunicorn (gthread, keep-alive).

GET /data?seed=S&n=N answers soak_worker.pattern(S, N) with a Content-Length; any other request (a POST
among them) answers its method, path and the length of the body it carried (the body is read whole).
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import parse_qs

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for support.soak_worker.pattern

from support.soak_worker import pattern


def app(environ, start_response):
    q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    if environ["REQUEST_METHOD"] == "GET" and environ["PATH_INFO"] == "/data":
        out = pattern(int(q.get("seed", "0")), int(q.get("n", "0")))
    else:
        out = f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']} {len(body)}".encode()
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(out)))])
    return [out]
