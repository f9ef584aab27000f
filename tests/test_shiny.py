"""Issue 12: Shiny apps behind corral.

Without R: a Shiny app directory is recognised with no option (`corral run DIR`, `shiny = "DIR"` in
corral.toml), its workers are started with shiny::runApp, and stickiness defaults to a cookie.

With R and Debian's r-cran-shiny: the example app (examples/shiny) on 2 workers, driven by headless
Chromium over the DevTools protocol (tests/cdp.py): the page loads, the session connects over
WebSocket, an input changes an output the server renders, separate browser sessions land on both
workers, and a rolling reload with a session open fails no page load."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import HAVE_R, ROOT, corral_cli

from corral import config as C
from corral.cli import build_config
from corral.launch import worker_argv

EXAMPLE_SHINY = str(ROOT / "examples" / "shiny")
APP_R = "library(shiny)\nshinyApp(fluidPage('hi'), function(input, output) {})\n"


def _have_shiny() -> bool:
    if not HAVE_R:
        return False
    r = subprocess.run(["Rscript", "-e", 'quit(status=!requireNamespace("shiny"))'], capture_output=True, timeout=60)
    return r.returncode == 0


# --- recognition, without R -------------------------------------------------------------------------
def test_a_directory_with_app_r_calling_shinyapp_is_a_shiny_app(tmp_path):
    (tmp_path / "app.R").write_text(APP_R)
    cfg = build_config((str(tmp_path),), None, (), None, {})
    (app,) = cfg.apps
    assert app.shiny == str(tmp_path) and app.plumber is None and app.name == tmp_path.name
    assert C.sticky_mode(app) == "cookie"  # auto: a Shiny session lives in one process
    argv, cwd = worker_argv(app, 9001, 0)
    assert cwd == str(tmp_path)
    assert argv[-1] == (
        f'shiny::runApp("{tmp_path}", host = "127.0.0.1", port = as.integer(Sys.getenv(\'PORT\')), '
        "launch.browser = FALSE)"
    )


def test_ui_r_and_server_r_are_a_shiny_app_too(tmp_path):
    (tmp_path / "ui.R").write_text("fluidPage('hi')\n")
    (tmp_path / "server.R").write_text("function(input, output) {}\n")
    assert C.resolve_shiny(str(tmp_path)) == tmp_path.resolve()
    (app,) = build_config((str(tmp_path),), None, (), None, {"sticky": "ip"}).apps
    assert app.shiny and C.sticky_mode(app) == "ip"  # an explicit choice wins


def test_plumber_directories_stay_plumber_and_other_directories_say_what_is_missing(tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    (both / "plumber.R").write_text("#* @get /\nfunction() 1\n")
    (both / "app.R").write_text(APP_R)
    (app,) = build_config((str(both),), None, (), None, {}).apps
    assert app.plumber == str(both) and app.shiny is None and C.sticky_mode(app) == "none"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "app.R").write_text("cat('no shinyApp call here')\n")  # neither plumber nor Shiny
    with pytest.raises(C.ConfigError) as exc:
        build_config((str(plain),), None, (), None, {})
    assert "directory with plumber.R (or a Shiny app directory: app.R calling shinyApp()" in str(exc.value)


def test_shiny_key_in_corral_toml_is_relative_to_the_file_and_checked(tmp_path):
    (tmp_path / "dash").mkdir()
    (tmp_path / "dash" / "app.R").write_text(APP_R)
    toml = tmp_path / "corral.toml"
    toml.write_text('[[app]]\nname = "dash"\nshiny = "dash"\nworkers = 2\n')
    cfg = C.load_toml(toml)
    assert cfg.apps[0].shiny == str(tmp_path / "dash") and C.validate(cfg) == []
    if HAVE_R:
        r = corral_cli("check", "-c", str(toml), cwd="/")
        assert r.returncode == 0 and f"(shiny {tmp_path / 'dash'})" in r.stdout, r.stderr
    toml.write_text('[[app]]\nname = "dash"\nshiny = "nowhere"\n')
    assert any("shiny: " in p and "does not exist" in p for p in C.validate(C.load_toml(toml)))
    toml.write_text('[[app]]\nname = "dash"\nshiny = "dash"\ncommand = ["x"]\n')
    assert any("give exactly one of plumber, shiny, command, upstreams" in p for p in C.validate(C.load_toml(toml)))


def test_a_shiny_app_exports_with_cookie_stickiness(tmp_path):
    toml = tmp_path / "corral.toml"
    toml.write_text(f'[[app]]\nname = "dash"\nshiny = "{EXAMPLE_SHINY}"\nworkers = 2\nbase_port = 9100\n')
    r = corral_cli("export", "haproxy", "-c", str(toml))
    if r.returncode != 0 and "Rscript not found" in r.stderr:
        pytest.skip("R is not installed: the export checks the app can start")
    assert r.returncode == 0, r.stderr
    assert "cookie corral_sticky insert indirect nocache" in r.stdout
    assert "server dash1 127.0.0.1:9101 cookie s1" in r.stdout


# --- a real Shiny app in a real browser ------------------------------------------------------------------
HAVE_SHINY = _have_shiny()
NEEDS_SHINY = (
    pytest.mark.r,
    pytest.mark.skipif(not HAVE_SHINY, reason="R's shiny package is not installed (Debian: r-cran-shiny)"),
    pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed"),
)


def needs_shiny(fn):
    for mark in NEEDS_SHINY:
        fn = mark(fn)
    return fn


CONNECTED = (
    "window.Shiny && Shiny.shinyapp && Shiny.shinyapp.isConnected() && "
    "(document.getElementById('who').textContent.match(/^pid \\d+, worker \\d+$/) || [''])[0]"
)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    pytest.importorskip("websockets", reason="the websockets package (test extras) is not installed")
    from cdp import Browser

    b = Browser()
    yield b
    b.close()


@pytest.fixture
def shiny(corral):
    # A short drain deadline: a reload waits that long for a worker's open sessions.
    return corral([EXAMPLE_SHINY, "--graceful-timeout", "5"], workers=2)


def _who(text: str) -> tuple[int, int]:
    """'pid 123, worker 1' -> (123, 1)"""
    m = re.fullmatch(r"pid (\d+), worker (\d+)", text)
    assert m, text
    return int(m.group(1)), int(m.group(2))


def open_session(browser, url: str):
    """A new browser session (own cookies) on the app: loaded, connected; (tab, pid, worker index)."""
    tab = browser.tab()
    status = tab.load(url)
    assert status == 200 and tab.evaluate("document.title") == "corral + Shiny", status
    pid, index = _who(tab.wait(CONNECTED, timeout=60))
    return tab, pid, index


def _status(port: int) -> dict:
    r = corral_cli("status", "--json", "-p", str(port))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["apps"][0]


@needs_shiny
def test_shiny_session_connects_over_websocket_and_an_input_updates_the_output(shiny, browser):
    tab, pid, index = open_session(browser, shiny.url)
    try:
        assert shiny.worker_pids()[index] == pid  # the R process corral started for that index
        assert tab.wait("document.getElementById('out').textContent") == "n squared is 9"  # the initial n = 3
        tab.evaluate("Shiny.setInputValue('n', 5)")
        assert tab.wait("document.getElementById('out').textContent === 'n squared is 25'")
        app = _status(shiny.port)
        assert app["sticky"] == "cookie" and app["sessions"]["open"] == 1
        assert {w["index"]: w["sessions"] for w in app["workers"]}[index] == 1
        cookie = tab.evaluate("document.cookie")  # HttpOnly: the page cannot read corral's cookie
        assert "corral_sticky" not in (cookie or "")
    finally:
        tab.close()


@needs_shiny
def test_browser_sessions_land_on_both_workers_and_each_sticks_to_its_own(shiny, browser):
    tabs = []
    try:
        for _ in range(4):
            tabs.append(open_session(browser, shiny.url))
        assert {index for _, _, index in tabs} == {0, 1}, tabs
        for tab, pid, _ in tabs[:2]:  # a page reload in the same browser session: the same R process
            assert tab.load(shiny.url) == 200
            assert _who(tab.wait(CONNECTED, timeout=60))[0] == pid
        deadline = time.monotonic() + 30  # the reloaded pages' old sessions close as the new ones open
        while (app := _status(shiny.port))["sessions"]["open"] != len(tabs):
            assert time.monotonic() < deadline, app["sessions"]
            time.sleep(0.2)
        per_worker = {w["index"]: w["sessions"] for w in app["workers"]}
        assert per_worker == {i: sum(1 for _, _, x in tabs if x == i) for i in (0, 1)}
        assert app["sessions"]["opened"] >= len(tabs) + 2
    finally:
        for tab, _, _ in tabs:
            tab.close()


@needs_shiny
def test_rolling_reload_with_a_session_open_fails_no_page_load(shiny, browser):
    old = set(shiny.worker_pids().values())
    held, held_pid, _ = open_session(browser, shiny.url)
    held.evaluate("Shiny.setInputValue('n', 6)")
    assert held.wait("document.getElementById('out').textContent === 'n squared is 36'")
    reload = subprocess.Popen(
        [sys.executable, "-m", "corral", "reload", "-p", str(shiny.port), "--timeout", "180"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    loads = 0
    try:
        while reload.poll() is None and loads < 100:  # page loads all through the reload
            tab, _, _ = open_session(browser, shiny.url)
            tab.close()
            loads += 1
        out, _ = reload.communicate(timeout=180)
    finally:
        if reload.poll() is None:
            reload.kill()
            reload.wait()
    assert reload.returncode == 0, out
    assert loads >= 1
    new = set(shiny.worker_pids().values())
    assert new.isdisjoint(old) and len(new) == 2, (old, new)
    tab, pid, _ = open_session(browser, shiny.url)  # after the reload: a fresh load connects, to a new worker
    tab.close()
    assert pid in new
    # The held session's worker is gone: its session was closed (at graceful_timeout at the latest) and,
    # with allowReconnect("force"), the page reconnected by itself to a new worker.
    deadline = time.monotonic() + 60
    while (who := held.evaluate(CONNECTED)) in (None, False, "") or _who(who)[0] == held_pid:
        assert time.monotonic() < deadline, f"the held page never reconnected (shows {who!r})"
        time.sleep(0.2)
    assert _who(who)[0] in new
    held.evaluate("Shiny.setInputValue('n', 7)")  # the new session computes for it
    assert held.wait("document.getElementById('out').textContent === 'n squared is 49'")
    held.close()
