"""Issue 5: corral.toml, `corral check`, command-line overrides, and the generated reference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLE_R, ROOT, STUB, corral_cli, get

from corral import config as C

STUB_CMD = f'command = ["{sys.executable}", "{STUB}", "{{port}}"]'


def check(tmp: Path, body: str, name: str = "corral.toml") -> subprocess.CompletedProcess:
    path = tmp / name
    path.write_text(body)
    return corral_cli("check", "-c", str(path))


def problems(r: subprocess.CompletedProcess, tmp: Path, name: str = "corral.toml") -> list[str]:
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == ""
    prefix = f"{tmp / name}: "
    lines = r.stderr.splitlines()
    assert all(line.startswith(prefix) for line in lines), lines  # every line names the file
    return [line[len(prefix) :] for line in lines]


# --- a good file -----------------------------------------------------------------------------
def test_check_accepts_a_good_file_with_a_one_line_summary(tmp_path):
    (tmp_path / "api").mkdir()
    shutil.copy(EXAMPLE_R, tmp_path / "api" / "plumber.R")
    r = check(
        tmp_path,
        f"""
[server]
host = "0.0.0.0"
port = 8000

[[app]]
name = "api"
route = "/api/"
strip_prefix = true
plumber = "api/plumber.R"        # relative to the file, not to the cwd
workers = 4
base_port = 9000
env = {{ DB_URL = "postgres://x" }}

[[app]]
name = "py"
route = "/py"
{STUB_CMD}
workers = 2

[[app]]
name = "legacy"
route = "/legacy"
upstreams = ["127.0.0.1:7000-7003", "10.0.0.5:7000"]
""",
    )
    if shutil.which("Rscript") is None:
        pytest.skip("Rscript not installed: check rightly refuses plumber apps")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and len(r.stdout.splitlines()) == 1
    line = r.stdout.strip()
    assert line.startswith(f"{tmp_path / 'corral.toml'}: ok: 3 apps on 0.0.0.0:8000: ")
    assert f"api /api -> 4 workers on 127.0.0.1:9000-9003 (plumber {tmp_path / 'api' / 'plumber.R'})" in line
    assert "py /py -> 2 workers on 127.0.0.1:9004-9005" in line  # default: after the previous app
    assert "legacy /legacy -> 5 upstreams" in line


def test_workers_left_out_means_one_per_cpu(tmp_path):
    r = check(tmp_path, f"[[app]]\nname = 'py'\n{STUB_CMD}\n")
    n = os.cpu_count()
    assert r.returncode == 0 and f"py / -> {n} worker{'s' * (n != 1)} on 127.0.0.1:8001" in r.stdout


@pytest.mark.parametrize(
    "path", ["examples/corral.toml", *sorted(p.name for p in (ROOT / "examples/multi").glob("*.toml"))]
)
def test_shipped_examples_pass_check(path):
    full = ROOT / path if "/" in path else ROOT / "examples" / "multi" / path
    if shutil.which("Rscript") is None and "plumber" in full.read_text():
        pytest.skip("Rscript not installed")
    r = corral_cli("check", "-c", str(full), cwd=Path("/"))  # from anywhere: paths are the file's
    assert r.returncode == 0, r.stderr


# --- bad files: every problem at once, each naming file, app and key -------------------------
def test_check_lists_every_problem_of_a_bad_file_at_once(tmp_path):
    r = check(
        tmp_path,
        f"""
[servers]
port = 8000

[server]
port = 8000
log_format = "xml"
workers = 3
trusted_proxies = "10.0.0.0/8,not-a-net"
host = "my-host"

[[app]]
name = "api"
route = "/api"
plumber = "api/plumber.R"
workers = 0
max_inflite = 2
max-queue = 5
port = 9000
base_port = 9000

[[app]]
name = "web"
route = "/api/"
{STUB_CMD}
workers = "4"
env = {{ DB_PORT = 5432 }}
base_port = 9000

