"""The client side of `corral status | reload | scale | stop`: find a running corral's admin channel,
call it, and show the answer (a table for people, JSON for scripts).

Imports nothing of the server stack (supervisor, admin, prometheus_client): a verb starts fast and
works where only the client side is installed."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import sys
import time
import urllib.parse
from typing import Any

import click

from ..net import TOKEN_ENV, AddressError, is_loopback, parse_address, socket_dirs

DEFAULT_PORT = 8000
STATE_STYLE = {
    "ready": "green",
    "busy": "cyan",
    "starting": "yellow",
    "draining": "magenta",
    "unhealthy": "bold red",
    "stopping": "dim",
    "stopped": "dim",
}


class ControlError(Exception):
    """Shown as one line; exit 1, or 2 when the command was asked something it cannot do (usage)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


class AdminClient:
    def __init__(self, address: str, token: str | None = None, timeout: float = 10.0) -> None:
        self.address = address
        self.token = token
        self.timeout = timeout
        self.kind, self.host, self.port = _parse(address)

    def call(self, method: str, path: str) -> tuple[int, Any]:
        if self.kind == "unix":
            conn: http.client.HTTPConnection = _UnixConnection(self.host, self.timeout)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ControlError(f"no corral answers on {self.address} ({_why(exc)})") from None
        finally:
            conn.close()
        try:
            doc = json.loads(body) if resp.getheader("content-type", "").startswith("application/json") else body
        except ValueError:
            doc = body
        if resp.status == 401:
            raise ControlError(f"{self.address} wants an admin token: give --admin-token or set ${TOKEN_ENV}")
        return resp.status, doc

    def ok(self, method: str, path: str) -> Any:
        return _checked(method, path, *self.call(method, path))


def _checked(method: str, path: str, status: int, doc: Any) -> Any:
    if status >= 300:
        msg = doc.get("error") if isinstance(doc, dict) else doc
        raise ControlError(f"{method} {path}: {status}: {msg}")
    return doc


def _parse(address: str) -> tuple[str, str, int]:
    try:
        return parse_address(address)
    except AddressError as exc:
        raise ControlError(f"admin address: {exc}", exit_code=2) from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such socket"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def locate(port: int | None, admin: str | None) -> str:
    """The admin address of the corral serving public port P (its default unix socket), or --admin."""
    if admin:
        _parse(admin)
        return admin
    port = port or DEFAULT_PORT
    candidates = [os.path.join(d, f"{port}.sock") for d in socket_dirs()]
    for path in candidates:
        if os.path.exists(path):
            return f"unix:{path}"
    raise ControlError(
        f"no corral found for port {port}: no admin socket at {' or '.join(candidates)} "
        "(is it running with -p that port? or give --admin ADDR)"
    )


def _client(port: int | None, admin: str | None, token: str | None) -> AdminClient:
    return AdminClient(locate(port, admin), token or os.environ.get(TOKEN_ENV))


def target_options(fn: Any) -> Any:
    # The same CORRAL_* variables `corral run` reads: in a container, one environment serves both.
    fn = click.option(
        "--admin-token", default=None, envvar=TOKEN_ENV, show_envvar=True, metavar="TOKEN", help="bearer token"
    )(fn)
    fn = click.option(
        "--admin",
        default=None,
        envvar="CORRAL_ADMIN",
        show_envvar=True,
        metavar="ADDR",
        help="admin address: HOST:PORT or unix:/path",
    )(fn)
    fn = click.option(
        "-p",
        "--port",
        type=int,
        default=None,
        envvar="CORRAL_PORT",
        show_envvar=True,
        metavar="PORT",
        help=f"public port of the corral to talk to (default {DEFAULT_PORT})",
    )(fn)
    return fn


def _fail(exc: ControlError) -> None:
    click.echo(f"corral: {exc}", err=True)
    sys.exit(exc.exit_code)


# --- status --------------------------------------------------------------------------------------
def _mb(n: int) -> str:
    return f"{n / 1048576:.0f} MB" if n else "-"


