"""Headless Chromium driven over the DevTools protocol (CDP), for tests that need a real browser session:
JavaScript, cookies, a WebSocket the page opens itself.

One browser process; each `Tab` lives in its own browser context (an incognito-like profile), so tabs
do not share cookies: each is a separate client to the server under test. `Tab.sibling()` opens another
tab in the same context: one browser's tabs, sharing its cookies. CDP is JSON over one
WebSocket (the `websockets` package's sync client); commands for a tab carry its flattened sessionId.
Events are not needed here (tests poll page state with Runtime.evaluate), so they are skipped."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless=new",
    "--no-sandbox",  # tests run as root
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Every tab here is "in the background": keep its timers and WebSocket running at full speed.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]


class CDPError(Exception):
    pass


class Browser:
    def __init__(self, timeout: float = 60, flags: tuple[str, ...] = ()) -> None:
        if CHROMIUM is None:
            raise CDPError("chromium is not installed")
        self.profile = tempfile.mkdtemp(prefix="corral-cdp-")
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, *flags, "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Entered by hand: the connection lives as long as this object (closed in close()).
        self.ws: ClientConnection = connect(self._endpoint(timeout), max_size=None, open_timeout=timeout).__enter__()
        self.ids = itertools.count(1)

    def _endpoint(self, timeout: float) -> str:
        """Chromium writes its port and browser path to DevToolsActivePort once it listens."""
        path = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited with {self.proc.returncode}")
            with contextlib.suppress(FileNotFoundError):
                lines = path.read_text().split()
                if len(lines) >= 2:
                    return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            if time.monotonic() > deadline:
                raise CDPError("chromium never wrote DevToolsActivePort")
            time.sleep(0.05)

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        """One command and its answer; events and other answers read meanwhile are dropped."""
        msg: dict[str, Any] = {"id": next(self.ids), "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError(f"{method}: no answer in {timeout}s")
            answer = json.loads(self.ws.recv(timeout=left))
            if answer.get("id") == msg["id"]:
                if "error" in answer:
                    raise CDPError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def tab(self, context: str | None = None) -> Tab:
        """A new tab in a new browser context (its own cookies), or in `context` (sharing that one's)."""
        owns = context is None
        if context is None:
            context = self.call("Target.createBrowserContext")["browserContextId"]
        target = self.call("Target.createTarget", {"url": "about:blank", "browserContextId": context})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Tab(self, context, target, session, owns_context=owns)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


class Tab:
    def __init__(self, browser: Browser, context: str, target: str, session: str, owns_context: bool = True) -> None:
        self.browser = browser
        self.context = context
        self.target = target
        self.session = session
        self.owns_context = owns_context  # closing this tab disposes the context (and its other tabs)

    def sibling(self) -> Tab:
        """Another tab of the same browser session: same context, same cookies."""
        return self.browser.tab(self.context)

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30) -> dict[str, Any]:
        return self.browser.call(method, params, self.session, timeout)

    def evaluate(self, expression: str, await_promise: bool = False, timeout: float = 30) -> Any:
        """The expression's value; with `await_promise`, the value its promise resolves to."""
        params = {"expression": expression, "returnByValue": True, "awaitPromise": await_promise}
        r = self.call("Runtime.evaluate", params, timeout=timeout)
        if "exceptionDetails" in r:
            raise CDPError(f"{expression}: {r['exceptionDetails'].get('text')}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float = 30, every: float = 0.1) -> Any:
        """Poll until the expression is truthy; its value. A page being replaced may throw: polled again."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            with contextlib.suppress(CDPError):
                last = self.evaluate(expression)
                if last:
                    return last
            if time.monotonic() > deadline:
                raise CDPError(f"still false after {timeout}s: {expression} (last {last!r})")
            time.sleep(every)

    def load(self, url: str, timeout: float = 60) -> int:
        """Navigate and wait for the new document to be complete; its HTTP status. A navigation that
        fails outright (refused, reset) raises with Chromium's error text."""
        self.evaluate("window.__corral_old_page = true")
        r = self.call("Page.navigate", {"url": url}, timeout=timeout)
        if r.get("errorText"):
            raise CDPError(f"loading {url} failed: {r['errorText']}")
        self.wait("!window.__corral_old_page && document.readyState === 'complete'", timeout)
        return int(self.evaluate("performance.getEntriesByType('navigation')[0].responseStatus") or 0)

    def close(self) -> None:
        with contextlib.suppress(CDPError):
            self.browser.call("Target.closeTarget", {"targetId": self.target})
            if self.owns_context:
                self.browser.call("Target.disposeBrowserContext", {"browserContextId": self.context})
