"""Issue 5: several apps behind one port, routed by path prefix (corral.toml [[app]] tables)."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
from conftest import STUB, get

STUB_CMD = f'command = ["{sys.executable}", "{STUB}", "{{port}}"]'


def _write(tmp: Path, body: str) -> str:
    path = tmp / "corral.toml"
    path.write_text(body)
    return str(path)


def _app_of(pid: int) -> str:
    return psutil.Process(pid).environ()["CORRAL_APP"]


def test_apps_by_path_prefix_with_stripping_and_longest_match(corral, tmp_path):
    toml = _write(
        tmp_path,
        f"""
[[app]]
name = "api"
route = "/api"
strip_prefix = true
{STUB_CMD}
workers = 2

[[app]]
name = "v2"
route = "/api/v2/"
strip_prefix = true
{STUB_CMD}
workers = 1

[[app]]
name = "web"
route = "/web"
{STUB_CMD}
workers = 1
""",
    )
    c = corral(["-c", toml], workers=None)
    assert "all workers ready (api x2, v2 x1, web x1)" in c.log()

    r = get(c.port, "/api/users/7?full=1")
    body = r.json()
    assert r.status == 200 and _app_of(body["pid"]) == "api"
    assert body["path"] == "/users/7?full=1"  # the worker sees the path below its route
    assert body["headers"]["x-forwarded-prefix"] == "/api"  # and is told what was cut

    body = get(c.port, "/api").json()
    assert (body["path"], _app_of(body["pid"])) == ("/", "api")

    body = get(c.port, "/api/v2/items").json()  # the longest route wins
    assert (body["path"], body["headers"]["x-forwarded-prefix"], _app_of(body["pid"])) == ("/items", "/api/v2", "v2")

    body = get(c.port, "/api/v2x").json()  # segment boundaries: /api/v2x is api's, not v2's
    assert (body["path"], _app_of(body["pid"])) == ("/v2x", "api")

    body = get(c.port, "/web/page?x=1").json()  # no strip_prefix: the path is untouched
    assert (body["path"], _app_of(body["pid"])) == ("/web/page?x=1", "web")
    assert "x-forwarded-prefix" not in body["headers"]

    pids = {get(c.port, "/api/x").json()["pid"] for _ in range(8)}
    assert len(pids) == 2  # both api workers take turns; v2 and web never see /api traffic


def test_path_no_app_claims_gets_404_json_and_never_reaches_a_worker(corral, tmp_path):
    log = tmp_path / "stub.log"
    toml = _write(
        tmp_path,
        f"""
[[app]]
name = "api"
route = "/api"
{STUB_CMD}
workers = 1

[[app]]
name = "web"
route = "/web"
strip_prefix = true
{STUB_CMD}
workers = 1
""",
    )
    c = corral(["-c", toml], workers=None, env={"STUB_LOG": str(log)})
    for path in ("/", "/apix", "/webby/x", "/other?q=/api", "/API"):
        r = get(c.port, path)
        assert r.status == 404, path
        assert r.header("content-type") == "application/json"
        assert r.json() == {"error": "no app serves this path", "status": 404}
        assert r.header("x-request-id")
    assert get(c.port, "/api/ok").status == 200 and get(c.port, "/web/ok").status == 200
    seen = [line.split(" ", 2)[2] for line in log.read_text().splitlines()]
    assert "/api/ok" in seen and "/ok" in seen
    for path in ("/apix", "/webby/x", "/other?q=/api", "/API"):
        assert path not in seen


def test_root_app_takes_what_no_other_route_claims(corral, tmp_path):
    toml = _write(
        tmp_path,
        f"""
[[app]]
name = "api"
route = "/api"
strip_prefix = true
{STUB_CMD}
workers = 1

[[app]]
name = "site"
{STUB_CMD}
workers = 1
""",
    )
    c = corral(["-c", toml], workers=None)
    for path, app, seen in (("/apix", "site", "/apix"), ("/", "site", "/"), ("/api/a", "api", "/a")):
        body = get(c.port, path).json()
        assert (_app_of(body["pid"]), body["path"]) == (app, seen), path