def _age(s: float) -> str:
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def render_status(doc: dict[str, Any], color: bool) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # Never squeeze columns into a narrow terminal (rich would cut "STATE" to "STA..."): a wide line
    # wraps in the terminal instead, as kubectl's do. soft_wrap: header lines are not re-wrapped either.
    width = max(shutil.get_terminal_size((200, 24)).columns, 160)
    console = Console(highlight=False, no_color=not color, width=width, soft_wrap=True)
    head = doc["corral"]
    console.print(
        f"corral {head['version']} pid {head['pid']}  up {_age(head['uptime_s'])}  "
        f"listen {head['listen'] or '(supervise only)'}  admin {head['admin']}"
    )
    for app in doc["apps"]:
        q = app["queue"]
        line = (
            f"app {app['name']} ({app['route']}): {app['ready']}/{app['desired']} ready  "
            f"queue {q['depth']}/{q['max']}  rejected {q['rejected']}  timed out {q['timed_out']}  "
            f"served {app['served']}  failed {app['failed']}  refused {app.get('refused', 0)}  "
            f"abandoned {app.get('abandoned', 0)}  cut {sum(app.get('cut', {}).values())}"
        )
        if app["autoscale"]:
            a = app["autoscale"]
            line += f"  autoscale {a['min_workers']}..{a['max_workers']}"
        if app["reloading"]:
            line += "  [reloading]"
        if app.get("crash_loop"):
            line += "  [crash-looping]"
        zero = app.get("scale_to_zero")
        if zero and zero["state"] != "running":
            line += f"  \\[{zero['state']}]"  # escaped: rich would read "[idle (scaled to zero)]" as markup
        sessions = _sessions_shown(app)
        if sessions:
            line += (
                f"  sessions {sessions['open']} open ({sessions['opened']} opened, {sessions['rejected']} rejected)"
                f"  sticky {app.get('sticky', 'none')}"
            )
        console.print(line)
        if app["reload_note"]:
            console.print(f"  {app['reload_note']}", style="red")
        _print_crash_loop(console, app.get("crash_loop"))
        _print_zero(console, zero)
        _print_quarantine(console, app.get("quarantine"), app.get("redispatched", 0))
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1))
        columns = ["#", "PID", "PORT", "STATE", "INFLIGHT", "SERVED", "FAILED", "RESTARTS", "RSS", "CPU%", "UPTIME"]
        if any(w.get("socket") for w in app["workers"]):
            columns[2] = "SOCKET"
        if sessions:
            columns.insert(5, "SESSIONS")
        for col in columns:
            table.add_column(col, justify="left" if col in ("STATE",) else "right", no_wrap=True)
        for w in app["workers"]:
            state = w["state"]
            table.add_row(
                str(w["index"]),
                str(w["pid"] or "-"),
                w.get("socket") or str(w["port"]),  # a unix worker has a socket, not a port
                f"[{STATE_STYLE.get(state, '')}]{state}[/]" if color and state in STATE_STYLE else state,
                f"{w['inflight']}/{w['max_inflight']}",
                *([f"{w.get('sessions', 0)}/{sessions['max_per_worker']}"] if sessions else []),
                str(w["served"]),
                str(w["failed"]),
                str(w["restarts"]),
                _mb(w["rss_bytes"]),
                f"{w['cpu_percent']:.0f}",
                _age(w["uptime_s"]),
            )
        console.print(table)
        _print_routes(console, app.get("routes") or [])


def _sessions_shown(app: dict[str, Any]) -> dict[str, Any] | None:
    """The app's WebSocket session counts, when it has any to show: a sticky app (Shiny) or one that
    has opened sessions. A plain API's table keeps its columns (and an older corral has no counts)."""
    sessions = app.get("sessions")
    if not sessions or (app.get("sticky", "none") == "none" and not sessions["opened"] and not sessions["open"]):
        return None
    return sessions


def _print_zero(console: Any, zero: dict[str, Any] | None) -> None:
    """An app that scales to zero: its state in words, and its cold starts so far."""
    if not zero:
        return
    state = zero["state"]
    what = {
        "idle (scaled to zero)": f"idle (scaled to zero) for {_age(zero['for_s'])}: no worker runs; the next request "
        "starts one",
        "scaling to zero": "scaling to zero: the last worker finishes what it holds, then stops",
        "cold start": f"cold start: a worker is starting from zero ({_age(zero['for_s'])} so far); requests wait",
        "start failed": "start failed: a start from zero failed; requests get 503 + Retry-After until one succeeds",
    }.get(state, "running (scales to zero when idle)")
    last = zero["last_cold_start_s"]
    tail = f"; cold starts {zero['cold_starts']}" + (f", last {last:.2f} s" if last is not None else "")
    if zero["cold_start_failures"]:
        tail += f", {zero['cold_start_failures']} failed"
    console.print(f"  {what}{tail}", style="red" if state == "start failed" else None, markup=False)


