"""Issue 14: a new user's first commands: `corral run` with no APP serves the plumber.R here, a forgotten
`--` and a misspelt app file get a hint, and the README says how to get corral on the PATH.

Real corral processes over real sockets; every wait is a bounded poll, nothing asserts on timing.
"""

from __future__ import annotations

import shutil
import sys

import pytest
from conftest import EXAMPLE_R, HAVE_R, ROOT, STUB, corral_cli, get


# --- corral run with no APP ------------------------------------------------------------------------------
def test_no_app_argument_serves_plumber_r_in_the_current_directory(tmp_path):
    api = tmp_path / "myapi"
    api.mkdir()
    (api / "plumber.R").write_text("#* @get /\nfunction() 'hi'\n")
    r = corral_cli("check", cwd=api)
    assert r.returncode == 0, r.stderr
    assert "myapi / -> " in r.stdout and f"plumber {api}" in r.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    r = corral_cli("run", cwd=empty)
    assert r.returncode == 2 and "no plumber.R or entrypoint.R here" in r.stderr, r.stderr


@pytest.mark.r
@pytest.mark.skipif(not HAVE_R, reason="needs R")
def test_run_with_no_argument_starts_the_plumber_file_here(corral, tmp_path):
    shutil.copy(EXAMPLE_R, tmp_path / "plumber.R")
    c = corral([], workers=1)
    assert "no APP given: serving" in c.log()
    assert get(c.port, "/echo?msg=hi").json()["msg"] == ["The message is: 'hi'"]


# --- the forgotten -- -------------------------------------------------------------------------------------
def test_a_forgotten_double_dash_gets_a_hint():
    r = corral_cli("run", "-w", "2", sys.executable, "-m", "http.server", "{port}")
    assert r.returncode == 2
    assert f"-- {sys.executable} -m http.server {{port}}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = corral_cli("run", sys.executable, STUB, "--port", "{port}")
    assert r.returncode == 2 and "put -- before the command" in r.stderr, r.stderr


def test_a_misspelt_app_file_gets_a_did_you_mean(tmp_path):
    (tmp_path / "plumber.R").write_text("#* @get /\nfunction() 'hi'\n")
    r = corral_cli("run", "plumbr.R", cwd=tmp_path)
    assert r.returncode == 2 and "did you mean 'plumber.R'?" in r.stderr, r.stderr
    r = corral_cli("run", "plumbr", cwd=tmp_path)  # no .R: read as a command, still a near miss of a file here
    assert r.returncode == 2 and "did you mean 'plumber.R'?" in r.stderr, r.stderr


# --- the README ----------------------------------------------------------------------------------------
def test_readme_says_how_to_get_corral_on_the_path_and_lists_the_new_verbs():
    readme = (ROOT / "README.md").read_text()
    assert "pipx install" in readme and ".venv/bin" in readme
    for verb in ("corral logs", "corral ls", "corral scale +"):
        assert verb in readme, verb
