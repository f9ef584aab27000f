"""Red team: net.is_ip now strips brackets (f8187b9, "helpers written once"), and config validation uses it for
`server.host` and `app.worker_host`, which are bound and connected to as written, without stripping brackets.

Before f8187b9 `host = "[::1]"` / `worker_host = "[::1]"` were refused by validation ("must be an IP address");
now they pass `corral check`, and `corral run` then fails later with a wrong diagnosis: the public listener
"is not available (Name or service not known)", a worker port "is already in use".
"""

from __future__ import annotations

import sys

import pytest

from corral import config as C

pytestmark = pytest.mark.unit


def _problems(**kw: object) -> list[str]:
    server = {k: v for k, v in kw.items() if k == "host"}
    app = {k: v for k, v in kw.items() if k == "worker_host"}
    cfg = C.Config(
        server=C.ServerConfig(**server), apps=[C.AppConfig(command=[sys.executable, "x.py", "{port}"], **app)]
    )
    return C.validate(cfg)


def test_bracketed_ipv6_public_host_is_refused_by_validation():
    problems = _problems(host="[::1]")
    assert any("server: host: must be an IP address" in p for p in problems), problems


def test_bracketed_ipv6_worker_host_is_refused_by_validation():
    problems = _problems(worker_host="[::1]")
    assert any("worker_host: must be an IP address" in p for p in problems), problems