def _print_crash_loop(console: Any, loop: dict[str, Any] | None) -> None:
    if not loop:
        return
    console.print(
        f"  crash-looping: {loop['exits']} worker exits in the last {loop['window_s']:g}s "
        f"(crash_limit {loop['limit']}/{loop['window_s']:g}s); restarts go on with backoff. "
        f"Last lines of {loop['worker']}:",
        style="bold red",
        markup=False,
    )
    for line in loop["last_lines"] or ["(the worker printed nothing)"]:
        console.print(f"    {line}", markup=False)


def _print_quarantine(console: Any, q: dict[str, Any] | None, redispatched: int) -> None:
    """Requests sent again after their worker was killed, and the quarantined ones (an older corral: neither)."""
    if redispatched:
        console.print(f"  {redispatched} request(s) sent again to another worker: theirs was killed from outside")
    if not q or not q["requests"]:
        return
    console.print(
        f"  quarantined (answered 502 without reaching a worker; {q['refused']} refused so far):",
        style="bold red",
        markup=False,
    )
    for e in q["requests"]:
        console.print(
            f"    {e['route']}  #{e['digest']}  made {e['deaths']} workers exit; lifts in {_age(e['left_s'])}",
            markup=False,
        )


def _print_routes(console: Any, routes: list[dict[str, Any]], shown: int = 10) -> None:
    """The busiest routes with their learned cost and class (what cost-aware dispatch decides by)."""
    from rich import box
    from rich.table import Table

    if not routes:
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1))
    for col in ("ROUTE", "CLASS", "REQUESTS", "P50", "P99"):
        table.add_column(col, justify="left" if col in ("ROUTE", "CLASS") else "right", no_wrap=col != "ROUTE")
    for r in routes[:shown]:
        cls = r["class"] + (" (declared)" if r.get("declared") else "")
        table.add_row(r["route"], cls, str(r["count"]), _dur(r["p50_s"]), _dur(r["p99_s"]))
    console.print(table)


def _dur(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


@click.command()
@target_options
@click.option("--json", "as_json", is_flag=True, help="print the status document as JSON")
def status(port: int | None, admin: str | None, admin_token: str | None, as_json: bool) -> None:
    """Workers, queue and totals of a running corral."""
    try:
        doc = _client(port, admin, admin_token).ok("GET", "/status")
    except ControlError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        render_status(doc, color=sys.stdout.isatty() and not os.environ.get("NO_COLOR"))


# --- reload / scale / stop ------------------------------------------------------------------------
def _wait(client: AdminClient, done: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = client.ok("GET", "/status")
        if done(doc):
            return doc
        if time.monotonic() > deadline:
            raise ControlError(f"not done after {timeout:g}s; see `corral status`")
        time.sleep(0.2)


def _apps(doc: dict[str, Any], app: str | None) -> list[dict[str, Any]]:
    return [a for a in doc["apps"] if a["supervised"] and (app is None or a["name"] == app)]


@click.command()
@target_options
@click.option("--app", default=None, help="reload only this app")
@click.option("--no-wait", is_flag=True, help="return once the reload has started")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="longest wait for the reload [s]")
def reload(
    port: int | None, admin: str | None, admin_token: str | None, app: str | None, no_wait: bool, timeout: float
) -> None:
    """Rolling reload: replace every worker with a fresh one, one at a time, without failing requests; with
    --tls-cert, also read the certificate and key again (as SIGHUP does; certbot's deploy hook)."""
    try:
        client = _client(port, admin, admin_token)
        before = {w["pid"] for a in _apps(client.ok("GET", "/status"), app) for w in a["workers"]}
        answer = client.ok("POST", "/reload" + (f"?app={app}" if app else ""))
        for m in answer["messages"]:
            click.echo(f"corral: {m}")
        if no_wait:
            return
        doc = _wait(client, lambda d: not any(a["reloading"] for a in _apps(d, app)), timeout)
    except ControlError as exc:
        _fail(exc)
    notes = [a["reload_note"] for a in _apps(doc, app) if a["reload_note"]]
    if notes:
        for n in notes:
            click.echo(f"corral: {n}", err=True)
        sys.exit(1)
    now = [w for a in _apps(doc, app) for w in a["workers"] if w["state"] in ("ready", "busy", "starting")]
    fresh = sum(1 for w in now if w["pid"] not in before)
    click.echo(f"corral: reload done: {fresh} new workers ready ({', '.join(str(w['pid']) for w in now)})")


@click.command(context_settings={"ignore_unknown_options": True})  # so that `scale -2` is a count, not an option
@click.argument("workers", metavar="[+|-]WORKERS")
@target_options
@click.option("--app", default=None, help="the app to scale (needed when there are several)")
@click.option("--no-wait", is_flag=True, help="return once the change has started")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="longest wait [s]")
def scale(
    workers: str,
    port: int | None,
    admin: str | None,
    admin_token: str | None,
    app: str | None,
    no_wait: bool,
    timeout: float,
) -> None:
    """Add workers, or drain and stop surplus ones, until there are WORKERS; +N and -N are relative
    to the workers asked for now. 0 only for an app that scales to zero (min_workers 0)."""
    if not re.fullmatch(r"[+-]?\d{1,9}", workers):
        raise click.BadParameter(f"{workers!r}: give N (1 or more), +N or -N", param_hint="WORKERS")
    try:
        client = _client(port, admin, admin_token)
        target = _relative(client, workers, app) if workers[0] in "+-" else int(workers)
        answer = _scale(client, target, app)
        for m in answer["messages"]:
            click.echo(f"corral: {m}")
        if no_wait:
            return
        want = answer["workers"]

        def done(doc: dict[str, Any]) -> bool:
            apps = _apps(doc, app)
            return bool(apps) and all(a["desired"] == a["ready"] for a in apps)

        doc = _wait(client, done, timeout)
    except ControlError as exc:
        _fail(exc)
    draining = sum(1 for a in _apps(doc, app) for w in a["workers"] if w["state"] == "draining")
    tail = f" ({draining} finishing their requests)" if draining else ""
    click.echo(f"corral: {want} worker{'s' * (want != 1)} ready{tail}")


