"""Issue 14: corral's options: every one can come from a CORRAL_* variable, `check` and `export` take the
flags of `run`, and `run --help` shows defaults and value placeholders.

Real corral processes over real sockets; every wait is a bounded poll, nothing asserts on timing.
"""

from __future__ import annotations

import json
import re
import sys

from conftest import STUB, corral_cli, stub_args


# --- CORRAL_* environment variables --------------------------------------------------------------------
def test_every_option_can_come_from_a_corral_variable(corral):
    c = corral(
        stub_args(),
        workers=None,
        env={"CORRAL_WORKERS": "3", "CORRAL_MAX_QUEUE": "7", "CORRAL_NAME": "fromenv", "CORRAL_DOCS": "true"},
    )
    doc = json.loads(corral_cli("status", "--json", env={"CORRAL_PORT": str(c.port)}).stdout)
    (app,) = doc["apps"]
    assert app["name"] == "fromenv" and app["desired"] == 3 and app["queue"]["max"] == 7
    r = corral_cli("run", "--", sys.executable, STUB, "{port}", env={"CORRAL_WORKERS": "many"})
    assert r.returncode == 2
    assert r.stderr.strip() == "corral: environment: CORRAL_WORKERS: must be an integer (got 'many')"
    help_text = corral_cli("run", "--help").stdout
    assert "CORRAL_QUEUE_TIMEOUT" in help_text and "CORRAL_WORKERS" in help_text


# --- check and export take run's flags ----------------------------------------------------------------
def test_check_and_export_accept_the_flags_of_run():
    port = 18000
    cmd = ["--", sys.executable, STUB, "{port}"]
    r = corral_cli("check", "-w", "3", "-p", str(port), *cmd)
    assert r.returncode == 0, r.stderr
    assert f"3 workers on 127.0.0.1:{port + 1}-{port + 3}" in r.stdout
    r = corral_cli("export", "nginx", "-w", "2", "-p", str(port), *cmd)
    assert r.returncode == 0, r.stderr
    assert f"server 127.0.0.1:{port + 1} " in r.stdout and f"server 127.0.0.1:{port + 2} " in r.stdout
    r = corral_cli("export", "systemd", "-w", "2", "--max-queue", "9", *cmd)
    assert r.returncode == 0, r.stderr
    exec_start = next(line for line in r.stdout.splitlines() if line.startswith("ExecStart="))
    assert "run -w 2 --max-queue 9 -- " in exec_start and exec_start.endswith(f"{STUB} '{{port}}'")
    r = corral_cli("check", "-w", "0", *cmd)
    assert r.returncode == 2 and "workers: must be >= 1" in r.stderr


# --- run --help -------------------------------------------------------------------------------------------
def test_run_help_shows_defaults_and_value_placeholders():
    r = corral_cli("run", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())  # click wraps help lines
    for want in ("-w, --workers N", "--queue-timeout SECONDS", "--max-body BYTES", "--host HOST", "--admin ADDR"):
        assert want in text, want
    assert "[default: 30 s]" in text or "default: 30" in text
    assert re.search(r"--max-queue N .*default: 1000", text)
