"""corral.portable: which mechanism corral takes for each Linux-only one, and what its start line says.

The selection is pure (what the machine offers, whether CORRAL_PORTABLE=1 forces the portable paths), so a
Mac is described here as what it offers. The paths themselves run end to end in tests/supervision
(test_portable_paths.py) and in the whole suite's second pass, which sets CORRAL_PORTABLE=1 (scripts/test).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess

import pytest

from corral import portable
from corral.config import AppConfig, ServerConfig
from corral.supervision import deathpipe, exits, watch

pytestmark = pytest.mark.unit

LINUX = portable.Offered(
    pidfd=True, pdeathsig=True, sched_batch=True, quickack=True, tcp_info=True, native_watch="inotify"
)
MACOS = portable.Offered(
    pidfd=False, pdeathsig=False, sched_batch=False, quickack=False, tcp_info=False, native_watch="FSEvents"
)


def test_linux_gets_its_own_mechanisms():
    p = portable.choose(LINUX, force=False)
    assert (p.exit_watch, p.worker_lifetime, p.file_watch) == ("pidfd", "PDEATHSIG", "inotify")
    assert p.sched_batch and p.quickack and p.tcp_info
    assert not (p.portable_exits or p.death_pipe or p.polling)


def test_forced_linux_takes_every_portable_path():
    p = portable.choose(LINUX, force=True)
    assert (p.exit_watch, p.worker_lifetime, p.file_watch) == ("SIGCHLD", "death-pipe", "polling")
    assert not (p.sched_batch or p.quickack or p.tcp_info)


def test_macos_takes_the_portable_paths_and_keeps_its_own_file_watcher():
    p = portable.choose(MACOS, force=False)
    assert (p.exit_watch, p.worker_lifetime, p.file_watch) == ("SIGCHLD", "death-pipe", "FSEvents")
    assert not (p.sched_batch or p.quickack or p.tcp_info)


@pytest.mark.parametrize("missing", ["pidfd", "pdeathsig", "sched_batch", "quickack", "tcp_info", "native_watch"])
def test_each_mechanism_is_chosen_on_its_own(missing):
    """A Linux without one of them (an old kernel without pidfd_open, a container without inotify) loses
    only that one."""
    offered = portable.Offered(**{**LINUX.__dict__, missing: None if missing == "native_watch" else False})
    p, full = portable.choose(offered, force=False), portable.choose(LINUX, force=False)
    changed = {f for f in full.__dict__ if getattr(p, f) != getattr(full, f)}
    expected = {
        "pidfd": "exit_watch",
        "pdeathsig": "worker_lifetime",
        "native_watch": "file_watch",
    }.get(missing, missing)
    assert changed == {expected}


@pytest.mark.parametrize(
    ("setting", "have", "want"),
    [
        ("auto", True, ("uvloop", "")),
        ("auto", False, ("asyncio", "uvloop is not installed")),
        ("asyncio", True, ("asyncio", "--loop asyncio")),
        ("uvloop", True, ("uvloop", "--loop uvloop")),
        ("uvloop", False, ("uvloop", "--loop uvloop")),  # the caller refuses it: uvloop is missing
    ],
)
def test_loop_choice(setting, have, want):
    assert portable.choose_loop(setting, have) == want


@pytest.mark.parametrize(
    ("value", "want"), [("1", True), ("yes", True), ("true", True), ("0", False), ("", False), (None, False)]
)
def test_corral_portable_values(value, want):
    env = {} if value is None else {"CORRAL_PORTABLE": value}
    assert portable.forced(env) is want


def test_the_start_line_names_every_choice():
    linux = portable.describe(portable.choose(LINUX, False), "uvloop", platform="linux")
    assert linux == (
        "platform linux: loop uvloop; exit watch pidfd; worker lifetime PDEATHSIG; worker scheduling SCHED_BATCH; "
        "TCP_QUICKACK on; TCP_INFO on; file watch inotify"
    )
    forced = portable.describe(portable.choose(LINUX, True), "asyncio", "uvloop is not installed", True, "linux")
    assert forced.startswith("platform linux, portable paths forced (CORRAL_PORTABLE=1): loop asyncio (uvloop is not")
    assert "exit watch SIGCHLD; worker lifetime death-pipe; worker scheduling default (no SCHED_BATCH)" in forced
    assert forced.endswith("TCP_QUICKACK off; TCP_INFO off; file watch polling")


@pytest.mark.parametrize(
    ("platform", "want"), [("linux", "inotify"), ("darwin", "FSEvents"), ("freebsd14", "kqueue"), ("sunos5", None)]
)
def test_native_file_watchers(platform, want):
    assert portable._native_watch(platform) == want


def test_this_linux_offers_every_mechanism():
    """The test machine is Linux: what it offers is looked up, not assumed (pidfd_open is tried)."""
    assert portable.offered() == portable.Offered(
        pidfd=True,
        pdeathsig=True,
        sched_batch=True,
        quickack=hasattr(socket, "TCP_QUICKACK"),
        tcp_info=hasattr(socket, "TCP_INFO"),
        native_watch="inotify",
    )


def test_pidfd_that_the_kernel_refuses_is_not_offered(monkeypatch):
    def enosys(pid: int, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", enosys)
    assert portable._pidfd_works() is False
    monkeypatch.delattr(os, "pidfd_open")
    assert portable._pidfd_works() is False


def test_a_new_guardian_is_told_of_every_live_worker(monkeypatch):
    """The death pipe's guardian, restarted after it died, learns the workers the old one knew; a reaped
    worker is forgotten there too (its PID may be reused). The guardian process itself is played here."""
    sent: list[bytes] = []
    started: list[list[str]] = []

    class FakeProc:
        def __init__(self, argv: list[str], **kw: object) -> None:
            started.append(argv)
            self.alive = True

        def poll(self) -> int | None:
            return None if self.alive else 0

    monkeypatch.setattr(subprocess, "Popen", FakeProc)
    monkeypatch.setattr(os, "write", lambda fd, data: sent.append(data) or len(data))
    g = deathpipe.Guardian()
    try:
        g.ensure()
        assert g.ensure() == g.fd and len(started) == 1  # one guardian while it lives
        g.started(101)
        g.started(102)
        g.reaped(101)
        g.reaped(999)  # never registered: nothing to tell
        assert sent == [b"-101\n"]
        g.proc.alive = False  # type: ignore[union-attr]
        g.ensure()
        assert len(started) == 2 and sent[-1] == b"102\n"
    finally:
        os.close(g.fd)


# --- the SIGCHLD exit watch, on a loop the test plays ---------------------------------------------------------
class FakeLoop:
    def __init__(self, refuse_sigchld: bool = False) -> None:
        self.refuse = refuse_sigchld
        self.handlers: dict[int, object] = {}
        self.soon: list = []

    def add_signal_handler(self, sig: int, callback) -> None:
        if self.refuse:  # as uvloop does: it keeps SIGCHLD for the processes it spawns
            raise RuntimeError("cannot add a signal handler for SIGCHLD")
        self.handlers[sig] = callback

    def remove_signal_handler(self, sig: int) -> None:
        del self.handlers[sig]

    def call_soon(self, callback) -> None:
        self.soon.append(callback)

    call_soon_threadsafe = call_soon

    def run_soon(self) -> None:
        todo, self.soon = self.soon, []
        for callback in todo:
            callback()


class FakeProc:
    """What the watcher uses of a Popen: poll() is waitpid(pid, WNOHANG) on its own PID."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