[[app]]
name = "legacy"
route = "legacy"
upstreams = ["10.0.0.5", "127.0.0.1:8000", "10.0.0.6:7000-7001", "10.0.0.6:7001"]
workers = 2

[[app]]
name = "two sources"
route = "/two"
command = ["x"]
plumber = "x.R"

[[app]]
name = "web"
route = "/api/v2"
strip_prefix = true
{STUB_CMD}
health_path = "health"
health_interval = 0
worker_host = "localhost"
base_port = 70000
""",
    )
    got = problems(r, tmp_path)
    plumber = tmp_path / "api" / "plumber.R"
    expected = [
        "servers: unknown section (did you mean 'server'?)",
        "server: workers: belongs in an [[app]] table",
        "app 'api': max_inflite: unknown key (did you mean 'max_inflight'?)",
        "app 'api': max-queue: unknown key (keys use underscores: 'max_queue')",
        "app 'api': port: belongs in [server]",
        "app 'web': workers: must be an integer (got '4')",
        "app 'web': env: DB_PORT: must be a string (got 5432); quote it: DB_PORT = \"5432\"",
        "server: log_format: must be one of text, json (got 'xml')",
        "server: trusted_proxies: 'not-a-net' is not an address or CIDR",
        "server: host: must be an IP address such as 0.0.0.0 (got 'my-host')",
        "app 'api': workers: must be >= 1 (got 0)",
        f"app 'api': plumber: '{plumber}' does not exist",
        "app 'web': route: '/api' is already claimed by app 'api'",
        "app 'legacy': route: must start with / (got 'legacy')",
        "app 'legacy': workers: has no effect with upstreams (workers corral does not start)",
        "app 'legacy': upstreams: '10.0.0.5' must be HOST:PORT or HOST:LO-HI",
        "app 'legacy': upstreams: 10.0.0.6:7001 is listed twice",
        "app 'two sources': name: use letters, digits, '-', '_' or '.' (got 'two sources')",
        "app 'two sources': give exactly one of plumber, command, upstreams (got plumber, command)",
        "app 'web': health_interval: must be >= 0.05 (got 0.0)",
        "app 'web': health_path: must start with / (got 'health')",
        "app 'web': name: used by another app; names must be unique",
        "app 'web': worker_host: must be an IP address such as 0.0.0.0 (got 'localhost')",
        "app 'web': base_port: port 9000 is also used by app 'api'",
        "app 'web': base_port: port 70000 is above 65535",
        "app 'legacy': upstreams: 127.0.0.1:8000 is the public listener of this corral",
    ]
    assert sorted(got) == sorted(expected)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[[app]]\nname = 'a'\ncommand = ['x'\n", "not valid TOML: "),
        ("[server]\nport = 0\n[[app]]\nname='a'\n" + STUB_CMD, "server: port: must be >= 1 (got 0)"),
        ("[[app]]\nname = 'a'\n", "app 'a': give exactly one of plumber, command, upstreams (got none)"),
        ("app = 3\n", "app: must be [[app]] tables (got 3)"),
        ("server = 3\n[[app]]\nname='a'\n" + STUB_CMD, "server: must be a table"),
        ("port = 8000\n[[app]]\nname='a'\n" + STUB_CMD, "port: belongs in [server]"),
        ("[[app]]\nname='a'\nroute='/a b'\n" + STUB_CMD, "app 'a': route: must be a plain path prefix such as /api"),
        (
            "[[app]]\nname='a'\nstrip_prefix=true\n" + STUB_CMD,
            "app 'a': strip_prefix: route '/' has no prefix to strip",
        ),
        ("[[app]]\nname='a'\nupstreams=['h:1-9999']\n", "app 'a': upstreams: 'h:1-9999': port range must be"),
        ("[[app]]\nname='a'\ncommand=['x', 3]\n", "app 'a': command: must be a list of strings (got ['x', 3])"),
        (
            "[[app]]\nname='a'\nupstreams=['127.0.0.1:7000']\nenv={A='1'}\n",
            "app 'a': env: has no effect with upstreams",
        ),
        (
            "[[app]]\nname='a'\ncommand=['no-such-binary-xyz', '{port}']\n",
            "app 'a': command: 'no-such-binary-xyz' not found",
        ),
        ("", "no app: give a plumber file, a command after --, --upstream, or [[app]]"),
        (
            "[[app]]\nname='a'\nbase_port=8000\n" + STUB_CMD,
            "app 'a': base_port: port 8000 is also used by the public listener",
        ),
        (
            "[[app]]\nname='a'\nmax_workers=4\nbase_port=9000\n" + STUB_CMD + "\n[[app]]\nname='b'\nroute='/b'\n"
            "base_port=9003\n" + STUB_CMD,
            "app 'b': base_port: port 9003 is also used by app 'a'",
        ),
    ],
    ids=lambda v: v.split("\n")[0][:30] if isinstance(v, str) else None,
)
def test_check_names_the_problem(tmp_path, body, expected):
    got = problems(check(tmp_path, body), tmp_path)
    assert any(line.startswith(expected) for line in got), got


def test_check_reports_a_missing_file_and_exit_2(tmp_path):
    r = corral_cli("check", "-c", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and r.stderr.strip() == f"{tmp_path / 'nope.toml'}: no such file"


def test_run_refuses_a_bad_file_before_starting_anything(tmp_path):
    path = tmp_path / "corral.toml"
    path.write_text(f"[[app]]\nname = 'a'\nworkers = 0\n{STUB_CMD}\n")
    r = subprocess.run(
        [sys.executable, "-m", "corral", "run", "-c", str(path)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"corral: {path}: app 'a': workers: must be >= 1 (got 0)"
    assert "starting" not in r.stdout


# --- command line over file --------------------------------------------------------------------
def test_command_line_options_override_the_file_for_a_single_app(corral, tmp_path):
    path = tmp_path / "corral.toml"
    path.write_text(f"[[app]]\nname = 'py'\n{STUB_CMD}\nworkers = 1\nmax_inflight = 1\n")
    c = corral(["-c", str(path), "--name", "renamed"], workers=3)
    assert "all workers ready (renamed x3)" in c.log()
    assert len({get(c.port, "/x").json()["pid"] for _ in range(9)}) == 3


def test_per_app_options_are_refused_with_several_apps(tmp_path):
    path = tmp_path / "corral.toml"
    path.write_text(f"[[app]]\nname='a'\n{STUB_CMD}\n[[app]]\nname='b'\nroute='/b'\n{STUB_CMD}\n")
    r = corral_cli("run", "-c", str(path), "-w", "3")
    assert r.returncode == 2
    assert "per-app options on the command line need a single [[app]]" in r.stderr


def test_workers_zero_is_refused_on_the_command_line_too(tmp_path):
    r = corral_cli("run", "-w", "0", "--", sys.executable, STUB, "{port}")
    assert r.returncode == 2 and "app 'python" in r.stderr and "workers: must be >= 1 (got 0)" in r.stderr


# --- the reference in docs/configuration.md ------------------------------------------------------
def test_docs_reference_table_is_the_generated_one():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert C.update_reference(doc) == doc, (
        "docs/configuration.md is out of date: run python -m corral.config --update docs/configuration.md"
    )
    for f in [*C.fields_of(C.ServerConfig), *C.fields_of(C.AppConfig)]:
        assert f"| `{f.name}` |" in doc


def test_every_run_option_is_a_toml_key_of_the_same_name(tmp_path):
    """The CLI is generated from the model: each option's key is accepted in the file as-is."""
    for cls, table in ((C.ServerConfig, "[server]"), (C.AppConfig, "[[app]]")):
        for f in C.fields_of(cls):
            value = C.AppConfig() if cls is C.AppConfig else C.ServerConfig()
            default = getattr(value, f.name)
            if default is None or f.name in ("name", "command", "plumber", "upstreams"):
                continue
            raw = {f.name: default}
            built = C._build(cls, raw, table, problems := [])
            assert problems == [] and getattr(built, f.name) == default, (f.name, problems)
