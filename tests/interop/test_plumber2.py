"""plumber2 apps: how corral recognises them and starts them.

The real plumber2 (posit-dev/plumber2) is not in Debian and cannot be installed here, so the launch is
tested against a stand-in package named plumber2 (tests/apps/plumber2_standin: api() and api_run()
over httpuv), built into a temporary library that the workers find through R_LIBS.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import HAVE_R, SUPPORT, corral_cli, get

from corral.config import AppConfig, resolve_plumber
from corral.supervision.launch import LaunchError, r_engine, worker_argv, worker_env

STANDIN = SUPPORT / "apps" / "plumber2_standin"

ROUTES = """
#* @get /hello
function(request) {
  list(
    engine = "plumber2",
    port = Sys.getenv("PORT"),
    plumber2_port = Sys.getenv("PLUMBER2_PORT"),
    plumber_port = Sys.getenv("PLUMBER_PORT"),
    cwd = basename(getwd()),
    traceparent = request$HTTP_TRACEPARENT
  )
}
"""


def server_yml_app(root: Path) -> Path:
    """A plumber2 app as plumber2's docs lay one out: _server.yml naming its route files."""
    app = root / "p2app"
    (app / "routes").mkdir(parents=True)
    (app / "_server.yml").write_text(
        "engine: plumber2\nroutes:\n  - routes/main.R\noptions:\n  host: 0.0.0.0\n  port: 8000\n"
    )
    (app / "routes" / "main.R").write_text(ROUTES)
    return app


# --- how an app is recognised and launched (no R needed) ------------------------------------------
def test_directory_with_server_yml_is_a_plumber2_app(tmp_path):
    app = server_yml_app(tmp_path)
    assert resolve_plumber(str(app)) == app.resolve()
    cfg = AppConfig(plumber=str(app))
    assert r_engine(cfg) == "plumber2"
    argv, cwd = worker_argv(cfg, 9001, 0)
    assert cwd == str(app.resolve())
    expr = argv[-1]
    assert 'plumber2::api("_server.yml", doc_type = NULL)' in expr
    assert 'plumber2::api_run(host = "127.0.0.1", port = as.integer(Sys.getenv("PORT")))' in expr
    assert "|>" in expr


def test_server_yml_given_as_the_file_itself(tmp_path):
    app = server_yml_app(tmp_path)
    cfg = AppConfig(plumber=str(app / "_server.yml"))
    assert resolve_plumber(cfg.plumber) is not None
    argv, cwd = worker_argv(cfg, 9001, 0)
    assert cwd == str(app.resolve()) and 'plumber2::api("_server.yml"' in argv[-1]


def test_docs_flag_keeps_plumber2s_own_docs(tmp_path):
    cfg = AppConfig(plumber=str(server_yml_app(tmp_path)), docs=True)
    assert "doc_type" not in worker_argv(cfg, 9001, 0)[0][-1]


def test_r_file_that_attaches_plumber2_is_a_plumber2_app(tmp_path):
    f = tmp_path / "api.R"
    f.write_text("library(plumber2)\n" + ROUTES)
    assert r_engine(AppConfig(plumber=str(f))) == "plumber2"
    f.write_text("# uses plumber2::api_get() below\n" + ROUTES)
    assert r_engine(AppConfig(plumber=str(f))) == "plumber2"
    f.write_text(ROUTES)  # plumber and plumber2 annotations look alike: a plain file is plumber's
    assert r_engine(AppConfig(plumber=str(f))) == "plumber"
    assert r_engine(AppConfig(plumber=str(f), engine="plumber2")) == "plumber2"
    argv, cwd = worker_argv(AppConfig(plumber=str(f), engine="plumber2"), 9001, 0)
    assert cwd == str(tmp_path.resolve()) and 'plumber2::api("api.R", doc_type = NULL)' in argv[-1]


def test_engine_plumber_overrides_a_server_yml(tmp_path):
    app = server_yml_app(tmp_path)
    (app / "plumber.R").write_text(ROUTES)
    cfg = AppConfig(plumber=str(app), engine="plumber")
    assert r_engine(cfg) == "plumber"
    assert "plumb(dir = '.')" in worker_argv(cfg, 9001, 0)[0][-1]


def test_server_yml_of_another_engine_is_refused(tmp_path):
    app = tmp_path / "other"
    app.mkdir()
    (app / "_server.yml").write_text("engine: ambiorix\n")
    with pytest.raises(LaunchError, match="engine 'ambiorix'"):
        worker_argv(AppConfig(plumber=str(app)), 9001, 0)


def test_plumber2_and_plumber_port_variables_are_set(tmp_path):
    env = worker_env(AppConfig(plumber=str(server_yml_app(tmp_path))), 9007, 3)
    assert env["PORT"] == env["PLUMBER2_PORT"] == env["PLUMBER_PORT"] == "9007"
    assert env["PLUMBER2_HOST"] == "127.0.0.1"


# --- the launch, against the stand-in ---------------------------------------------------------------
@pytest.fixture(scope="module")
def standin_lib(tmp_path_factory) -> Path:
    if not HAVE_R:
        pytest.skip("R is not installed")
    lib = tmp_path_factory.mktemp("rlib")
    r = subprocess.run(
        ["R", "CMD", "INSTALL", f"--library={lib}", str(STANDIN)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (lib / "plumber2").is_dir()
    return lib


@pytest.mark.r
@pytest.mark.skipif(not HAVE_R or shutil.which("R") is None, reason="needs R")
def test_plumber2_standin_starts_from_server_yml(corral, tmp_path, standin_lib):
    app = server_yml_app(tmp_path)
    c = corral([str(app)], workers=2, env={"R_LIBS": str(standin_lib)})
    seen = {}
    for _ in range(8):
        r = get(c.port, "/hello")
        assert r.status == 200
        body = r.json()
        assert body["engine"] == "plumber2" and body["cwd"] == "p2app"
        assert body["plumber2_port"] == body["plumber_port"] == body["port"]
        seen[body["port"]] = body["traceparent"]
    assert set(seen) == {str(c.base_port), str(c.base_port + 1)}  # corral's ports, not the yml's 8000
    assert all(re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[23]", tp) for tp in seen.values())
    log = c.log()
    assert "plumber2 stand-in: api('_server.yml')" in log
    assert f"plumber2 stand-in: api_run(host = 127.0.0.1, port = {c.base_port})" in log


@pytest.mark.r
@pytest.mark.skipif(not HAVE_R, reason="needs R")
def test_plumber2_file_with_engine_option(corral, tmp_path, standin_lib):
    f = tmp_path / "api.R"
    f.write_text(ROUTES)
    c = corral([str(f), "--engine", "plumber2"], workers=1, env={"R_LIBS": str(standin_lib)})
    assert get(c.port, "/hello").json()["engine"] == "plumber2"
    assert "plumber2 stand-in: api('api.R')" in c.log()


def test_engine_is_refused_for_a_command(tmp_path):
    toml = tmp_path / "corral.toml"
    toml.write_text('[[app]]\nname = "x"\ncommand = ["python3", "x.py"]\nengine = "plumber2"\n')
    r = corral_cli("check", "-c", str(toml))
    assert r.returncode == 2 and "engine: applies to plumber apps only (this one is a command)" in r.stdout + r.stderr
