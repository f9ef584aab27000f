"""Issue 5: corral.toml, `corral check`, command-line overrides, and the generated reference."""

from __future__ import annotations

import math
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLE_R, ROOT, STUB, corral_cli, get, plumber_transport

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
    where = "127.0.0.1:9000-9003" if plumber_transport() == "tcp" else "unix sockets"
    assert f"api /api -> 4 workers on {where} (plumber {tmp_path / 'api' / 'plumber.R'})" in line
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
        "app 'two sources': give exactly one of plumber, shiny, command, upstreams (got plumber, command)",
        "app 'web': health_interval: must be >= 0.05 (got 0.0)",
        "app 'web': health_path: must start with / (got 'health')",
        "app 'web': name: used by another app; names must be unique",
        "app 'web': worker_host: must be an IP address such as 0.0.0.0 (got 'localhost')",
        "app 'web': base_port: port 9000 is also used by app 'api'",
        "app 'web': base_port: must be <= 65535 (got 70000)",
        "app 'legacy': upstreams: 127.0.0.1:8000 is the public listener of this corral",
    ]
    assert sorted(got) == sorted(expected)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[[app]]\nname = 'a'\ncommand = ['x'\n", "not valid TOML: "),
        ("[server]\nport = 0\n[[app]]\nname='a'\n" + STUB_CMD, "server: port: must be >= 1 (got 0)"),
        ("[[app]]\nname = 'a'\n", "app 'a': give exactly one of plumber, shiny, command, upstreams (got none)"),
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
            "[[app]]\nname='a'\nupstreams=['127.0.0.1:7000']\nworker_scheduling='normal'\n",
            "app 'a': worker_scheduling: has no effect with upstreams",
        ),
        ("[[app]]\nname='a'\nworker_scheduling='fifo'\n" + STUB_CMD, "app 'a': worker_scheduling: must be one of"),
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
@pytest.mark.unit
def test_docs_reference_table_is_the_generated_one():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert C.update_reference(doc) == doc, (
        "docs/configuration.md is out of date: run python -m corral.config --update docs/configuration.md"
    )
    for f in [*C.fields_of(C.ServerConfig), *C.fields_of(C.AppConfig)]:
        assert f"| `{f.name}` |" in doc


@pytest.mark.unit
def test_every_run_option_is_a_toml_key_of_the_same_name(tmp_path):
    """The CLI is generated from the model: each option's key is accepted in the file as-is."""
    for cls, table in ((C.ServerConfig, "[server]"), (C.AppConfig, "[[app]]")):
        for f in C.fields_of(cls):
            value = C.AppConfig() if cls is C.AppConfig else C.ServerConfig()
            default = getattr(value, f.name)
            if default is None or f.name in ("name", "command", "plumber", "upstreams"):
                continue
            raw = {f.name: default}
            built = C.build_section(cls, raw, table, problems := [])
            assert problems == [] and getattr(built, f.name) == default, (f.name, problems)


# --- issue 11: every knob bounded; reproductions that must be one-line errors with exit 2 -------
NUMERIC = [
    (cls, f)
    for cls in (C.ServerConfig, C.AppConfig)
    for f in C.fields_of(cls)
    if C.base_type(cls, f.name) in (int, float) and not f.metadata["flag"]
]
FLOAT_KNOBS = [(cls, f.name) for cls, f in NUMERIC if C.base_type(cls, f.name) is float]