def _relative(client: AdminClient, delta: str, app: str | None) -> int:
    """+N / -N: from the workers the app asks for now (its `desired`)."""
    apps = _apps(client.ok("GET", "/status"), app)
    if len(apps) != 1:
        names = ", ".join(a["name"] for a in apps) or "none"
        raise ControlError(f"scale {delta}: give --app (apps corral runs: {names})", exit_code=2)
    now = apps[0]["desired"]
    target = now + int(delta)
    least = 0 if (apps[0].get("autoscale") or {}).get("min_workers") == 0 else 1  # min_workers 0: zero too
    if target < least:
        raise ControlError(
            f"scale {delta}: would leave {max(target, 0)} workers (app {apps[0]['name']} has {now}); "
            f"the least is {least}",
            exit_code=2,
        )
    return target


def _scale(client: AdminClient, workers: int, app: str | None) -> Any:
    path = f"/scale?workers={workers}" + (f"&app={app}" if app else "")
    status, doc = client.call("POST", path)
    if status == 400 and isinstance(doc, dict) and "ceiling" in doc:
        raise ControlError(doc["error"], exit_code=2)  # WORKERS out of range, as click's own check for 0
    return _checked("POST", path, status, doc)


@click.command()
@target_options
@click.option("--no-wait", is_flag=True, help="return once the stop has started")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="longest wait [s]")
def stop(port: int | None, admin: str | None, admin_token: str | None, no_wait: bool, timeout: float) -> None:
    """Graceful stop (as SIGTERM): finish in-flight requests, stop the workers, exit."""
    try:
        client = _client(port, admin, admin_token)
        pid = client.ok("GET", "/status")["corral"]["pid"]
        for m in client.ok("POST", "/stop")["messages"]:
            click.echo(f"corral: {m}")
    except ControlError as exc:
        _fail(exc)
    if no_wait:
        return
    deadline = time.monotonic() + timeout
    local = client.kind == "unix" or is_loopback(client.host)
    while _answers(client) or (local and _alive(pid)):
        if time.monotonic() > deadline:
            _fail(ControlError(f"corral pid {pid} still running after {timeout:g}s"))
        time.sleep(0.1)
    click.echo("corral: stopped")


def _answers(client: AdminClient) -> bool:
    try:
        client.call("GET", "/status")
    except ControlError:
        return False
    return True


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --- logs ---------------------------------------------------------------------------------------------
FOLLOW_EVERY = 0.25  # seconds between two polls of GET /logs while following
LOGS_PAGE = 10_000  # the most lines GET /logs returns at once (ops/routes.py LOGS_PAGE)


def _log_query(after: int, n: int, worker: str | None = None, app: str | None = None) -> str:
    q = {"after": after, "n": n, "worker": worker, "app": app}
    return "/logs?" + urllib.parse.urlencode({k: v for k, v in q.items() if v is not None})


