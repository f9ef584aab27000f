"""Which mechanism corral uses where Linux has one of its own and other POSIX systems (macOS) do not.

Decided once per process, from what this machine offers, and named in the line corral prints at start:

==================  ===========================  ================================================================
what                Linux                        elsewhere (or forced by CORRAL_PORTABLE=1)
==================  ===========================  ================================================================
exit watch          pidfd (a descriptor per      SIGCHLD: one handler, os.waitpid(WNOHANG) on the PIDs corral
                    worker, in the event loop)   started, never on another
worker lifetime     PR_SET_PDEATHSIG (SIGKILL    death-pipe: a guardian process sees EOF on a pipe only corral
                    when corral dies)            holds, and SIGKILLs every worker's process group
scheduling          SCHED_BATCH                  none: the system's default policy
TCP_QUICKACK        after a partial response     none: a reused TCP connection to httpuv may wait for the ACK
TCP_INFO            a paused client's close      none: seen when its response is written
file watch          inotify                      the OS's own (FSEvents, kqueue), polling when it fails
event loop          uvloop                       uvloop too; asyncio's own loop when it is missing (not forced)
==================  ===========================  ================================================================

`CORRAL_PORTABLE=1` takes every portable path on Linux but the loop (a Mac has uvloop too; `--loop asyncio`
asks for asyncio's), so the test suite's second pass covers them. sd_notify and socket activation need no
choice: without systemd's variables they do nothing.

No corral imports: the bottom layer (the data path, the supervisors and the CLI read it).
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import sys
from dataclasses import dataclass

PORTABLE_ENV = "CORRAL_PORTABLE"


@dataclass(frozen=True)
class Offered:
    """What this machine has of each Linux-only mechanism."""

    pidfd: bool
    pdeathsig: bool
    sched_batch: bool
    quickack: bool
    tcp_info: bool
    native_watch: str | None  # the OS's file-change notifier watchfiles uses, None when it has none


@dataclass(frozen=True)
class Paths:
    """The mechanism chosen for each: what corral runs with, and names in its start line."""

    exit_watch: str  # "pidfd" | "SIGCHLD"
    worker_lifetime: str  # "PDEATHSIG" | "death-pipe"
    sched_batch: bool
    quickack: bool
    tcp_info: bool
    file_watch: str  # "inotify", "FSEvents", "kqueue" | "polling"

    @property
    def portable_exits(self) -> bool:
        return self.exit_watch == "SIGCHLD"

    @property
    def death_pipe(self) -> bool:
        return self.worker_lifetime == "death-pipe"

    @property
    def polling(self) -> bool:
        return self.file_watch == "polling"


def forced(env: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """CORRAL_PORTABLE=1 (or true/yes/on): every portable path, whatever the machine offers."""
    value = (os.environ if env is None else env).get(PORTABLE_ENV, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def choose(offered: Offered, force: bool) -> Paths:
    """The selection: the Linux mechanism when the machine has it and nothing forces the portable one."""
    return Paths(
        exit_watch="pidfd" if offered.pidfd and not force else "SIGCHLD",
        worker_lifetime="PDEATHSIG" if offered.pdeathsig and not force else "death-pipe",
        sched_batch=offered.sched_batch and not force,
        quickack=offered.quickack and not force,
        tcp_info=offered.tcp_info and not force,
        file_watch=offered.native_watch if offered.native_watch and not force else "polling",
    )


def choose_loop(setting: str, have_uvloop: bool) -> tuple[str, str]:
    """(loop, why) for the `loop` knob: uvloop or asyncio's own. auto is uvloop when installed (on a Mac too:
    it ships wheels for macOS, so CORRAL_PORTABLE=1 leaves it alone). An explicit `uvloop` without uvloop
    installed is the caller's error to report."""
    if setting == "asyncio":
        return "asyncio", "--loop asyncio"
    if setting == "uvloop":
        return "uvloop", "--loop uvloop"
    if not have_uvloop:
        return "asyncio", "uvloop is not installed"
    return "uvloop", ""


def offered() -> Offered:
    """What this machine has, looked up once."""
    return Offered(
        pidfd=_pidfd_works(),
        pdeathsig=_has_prctl(),
        sched_batch=hasattr(os, "SCHED_BATCH") and hasattr(os, "sched_setscheduler"),
        quickack=hasattr(socket, "TCP_QUICKACK"),
        # Linux's struct tcp_info: its first byte is the state, ESTABLISHED = 1; the BSDs' differs (4)
        tcp_info=sys.platform.startswith("linux") and hasattr(socket, "TCP_INFO"),
        native_watch=_native_watch(sys.platform),
    )


@functools.cache
def paths() -> Paths:
    """This process's choices (CORRAL_PORTABLE is read once, at the first call)."""
    return choose(offered(), forced())


def describe(p: Paths, loop: str, loop_why: str = "", force: bool = False, platform: str = sys.platform) -> str:
    """The start line: `platform linux: loop uvloop; exit watch pidfd; worker lifetime PDEATHSIG; ...`."""
    loop_text = f"{loop} ({loop_why})" if loop_why else loop
    where = f"platform {platform}" + (f", portable paths forced ({PORTABLE_ENV}=1)" if force else "")
    return f"{where}: " + "; ".join(
        [
            f"loop {loop_text}",
            f"exit watch {p.exit_watch}",
            f"worker lifetime {p.worker_lifetime}",
            f"worker scheduling {'SCHED_BATCH' if p.sched_batch else 'default (no SCHED_BATCH)'}",
            f"TCP_QUICKACK {'on' if p.quickack else 'off'}",
            f"TCP_INFO {'on' if p.tcp_info else 'off'}",
            f"file watch {p.file_watch}",
        ]
    )


def _pidfd_works() -> bool:
    # os.pidfd_open exists on Linux builds of Python, but a kernel before 5.3 (or a seccomp filter) says ENOSYS.
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


def _has_prctl() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return hasattr(ctypes.CDLL(None, use_errno=True), "prctl")
    except OSError:
        return False


def _native_watch(platform: str) -> str | None:
    """The notifier watchfiles (the notify crate) uses on this OS."""
    if platform.startswith("linux"):
        return "inotify"
    if platform == "darwin":
        return "FSEvents"
    if "bsd" in platform or platform.startswith("dragonfly"):
        return "kqueue"
    return None