def one_line_run_error(*args: str) -> str:
    """`corral run ARGS` refused before anything starts: exit 2 and one `corral: ...` line, no traceback."""
    r = corral_cli("run", *args, timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "starting" not in r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("corral: "), r.stderr
    return lines[0]


@pytest.mark.unit
def test_every_numeric_knob_has_a_minimum_and_a_maximum_around_its_default():
    for _cls, f in NUMERIC:
        lo, hi = f.metadata["minimum"], f.metadata["maximum"]
        assert lo is not None and hi is not None, f.name
        assert lo < hi and math.isfinite(hi), f.name
        if f.default is not None:
            assert lo <= f.default <= hi, f.name
    assert C.ServerConfig.__dataclass_fields__["port"].metadata["maximum"] == 65535
    assert C.AppConfig.__dataclass_fields__["base_port"].metadata["maximum"] == 65535


@pytest.mark.unit
def test_reference_table_shows_each_range():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert "| key | CLI | default | unit | range | meaning | on breach |" in doc
    row = next(line for line in doc.splitlines() if line.startswith("| `port` | `-p, --port` |"))
    assert "| 1 .. 65535 |" in row
    row = next(line for line in doc.splitlines() if line.startswith("| `response_buffer` | `--response-buffer` |"))
    assert "| 0 .. 1 GiB |" in row
    row = next(line for line in doc.splitlines() if line.startswith("| `request_timeout` | `--request-timeout` |"))
    assert "| 0.01 s .. 30 d |" in row


def test_run_refuses_a_public_port_above_65535_in_one_line():
    line = one_line_run_error("-p", "70000", "--", "python3", "-m", "http.server", "{port}")
    assert line == "corral: command line: server: port: must be <= 65535 (got 70000)"
    # with the worker ports elsewhere, this used to reach bind() and end in a traceback
    line = one_line_run_error("-p", "70000", "--base-port", "9000", "--", "python3", "-m", "http.server", "{port}")
    assert line == "corral: command line: server: port: must be <= 65535 (got 70000)"


def test_check_refuses_a_public_port_above_65535(tmp_path):
    got = problems(check(tmp_path, f"[server]\nport = 70000\n[[app]]\nname='a'\n{STUB_CMD}\n"), tmp_path)
    assert got == ["server: port: must be <= 65535 (got 70000)"]


@pytest.mark.parametrize("n", [10**20, 10**15, 4097])
def test_huge_worker_counts_are_refused_without_building_anything(tmp_path, n):
    # 10**20 is beyond TOML's 64-bit integers, but Python's TOML reader accepts it: refuse both.
    for key in ("workers", "max_workers", "min_workers", "reserve"):
        got = problems(check(tmp_path, f"[[app]]\nname='a'\n{STUB_CMD}\n{key} = {n}\n"), tmp_path)
        assert f"app 'a': {key}: must be <= 4096 (got {n})" in got, got
    line = one_line_run_error("-w", str(n), "--", sys.executable, STUB, "{port}")
    assert line == f"corral: command line: app '{Path(sys.executable).name}': workers: must be <= 4096 (got {n})"


@pytest.mark.parametrize(("cls", "key"), FLOAT_KNOBS, ids=[k for _, k in FLOAT_KNOBS])
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_for_every_duration(tmp_path, cls, key, bad):
    table = "[server]\n" if cls is C.ServerConfig else ""
    app = f"[[app]]\nname='a'\n{STUB_CMD}\n"
    body = f"{table}{key} = {bad}\n{app}" if table else f"{app}{key} = {bad}\n"
    got = problems(check(tmp_path, body), tmp_path)
    where = "server" if cls is C.ServerConfig else "app 'a'"
    assert got == [f"{where}: {key}: must be a finite number (got {float(bad)!r})"]


def test_a_nan_health_timeout_is_refused_on_the_command_line_too():
    line = one_line_run_error("--health-timeout", "nan", "--", sys.executable, STUB, "{port}")
    assert line.endswith("health_timeout: must be a finite number (got nan)")
    line = one_line_run_error("--queue-timeout", "1e400", "--", sys.executable, STUB, "{port}")
    assert line.endswith("queue_timeout: must be a finite number (got inf)")


def test_an_integer_too_large_for_a_float_is_refused(tmp_path):
    got = problems(check(tmp_path, f"[[app]]\nname='a'\n{STUB_CMD}\nrequest_timeout = 1{'0' * 400}\n"), tmp_path)
    assert len(got) == 1 and got[0].startswith("app 'a': request_timeout: must be a finite number"), got
    got = problems(check(tmp_path, f"[[app]]\nname='a'\n{STUB_CMD}\nworkers = {'1' * 5000}\n"), tmp_path)
    assert len(got) == 1 and got[0].startswith("not valid TOML: "), got


@pytest.mark.parametrize(
    "spec", ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1", "127.0.0.1:abc", ":9000", "unix:", "[::1]:65536"]
)
def test_check_validates_the_admin_address(tmp_path, spec):
    got = problems(check(tmp_path, f"[server]\nadmin = '{spec}'\n[[app]]\nname='a'\n{STUB_CMD}\n"), tmp_path)
    assert got == [f"server: admin: must be HOST:PORT with a port in 1..65535, or unix:/path (got {spec!r})"]


@pytest.mark.parametrize("spec", ["127.0.0.1:9999", "[::1]:9999", "0.0.0.0:9999", "unix:/tmp/x.sock"])
def test_check_accepts_good_admin_addresses(tmp_path, spec):
    r = check(tmp_path, f"[server]\nadmin = '{spec}'\n[[app]]\nname='a'\nworkers=1\n{STUB_CMD}\n")
    assert r.returncode == 0, r.stderr


def test_admin_port_may_be_neither_the_public_port_nor_a_worker_port(tmp_path):
    got = problems(check(tmp_path, f"[server]\nadmin = '127.0.0.1:8000'\n[[app]]\nname='a'\n{STUB_CMD}\n"), tmp_path)
    assert got == [
        "server: admin: port 8000 is the public port; the admin channel is never served there: "
        "choose another port or unix:/path"
    ]
    got = problems(
        check(tmp_path, f"[server]\nadmin = '127.0.0.1:8002'\n[[app]]\nname='a'\nworkers=4\n{STUB_CMD}\n"), tmp_path
    )
    assert got == ["app 'a': base_port: port 8002 is also used by the admin channel"]
    line = one_line_run_error("--admin", "127.0.0.1:99999", "--", sys.executable, STUB, "{port}")
    assert line.endswith(
        "server: admin: must be HOST:PORT with a port in 1..65535, or unix:/path (got '127.0.0.1:99999')"
    )


def test_run_refuses_worker_ports_without_room_for_replacements():
    line = one_line_run_error("--base-port", "65534", "-w", "2", "--", sys.executable, STUB, "{port}")
    assert ": base_port: " in line and "65536-65537" in line and "set base_port to 65532 or lower" in line


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            "base_port = 65535\nworkers = 2",
            "base_port: workers need ports 65535-65536, past 65535: "
            "set base_port to 65532 or lower, or run fewer workers",
        ),
        (
            "base_port = 65500\nworkers = 20",
            "base_port: no room for replacements: a rolling reload starts them on "
            "the 20 ports just above the range (65520-65539), past 65535: "
            "set base_port to 65496 or lower, or run fewer workers",
        ),
        (
            "base_port = 62000\nworkers = 2\nmax_workers = 4000",
            "base_port: workers need ports 62000-65999, past 65535: set base_port to 57536 or lower",
        ),
    ],
)
def test_check_refuses_worker_ranges_that_do_not_fit(tmp_path, keys, expected):
    got = problems(check(tmp_path, f"[[app]]\nname='a'\n{STUB_CMD}\n{keys}\n"), tmp_path)
    assert len(got) == 1 and got[0].startswith(f"app 'a': {expected}"), got


