"""Issue 12: Shiny apps behind corral.

Without R: a Shiny app directory is recognised with no option (`corral run DIR`, `shiny = "DIR"` in
corral.toml), its workers are started with shiny::runApp, and stickiness defaults to a cookie.

With R and Debian's r-cran-shiny: the example app (examples/shiny) on 2 workers, driven by headless
Chromium over the DevTools protocol (tests/support/cdp.py): the page loads, the session connects over
WebSocket, an input changes an output the server renders, separate browser sessions land on both
workers, and a rolling reload with a session open fails no page load.

Issue 20, on tests/apps/shiny_files (a download and an upload that name the process and session serving
them): a session's downloads and uploads reach its own process during a reload (its worker draining) and
after it, from an old tab and new ones; and four tabs of one browser (one cookie) spread over two workers,
each still reaching its session by the id in its paths."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import HAVE_R, ROOT, SUPPORT, corral_cli, poll

from corral import config as C
from corral.cli.main import build_config
from corral.supervision.launch import worker_argv

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
    from support.cdp import Browser

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


# --- issue 20: a session's downloads and uploads find its process, through reloads and across tabs --------
FILES_APP = str(SUPPORT / "apps" / "shiny_files")
WHO = "(document.getElementById('who').textContent.match(/^pid \\d+, worker \\d+$/) || [''])[0]"
FILES_CONNECTED = f"window.Shiny && Shiny.shinyapp && Shiny.shinyapp.isConnected() && {WHO}"
SESSION_ID = "Shiny.shinyapp.config && Shiny.shinyapp.config.sessionId"


@pytest.fixture
def files_app(corral, tmp_path):
    """tests/apps/shiny_files on 2 workers, with an access log; a long drain, so a reload's old worker
    keeps its sessions until they close (the tests close them)."""
    log = tmp_path / "access.log"
    c = corral([FILES_APP, "--graceful-timeout", "120", "--access-log", str(log)], workers=2)
    c.access_log = log
    return c


def files_session(tab, url: str | None = None) -> tuple[int, int, str]:
    """Load the page (unless `url` is None: it is loaded) and wait for its session: (pid, worker index, id)."""
    if url is not None:
        assert tab.load(url) == 200
        assert tab.evaluate("document.title") == "corral files"
    pid, index = _who(tab.wait(FILES_CONNECTED, timeout=60))
    return pid, index, tab.wait(SESSION_ID)


def download(tab, sid: str) -> tuple[int, str]:
    """What the browser gets for the page's download link (Shiny points it at session/<id>/download/down)."""
    href = tab.wait(
        f"(document.getElementById('down').href || '').includes('/session/{sid}/') && "
        "document.getElementById('down').href"
    )
    got = tab.evaluate(f"fetch({json.dumps(href)}).then(async r => [r.status, await r.text()])", await_promise=True)
    return got[0], got[1].strip()


def upload(tab, name: str) -> tuple[str, str, list[int]]:
    """Choose a file in the page's file input, as a user does; Shiny POSTs it to session/<id>/upload/<job>.
    Returns the progress bar's last word ('Upload complete', or Shiny's error), the app's `got` text, and
    the HTTP statuses the browser saw for the upload POSTs of this name."""
    tab.evaluate(
        "(() => { const dt = new DataTransfer();"
        f" dt.items.add(new File([{json.dumps(name + ' line 1')} + '\\n'], {json.dumps(name)}, {{type: 'text/csv'}}));"
        " const el = document.getElementById('up'); el.files = dt.files;"
        " el.dispatchEvent(new Event('change', {bubbles: true})); return true; })()"
    )
    bar = "document.querySelector('#up_progress .progress-bar')"
    # Finished either way: 'Upload complete' with its result rendered, or Shiny's error in the bar.
    tab.wait(
        f"{bar} && ({bar}.textContent === 'Upload complete' && "
        f"document.getElementById('got').textContent.includes({json.dumps(name)}) || "
        f"{bar}.classList.contains('progress-bar-danger') || /rror|Not Found/.test({bar}.textContent))",
        timeout=60,
    )
    statuses = tab.evaluate(
        "performance.getEntriesByType('resource').filter(e => e.name.includes('/upload/') && "
        "e.initiatorType === 'xmlhttprequest').map(e => e.responseStatus)"
    )
    return tab.evaluate(f"{bar}.textContent"), tab.evaluate("document.getElementById('got').textContent"), statuses


def _access(c, sid: str, kind: str) -> list[int]:
    """Statuses corral's access log has for session `sid`'s `kind` (download, upload) requests."""
    return [int(m.group(1)) for m in re.finditer(rf'/session/{sid}/{kind}/\S*" (\d+) ', c.access_log.read_text())]


def _assert_files_work(tab, sid: str, pid: int, index: int, name: str) -> None:
    status, body = download(tab, sid)
    assert (status, body) == (200, f"session {sid}, pid {pid}, worker {index}")
    bar, got, statuses = upload(tab, name)
    assert bar == "Upload complete" and got == f"got {name} ({name} line 1) in session {sid}, pid {pid}, worker {index}"
    assert statuses and statuses[-1] == 200, statuses


