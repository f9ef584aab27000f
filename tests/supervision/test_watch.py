"""--watch: a rolling reload when the app's files change; a broken change keeps the old workers serving."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
from conftest import HAVE_R, corral_cli, get, read_response

from corral.config import AppConfig, ServerConfig
from corral.supervision.watch import watch_plan

needs_r = pytest.mark.skipif(not HAVE_R, reason="R is not installed (scripts/setup installs it)")

APP = """
#* @get /version
function() {{ list(version = "{v}") }}
"""
BROKEN = """
#* @get /version
function() { list(version = "oops"
"""


def replace(path: Path, text: str) -> None:
    """Save the way editors do: write a temporary file beside it, then rename it over the original."""
    tmp = path.with_name(f".{path.name}.swp")
    tmp.write_text(text)
    os.replace(tmp, path)


class LightLoad:
    """Two clients, one request at a time each, on keep-alive connections, at most `limit` requests
    each: every answer is kept, and anything but a 200 is a failure."""

    def __init__(self, port: int, path: str, limit: int = 5000) -> None:
        self.port, self.path, self.limit = port, path, limit
        self.stop = threading.Event()
        self.versions: list[str] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def __enter__(self) -> LightLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _run(self) -> None:
        raw = f"GET {self.path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
        sock, buf = None, bytearray()
        for _ in range(self.limit):
            if self.stop.is_set():
                break
            try:
                if sock is None:
                    sock, buf = socket.create_connection(("127.0.0.1", self.port), timeout=60), bytearray()
                sock.sendall(raw)
                r = read_response(sock, buf)
            except OSError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                sock = None
                continue
            if r.status == 200:
                self.versions.append(r.json()["version"][0])
            else:
                self.failures.append(f"{r.status} {r.body[:200]!r}")
        if sock is not None:
            sock.close()

    def wait_for_version(self, v: str, in_a_row: int = 20) -> None:
        """Until the last `in_a_row` answers are all `v` (bounded by the request limit, not a clock)."""
        while not self.stop.wait(0.05):
            tail = self.versions[-in_a_row:]
            if len(tail) == in_a_row and set(tail) == {v}:
                return
            if not any(t.is_alive() for t in self.threads):
                break
        raise AssertionError(f"never served only {v!r}: last answers {self.versions[-10:]}, {self.failures[:5]}")

    def answers_after(self, n: int, more: int = 20) -> list[str]:
        """The answers after the first `n`, once there are `more` of them."""
        while len(self.versions) < n + more and any(t.is_alive() for t in self.threads):
            self.stop.wait(0.05)
        return self.versions[n:]


# --- what is watched (no processes) ----------------------------------------------------------------
def test_r_app_watches_its_directory_for_r_sources(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "plumber.R").write_text("")
    env = tmp_path / "x.env"  # outside the app's directory: watched as well
    env.write_text("A=1\n")
    plan = watch_plan(AppConfig(plumber=str(app / "plumber.R"), env_file=str(env)), ServerConfig())
    assert plan.paths == [str(app.resolve()), str(env.resolve())]
    counts = plan.counts
    assert counts(str(app / "plumber.R")) and counts(str(app / "lib" / "helpers.r"))
    assert counts(str(app / "_server.yml")) and counts(str(app / ".Renviron"))
    assert counts(str(env.resolve()))
    assert not counts(str(app / "cache.rds")) and not counts(str(app / "out.csv"))  # data the app writes
    assert not counts(str(app / ".plumber.R.swp")) and not counts(str(app / ".#plumber.R"))
    assert not counts(str(app / "renv" / "activate.R"))
    inside = app / ".env"
    inside.write_text("A=1\n")
    plan = watch_plan(AppConfig(plumber=str(app), env_file=str(inside)), ServerConfig())
    assert plan.paths == [str(app.resolve())] and plan.counts(str(inside.resolve()))


def test_command_app_watches_the_directory_corral_runs_in_but_not_corral_logs(tmp_path):
    logs = tmp_path / "logs"
    server = ServerConfig(access_log=str(tmp_path / "access.log"), log_dir=str(logs))
    plan = watch_plan(AppConfig(command=["python3", "app.py"]), server, cwd=str(tmp_path))
    assert plan.paths == [str(tmp_path)]
    assert plan.counts(str(tmp_path / "app.py")) and plan.counts(str(tmp_path / "templates" / "a.html"))
    assert not plan.counts(str(tmp_path / "access.log")) and not plan.counts(str(logs / "app-0.log"))
    assert not plan.counts(str(tmp_path / "nohup.log")) and not plan.counts(str(tmp_path / ".git" / "index"))
    assert not plan.counts(str(tmp_path / "__pycache__" / "app.cpython-311.pyc"))


def test_watch_paths_replace_the_default(tmp_path):
    src = tmp_path / "src"
    plan = watch_plan(AppConfig(command=["x"], watch_paths=[str(src)]), ServerConfig(), cwd=str(tmp_path))
    assert plan.paths == [str(src)]
    assert plan.counts(str(src / "model.bin"))


def test_watch_with_upstreams_is_refused(tmp_path):
    toml = tmp_path / "corral.toml"
    toml.write_text('[[app]]\nupstreams = ["127.0.0.1:7000"]\nwatch = true\n')
    r = corral_cli("check", "-c", str(toml))
    assert r.returncode == 2 and "watch: has no effect with upstreams" in r.stdout + r.stderr


# --- the reload, with real R workers --------------------------------------------------------------------
@pytest.mark.r
@needs_r
def test_editing_the_r_file_changes_the_answer_without_a_failed_request(corral, tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    api = app / "plumber.R"
    api.write_text(APP.format(v="one"))
    c = corral(["--watch", str(api)], workers=2)
    c.wait_for(r"watching .*app.* for changes")
    assert get(c.port, "/version").json()["version"] == ["one"]
    with LightLoad(c.port, "/version") as load:
        load.wait_for_version("one", in_a_row=5)
        replace(api, APP.format(v="two"))
        c.wait_for(r"stopped: [^\n]*\(drained\)", count=2, timeout=120)  # both old workers replaced
        n = len(load.versions) + 2  # an answer read just before the log line may be appended after it
        after = load.answers_after(n)
    assert load.failures == []
    assert load.versions[0] == "one" and "two" in load.versions
    assert after and set(after) == {"two"}
    assert "plumber.R changed" in c.log()


@pytest.mark.r
@needs_r
def test_a_syntax_error_keeps_the_old_workers_and_prints_the_r_error(corral, tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    api = app / "plumber.R"
    api.write_text(APP.format(v="one"))
    c = corral(["--watch", str(api)], workers=2)
    c.wait_for(r"watching .*app.* for changes")
    with LightLoad(c.port, "/version") as load:
        replace(api, BROKEN)
        c.wait_for(r"reload aborted", timeout=90)
        n = len(load.versions)
        load.wait_for_version("one", in_a_row=5)
    assert load.failures == []
    assert set(load.versions[n:]) == {"one"}
    log = c.log()
    aborted = log[log.index("reload aborted") :].splitlines()[:16]
    # R's own parse error, printed with the abort by corral, not only in the worker's relayed output
    assert any("unexpected end of input" in line and "[app:" not in line for line in aborted), aborted
    assert get(c.port, "/version").json()["version"] == ["one"]
    replace(api, APP.format(v="three"))  # fixed: the next change goes live
    c.wait_for(r"stopped: [^\n]*\(drained\)", count=2, timeout=120)  # both old workers replaced
    assert {get(c.port, "/version").json()["version"][0] for _ in range(6)} == {"three"}