def test_check_refuses_a_default_base_port_that_does_not_fit(tmp_path):
    got = problems(check(tmp_path, f"[server]\nport = 65530\n[[app]]\nname='a'\nworkers = 4\n{STUB_CMD}\n"), tmp_path)
    assert len(got) == 1 and "set base_port to 65528 or lower" in got[0] and "public port + 1" in got[0], got


def test_check_accepts_a_range_with_exactly_enough_room_above_it(tmp_path):
    r = check(tmp_path, f"[[app]]\nname='a'\n{STUB_CMD}\nbase_port = 65532\nworkers = 2\n")
    assert r.returncode == 0, r.stderr
    assert "2 workers on 127.0.0.1:65532-65533" in r.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-p", "abc"], "corral: command line: --port: must be an integer (got 'abc')"),
        (["-w", "2.5"], "corral: command line: --workers: must be an integer (got '2.5')"),
        (["--queue-timeout", "soon"], "corral: command line: --queue-timeout: must be a number (got 'soon')"),
        (["--dispatch", "lifo"], "must be one of cost, fifo (got 'lifo')"),
        (["--log-format", "xml"], "corral: command line: server: log_format: must be one of text, json (got 'xml')"),
        (["--send-timeout", "0"], "corral: command line: server: send_timeout: must be >= 1 (got 0.0)"),
        (["--max-body", str(2**40)], f"corral: command line: server: max_body: must be <= {64 * 2**30} (got {2**40})"),
    ],
)
def test_bad_command_line_values_are_one_line_errors(args, expected):
    line = one_line_run_error(*args, "--", sys.executable, STUB, "{port}")
    assert line == expected or (not expected.startswith("corral:") and line.endswith(expected)), line