@needs_shiny
def test_downloads_and_uploads_reach_their_session_during_and_after_a_reload(files_app, browser):
    c = files_app
    old_pids = set(c.worker_pids().values())
    old = browser.tab()
    tabs = [old]
    try:
        pid, index, sid = files_session(old, c.url)
        _assert_files_work(old, sid, pid, index, "before.csv")
        c.proc.send_signal(signal.SIGHUP)  # rolling reload

        def reloaded():  # both slots replaced; the old tab's worker draining with its session
            workers = _status(c.port)["workers"]
            ready = {w["pid"] for w in workers if w["state"] == "ready"}
            return (
                len(ready) == 2
                and ready.isdisjoint(old_pids)
                and any(w["pid"] == pid and w["state"] == "draining" for w in workers)
            )

        poll("the reload to replace both workers", reloaded, timeout=90)
        new_pids = {w["pid"] for w in _status(c.port)["workers"] if w["state"] == "ready"}
        # During: the old tab's session lives on in its draining process, which gets all of its requests.
        assert old.evaluate(FILES_CONNECTED) == f"pid {pid}, worker {index}"
        _assert_files_work(old, sid, pid, index, "during.csv")
        # A new browser, and a new tab of the old browser (its cookie names the draining worker): both load
        # the page from a live worker, and their files go to it.
        for tab in (browser.tab(), old.sibling()):
            tabs.append(tab)
            tpid, tindex, tsid = files_session(tab, c.url)
            assert tpid in new_pids
            _assert_files_work(tab, tsid, tpid, tindex, f"new-{len(tabs)}.csv")
        # corral's account: every request of the old session got 200, and the draining worker held it.
        assert _access(c, sid, "download") == [200, 200] and _access(c, sid, "upload") == [200, 200]
        (draining,) = [w for w in _status(c.port)["workers"] if w["pid"] == pid]
        assert draining["state"] == "draining" and draining["sessions"] == 1
        # After: the old session ends (its socket closes, as when graceful_timeout passes), the old worker
        # drains and stops, and the old tab reconnects by itself to a live worker as a new session.
        old.evaluate("Shiny.shinyapp.$socket.close()")
        c.wait_for(rf"worker \S+:{index} stopping: drained")
        deadline = time.monotonic() + 60
        while (who := old.evaluate(FILES_CONNECTED)) in (None, False, "") or _who(who)[0] == pid:
            assert time.monotonic() < deadline, f"the old tab never reconnected (shows {who!r})"
            time.sleep(0.2)
        npid, nindex, nsid = files_session(old)
        assert npid in new_pids and nsid != sid
        _assert_files_work(old, nsid, npid, nindex, "after.csv")
        for tab in tabs[1:]:
            tpid, tindex, tsid = files_session(tab)
            _assert_files_work(tab, tsid, tpid, tindex, "after-too.csv")
    finally:
        for tab in reversed(tabs):
            tab.close()


@needs_shiny
def test_four_tabs_of_one_browser_spread_over_the_workers_and_each_finds_its_session(files_app, browser):
    c = files_app
    first = browser.tab()
    tabs = [first, first.sibling(), first.sibling(), first.sibling()]
    try:
        sessions = [files_session(tab, c.url) for tab in tabs]  # one after the other, as a user opens them
        per_worker = {i: sum(1 for _, index, _ in sessions if index == i) for i in (0, 1)}
        assert per_worker == {0: 2, 1: 2}, sessions
        # The browser has one cookie, naming one worker: each tab still reaches its own session's process.
        for tab, (pid, index, sid) in zip(tabs, sessions, strict=True):
            status, body = download(tab, sid)
            assert (status, body) == (200, f"session {sid}, pid {pid}, worker {index}")
        pid, index, sid = sessions[1]
        _assert_files_work(tabs[1], sid, pid, index, "second-tab.csv")
        app = _status(c.port)
        assert {w["index"]: w["sessions"] for w in app["workers"]} == {0: 2, 1: 2}
        for _, _, sid in sessions:
            assert 200 in _access(c, sid, "download") and all(s == 200 for s in _access(c, sid, "download"))
    finally:
        for tab in reversed(tabs):
            tab.close()


@needs_shiny
def test_shiny_session_over_https_connects_over_wss(corral, tmp_path):
    """Issue 24: with --tls-cert the page loads over https and its session's WebSocket is wss://, through
    corral's TLS edge (Chromium told to accept the test's self-signed certificate)."""
    from support.cdp import Browser
    from support.certs import make_pair

    cert, key = make_pair(tmp_path, "site", "corral-shiny")
    c = corral([EXAMPLE_SHINY, "--tls-cert", str(cert), "--tls-key", str(key)], workers=1)
    b = Browser(flags=("--ignore-certificate-errors",))
    try:
        tab, pid, _ = open_session(b, f"https://localhost:{c.port}/")
        try:
            assert pid in c.worker_pids().values()
            assert tab.evaluate("location.protocol") == "https:"
            assert tab.evaluate("Shiny.shinyapp.$socket.url").startswith(f"wss://localhost:{c.port}/")
            tab.evaluate("Shiny.setInputValue('n', 5)")
            assert tab.wait("document.getElementById('out').textContent === 'n squared is 25'")
        finally:
            tab.close()
    finally:
        b.close()
