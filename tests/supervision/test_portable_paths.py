"""The portable paths end to end (issue 24): what a Mac, or any POSIX system without Linux's extras, runs,
forced on Linux by CORRAL_PORTABLE=1. The start line names each path; the SIGCHLD exit watch restarts
workers under either loop; the death pipe's guardian outlives its own death; asyncio's loop serves when
uvloop is missing. The selection logic itself is in tests/test_portable.py; the whole suite's second pass
runs on these paths (scripts/test)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import STUB, corral_cli, get, poll, stub_args

LINUX = {"CORRAL_PORTABLE": None, "CORRAL_LOOP": None}
PORTABLE = {"CORRAL_PORTABLE": "1", "CORRAL_LOOP": None}


def start_line(log: str) -> str:
    return next(line for line in log.splitlines() if "corral: platform " in line)


def test_the_start_line_names_linux_paths(corral):
    c = corral(stub_args(), workers=1, env=LINUX)
    assert start_line(c.log()).endswith(
        "corral: platform linux: loop uvloop; exit watch pidfd; worker lifetime PDEATHSIG; "
        "worker scheduling SCHED_BATCH; TCP_QUICKACK on; TCP_INFO on; file watch inotify"
    )


def test_the_start_line_names_the_portable_paths(corral):
    c = corral(stub_args(), workers=1, env=PORTABLE)
    assert start_line(c.log()).endswith(
        "corral: platform linux, portable paths forced (CORRAL_PORTABLE=1): loop uvloop; "
        "exit watch SIGCHLD; worker lifetime death-pipe; worker scheduling default (no SCHED_BATCH); "
        "TCP_QUICKACK off; TCP_INFO off; file watch polling"
    )
    assert get(c.port, "/x").status == 200


def _kill_a_worker_and_see_it_back(c) -> None:
    (pid,) = c.worker_pids().values()
    os.kill(pid, signal.SIGKILL)
    c.wait_for(r"stopped: killed by SIGKILL; exited; restarting in", timeout=30)
    c.wait_for(" ready: pid ", count=2)
    assert [get(c.port, "/x").status for _ in range(5)] == [200] * 5
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # reaped


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_sigchld_exit_watch_restarts_a_killed_worker_on_either_loop(corral, loop):
    """A Mac with uvloop installed runs uvloop with the SIGCHLD watch: both loops must deliver the signal."""
    c = corral(stub_args("--loop", loop), workers=1, env=PORTABLE)
    assert f"loop {loop} (--loop {loop}); exit watch SIGCHLD" in start_line(c.log())
    _kill_a_worker_and_see_it_back(c)


def _guardian(corral_pid: int) -> psutil.Process:
    def find() -> psutil.Process | None:
        for p in psutil.Process(corral_pid).children():
            try:
                if "death-pipe guardian" in " ".join(p.cmdline()):
                    return p
            except psutil.Error:  # a child that ended (or is a zombie) meanwhile: not the live guardian
                continue
        return None

    return poll("the death-pipe guardian", find)


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_killed_guardian_is_replaced_and_the_guarantee_holds(corral):
    """The guardian killed by hand: the next worker start brings up a new one that knows every live worker, so
    a SIGKILLed corral still leaves none behind."""
    c = corral(stub_args(), workers=2, env=PORTABLE)
    first = _guardian(c.proc.pid)
    first.kill()
    poll("the guardian dead", lambda: not _running(first))  # a zombie until corral reaps it, at the next start
    victim, survivor = c.worker_pids().values()
    os.kill(victim, signal.SIGKILL)  # its replacement's start finds the guardian gone and starts another
    c.wait_for(" ready: pid ", count=3)
    second = _guardian(c.proc.pid)
    assert second.pid != first.pid
    workers = list(c.worker_pids().values())
    assert survivor in workers and len(workers) == 2, c.log()
    c.proc.kill()
    c.proc.wait()
    poll("no worker left", lambda: not any(psutil.pid_exists(p) for p in workers), timeout=10)


def test_the_death_pipe_kills_the_whole_process_group(corral, tmp_path):
    """A worker's own children (R's helpers) go with it: the guardian kills each worker's process group."""
    child_pid = tmp_path / "child.pid"
    shell = f'sleep 300 & echo $! > {child_pid}; exec {sys.executable} {STUB} "$0"'
    c = corral(["--", "sh", "-c", shell, "{port}"], workers=1, env=PORTABLE)
    helper = int(poll("the worker's child", lambda: child_pid.exists() and child_pid.read_text().strip()))
    assert psutil.pid_exists(helper)
    c.proc.kill()
    c.proc.wait()
    poll("the worker's child gone", lambda: not psutil.pid_exists(helper), timeout=10)


def _without_uvloop(tmp_path: Path) -> dict[str, str | None]:
    """An environment where `import uvloop` fails, as on a machine it was never installed on."""
    hidden = tmp_path / "no-uvloop"
    (hidden / "uvloop").mkdir(parents=True)
    (hidden / "uvloop" / "__init__.py").write_text("raise ImportError('uvloop is hidden by the test')\n")
    path = os.pathsep.join(p for p in (str(hidden), os.environ.get("PYTHONPATH")) if p)
    return {**LINUX, "PYTHONPATH": path}


def test_without_uvloop_corral_serves_on_asyncios_loop(corral, tmp_path):
    c = corral(stub_args(), workers=2, env=_without_uvloop(tmp_path))
    assert "loop asyncio (uvloop is not installed); exit watch pidfd" in start_line(c.log())
    assert {get(c.port, "/x").json()["index"] for _ in range(6)} == {"0", "1"}


def test_asking_for_uvloop_without_it_is_refused_in_one_line(tmp_path):
    r = corral_cli("run", "--loop", "uvloop", "--", sys.executable, STUB, "{port}", env=_without_uvloop(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "corral: --loop uvloop: uvloop is not installed (pip install uvloop), or use --loop asyncio"
    )


def test_corral_loop_selects_asyncio_on_linux(corral):
    c = corral(stub_args(), workers=1, env={**LINUX, "CORRAL_LOOP": "asyncio"})
    assert "loop asyncio (--loop asyncio); exit watch pidfd; worker lifetime PDEATHSIG" in start_line(c.log())
    _kill_a_worker_and_see_it_back(c)


def test_watch_polls_on_the_portable_path(corral, tmp_path):
    """--watch without inotify: a change is seen by polling and rolls the workers."""
    c = corral(stub_args("--watch"), workers=1, env=PORTABLE)
    c.wait_for(r"watching \S+ for changes \(polling\)")
    changed = tmp_path / "settings.txt"

    def edit_seen() -> bool:
        # Written again until seen: a write before the watcher's first poll of the tree is its start, not a change.
        changed.write_text(str(time.monotonic()))
        return "settings.txt changed; reloading" in c.log()

    poll("the edit seen by polling", edit_seen, timeout=30, every=0.5)
    c.wait_for(r"stopped: [^\n]*\(drained\)", timeout=60)
