"""Issue 14: the admin verbs as a new user meets them: `corral ls` lists the running instances, and
`corral scale +N/-N` is relative.

Real corral processes over real sockets; every wait is a bounded poll, nothing asserts on timing.
"""

from __future__ import annotations

import json
import sys

from conftest import STUB, chatty_args, corral_cli, stub_args


# --- corral ls --------------------------------------------------------------------------------------------
def test_ls_lists_the_running_instances(corral, tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(run)}
    a = corral(chatty_args(), workers=1, env=env)
    b = corral(["--name", "other", "--", sys.executable, STUB, "{port}"], workers=2, env=env)
    r = corral_cli("ls", env=env)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert str(a.port) in rows and str(b.port) in rows, r.stdout
    assert "chatty" in rows[str(a.port)] and "1/1" in rows[str(a.port)]
    assert "other" in rows[str(b.port)] and "2/2" in rows[str(b.port)]
    assert str(a.proc.pid) in rows[str(a.port)]
    doc = json.loads(corral_cli("ls", "--json", env=env).stdout)
    assert {i["port"] for i in doc} >= {a.port, b.port}
    b.stop()
    r = corral_cli("ls", env=env)
    assert str(a.port) in r.stdout and f"\n{b.port} " not in r.stdout


# --- relative scale ------------------------------------------------------------------------------------
def test_scale_plus_and_minus_are_relative(corral):
    c = corral(stub_args(), workers=2)
    r = corral_cli("scale", "+1", "-p", str(c.port))
    assert r.returncode == 0 and "3 workers ready" in r.stdout, r.stdout + r.stderr
    r = corral_cli("scale", "-2", "-p", str(c.port))
    assert r.returncode == 0 and "1 worker ready" in r.stdout, r.stdout + r.stderr
    r = corral_cli("scale", "-1", "-p", str(c.port))
    assert r.returncode == 2 and "would leave 0 workers" in r.stderr, r.stderr
    r = corral_cli("scale", "2", "-p", str(c.port))
    assert r.returncode == 0 and "2 workers ready" in r.stdout