def test_bad_values_on_the_command_line_are_listed_together():
    r = corral_cli("run", "-p", "abc", "--max-queue", "-1", "--", sys.executable, STUB, "{port}", timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == "corral: command line: --port: must be an integer (got 'abc')"
    assert lines[1].endswith("max_queue: must be >= 0 (got -1)") and len(lines) == 2, lines


def test_a_directory_given_as_the_config_is_one_line(tmp_path):
    for verb in ("check", "run"):
        r = corral_cli(verb, "-c", str(tmp_path), timeout=30)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
        assert r.stderr.strip().endswith(f"{tmp_path}: is a directory, not a corral.toml")


def test_check_reports_a_bad_file_and_bad_ranges_for_export_too(tmp_path):
    path = tmp_path / "corral.toml"
    path.write_text(f"[[app]]\nname='a'\n{STUB_CMD}\nkill_timeout = inf\n")
    r = corral_cli("export", "systemd", "-c", str(path))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"{path}: app 'a': kill_timeout: must be a finite number (got inf)"


# --- issue 11: new knobs ---------------------------------------------------------------------------
@pytest.mark.unit
def test_new_knobs_and_their_defaults():
    app, server = C.AppConfig(), C.ServerConfig()
    assert app.response_buffer == 4 * 1024 * 1024 and app.response_buffer_file == 1024**3
    assert server.send_timeout == 60.0
    assert app.request_timeout == 300.0
    assert server.max_connections is None
    fields = {f.name: f.metadata for cls in (C.ServerConfig, C.AppConfig) for f in C.fields_of(cls)}
    assert (fields["response_buffer"]["minimum"], fields["response_buffer"]["maximum"]) == (0, 1024**3)
    assert (fields["response_buffer_file"]["minimum"], fields["response_buffer_file"]["maximum"]) == (0, 64 * 1024**3)
    assert (fields["send_timeout"]["minimum"], fields["send_timeout"]["maximum"]) == (1, 86400)
    assert (fields["request_timeout"]["minimum"], fields["request_timeout"]["maximum"]) == (0.01, 30 * 86400)
    assert fields["response_buffer"]["breach"] == "further bytes go to a temporary file"
    assert "back-pressure" in fields["response_buffer_file"]["breach"]
    assert "counted as cut" in fields["send_timeout"]["breach"]
    assert "SIGSTOP" in fields["request_timeout"]["help"] + fields["request_timeout"]["breach"]
    assert fields["max_connections"]["breach"] == "new connections get 503 and close"
    assert "ceiling for `corral scale`" in fields["max_workers"]["help"]
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert "300" in doc and "SIGSTOP" in doc and "open-file limit" in doc


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (f"response_buffer = {2**30 + 1}", f"app 'a': response_buffer: must be <= {2**30} (got {2**30 + 1})"),
        ("response_buffer_file = -1", "app 'a': response_buffer_file: must be >= 0 (got -1)"),
        ("request_timeout = 0", "app 'a': request_timeout: must be >= 0.01 (got 0.0)"),
        (f"request_timeout = {30 * 86400 + 1}", f"app 'a': request_timeout: must be <= {30 * 86400} "),
    ],
)
def test_new_app_knobs_are_checked(tmp_path, body, expected):
    got = problems(check(tmp_path, f"[[app]]\nname='a'\n{STUB_CMD}\n{body}\n"), tmp_path)
    assert len(got) == 1 and got[0].startswith(expected), got


def test_new_server_knobs_are_checked_and_max_connections_may_exceed_this_machine(tmp_path):
    got = problems(check(tmp_path, f"[server]\nsend_timeout = 0.5\n[[app]]\nname='a'\n{STUB_CMD}\n"), tmp_path)
    assert got == ["server: send_timeout: must be >= 1 (got 0.5)"]
    # more than this machine's open-file limit allows is not a config error: limits differ per machine
    r = check(tmp_path, f"[server]\nmax_connections = 1000000\n[[app]]\nname='a'\nworkers=1\n{STUB_CMD}\n")
    assert r.returncode == 0, r.stderr


# --- issue 11: connection budget and worker ceiling (pure functions) -----------------------------
def _cfg(*apps: C.AppConfig, **server) -> C.Config:
    return C.Config(server=C.ServerConfig(**server), apps=list(apps))


@pytest.mark.unit
def test_connection_budget_leaves_room_for_upstreams_workers_and_a_reserve():
    one = _cfg(C.AppConfig(workers=1, command=["x"]))
    many = _cfg(C.AppConfig(workers=64, command=["x"]))
    for cfg in (one, many):
        for nofile in (1024, 4096, 65536, 1 << 20):
            budget = C.connection_budget(nofile, cfg)
            reserved = C.reserved_fds(cfg)
            assert budget >= 1
            if nofile > reserved + 2:
                # a client connection and its upstream connection each, plus what corral keeps for itself
                assert 2 * budget + reserved <= nofile < 2 * (budget + 1) + reserved
    assert C.reserved_fds(one) >= 64 + 4  # the reserve, one worker's 3 pipes and its probe
    assert C.reserved_fds(many) > C.reserved_fds(one) + 63 * 4
    assert C.connection_budget(65536, many) < C.connection_budget(65536, one)
    assert C.connection_budget(10, many) == 1  # never zero
    assert C.connection_budget(-1, one) > 100000  # RLIM_INFINITY


@pytest.mark.unit
def test_worker_ceiling():
    cpus = os.cpu_count() or 1
    assert C.worker_ceiling(C.AppConfig(max_workers=7), nofile=1 << 20) == 7
    assert C.worker_ceiling(C.AppConfig(), nofile=1 << 20) == max(4 * cpus, 16)
    assert C.worker_ceiling(C.AppConfig(), nofile=64 + 8 * 5) == 5  # bounded by the fd limit
    assert C.worker_ceiling(C.AppConfig(), nofile=10) == 1  # at least one
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert C.worker_ceiling(C.AppConfig()) == C.worker_ceiling(C.AppConfig(), nofile=hard)