def test_the_sigchld_watch_reports_each_exit_once_and_reaps_no_other_pid(monkeypatch):
    def refuse(*args: object) -> None:
        raise AssertionError("the watcher itself never calls waitpid: a PID it did not start is never reaped")

    monkeypatch.setattr(os, "waitpid", refuse)
    monkeypatch.setattr(os, "wait", refuse)
    loop = FakeLoop()
    w = exits.SigchldWatcher(loop)  # type: ignore[arg-type]
    seen: list[tuple[str, int]] = []
    a, b = FakeProc(10), FakeProc(11)
    w.watch(a, lambda code: seen.append(("a", code)))  # type: ignore[arg-type]
    w.watch(b, lambda code: seen.append(("b", code)))  # type: ignore[arg-type]
    loop.run_soon()
    assert seen == []
    b.returncode = -9
    sigchld = loop.handlers[signal.SIGCHLD]
    sigchld()  # type: ignore[operator]
    sigchld()  # a second signal (another child of corral's, not a worker): b is not reported twice
    assert seen == [("b", -9)] and set(w.watched) == {10}
    a.returncode = 0
    sigchld()  # type: ignore[operator]
    assert seen == [("b", -9), ("a", 0)] and not w.watched


def test_an_exit_before_the_watch_began_is_still_reported():
    """The signal came while the PID was not in the table yet: the sweep scheduled by watch() finds it."""
    loop = FakeLoop()
    w = exits.SigchldWatcher(loop)  # type: ignore[arg-type]
    early = FakeProc(12)
    early.returncode = 1
    seen: list[int] = []
    w.watch(early, seen.append)  # type: ignore[arg-type]
    loop.run_soon()
    assert seen == [1]


def test_under_uvloop_the_watch_takes_a_plain_signal_handler():
    loop = FakeLoop(refuse_sigchld=True)
    before = signal.getsignal(signal.SIGCHLD)
    w = exits.SigchldWatcher(loop)  # type: ignore[arg-type]
    try:
        handler = signal.getsignal(signal.SIGCHLD)
        assert callable(handler) and handler is not before
        handler(signal.SIGCHLD, None)  # what Python runs when the signal comes
        assert loop.soon == [w.sweep]  # handed to the loop, not run in the handler
    finally:
        w.close()
    assert signal.getsignal(signal.SIGCHLD) == before


# --- --watch without the OS's notifier ------------------------------------------------------------------------
def test_watch_falls_back_to_polling_when_the_native_watcher_fails(monkeypatch, capsys, tmp_path):
    import watchfiles

    tried: list[bool] = []

    async def fake_awatch(*paths: str, force_polling: bool, **kw: object):
        tried.append(force_polling)
        if not force_polling:
            raise OSError("OS file watch limit reached")
        return
        yield  # an async generator that ends without a change

    monkeypatch.setattr(watchfiles, "awatch", fake_awatch)
    monkeypatch.setattr(watch, "platform_paths", lambda: portable.choose(LINUX, force=False))
    monkeypatch.chdir(tmp_path)
    w = watch.Watcher(AppConfig(name="api", command=["x"]), ServerConfig(), lambda: "reloading")
    asyncio.run(w.run())
    assert tried == [False, True]
    err = capsys.readouterr()
    assert "inotify failed (OS file watch limit reached); polling instead" in err.err
    assert "for changes (polling)" in err.out