def _entries(client: AdminClient, path: str) -> list[dict[str, Any]]:
    doc = client.ok("GET", path)
    text = doc.decode("utf-8", "replace") if isinstance(doc, bytes) else json.dumps(doc)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _show(entries: list[dict[str, Any]], as_json: bool, colour: bool) -> None:
    from ..logring import render

    for e in entries:
        click.echo(json.dumps(e) if as_json else render(e, colour))


@click.command()
@target_options
@click.option("-f", "--follow", is_flag=True, help="keep printing lines as they come (Ctrl-C to stop)")
@click.option(
    "-n", "--lines", "n", type=click.IntRange(min=0), default=100, show_default=True, metavar="N", help="the last N"
)
@click.option("--worker", default=None, metavar="I|APP:I", help="only this worker: its output and its state changes")
@click.option("--app", default=None, metavar="NAME", help="only this app")
@click.option(
    "--json", "as_json", is_flag=True, help="one JSON object a line: seq, time, source, app, worker, stream, line"
)
def logs(
    port: int | None,
    admin: str | None,
    admin_token: str | None,
    follow: bool,
    n: int,
    worker: str | None,
    app: str | None,
    as_json: bool,
) -> None:
    """Worker output and corral's own lines from a running corral (as `pm2 logs`).

    The running corral keeps the last log_buffer lines (default 2000) in memory; the access log is
    not among them (it has --access-log).
    """
    from ..logring import matches

    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    try:
        client = _client(port, admin, admin_token)
        # Follow unfiltered from the newest line, and filter here: the cursor then moves even while the
        # chosen worker says nothing, so no poll re-reads old lines. The newest is asked before the
        # history: a line logged in between is then in the history or after the cursor, never skipped.
        newest = _entries(client, _log_query(0, 1)) if follow else []
        shown = _entries(client, _log_query(0, n, worker, app))
        _show(shown, as_json, colour)
        if not follow:
            return
        cursor = max([e["seq"] for e in shown + newest], default=0)
        fresh: list[dict[str, Any]] = []
        while True:
            if len(fresh) < LOGS_PAGE:  # a full page: more are waiting, ask again at once
                time.sleep(FOLLOW_EVERY)
            fresh = _entries(client, _log_query(cursor, LOGS_PAGE))
            if fresh:
                cursor = fresh[-1]["seq"]
                _show([e for e in fresh if matches(e, worker, app)], as_json, colour)
    except ControlError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        pass


# --- ls --------------------------------------------------------------------------------------------------
@click.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
def ls(as_json: bool) -> None:
    """Running corrals of this user: one line per admin socket in the default directories.

    A corral started with --admin elsewhere is not listed (`corral status --admin ADDR` reaches it).
    """
    found, stale = _instances()
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo("corral: no running corral found in " + " or ".join(socket_dirs()), err=True)
    else:
        rows = [("PORT", "PID", "UPTIME", "LISTEN", "APPS (ready/desired)", "ADMIN")]
        for i in found:
            rows.append(
                (
                    str(i["port"]),
                    str(i["pid"]),
                    _age(i["uptime_s"]),
                    i["listen"] or "(supervise only)",
                    ", ".join(i["apps"]),
                    i["admin"],
                )
            )
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        for r in rows:
            click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    for path in stale:
        click.echo(f"corral: {path}: no corral answers (left by one that was killed?)", err=True)


def _instances() -> tuple[list[dict[str, Any]], list[str]]:
    found: list[dict[str, Any]] = []
    stale: list[str] = []
    for d in socket_dirs():
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext != ".sock" or not stem.isdigit():
                continue
            path = os.path.join(d, name)
            try:
                doc = AdminClient(f"unix:{path}", os.environ.get(TOKEN_ENV), timeout=3).ok("GET", "/status")
            except ControlError:
                stale.append(path)
                continue
            head = doc["corral"]
            apps = [
                f"{a['name']} {a['ready']}/{a['desired']}" + (" (crash-looping)" if a.get("crash_loop") else "")
                for a in doc["apps"]
            ]
            found.append(
                {
                    "port": int(stem),
                    "pid": head["pid"],
                    "uptime_s": head["uptime_s"],
                    "listen": head["listen"],
                    "apps": apps,
                    "admin": head["admin"],
                }
            )
    found.sort(key=lambda i: i["port"])
    return found, stale


COMMANDS = (status, reload, scale, stop, logs, ls)
