"""Worker processes as the operating system sees them: what a child does before exec, how an exit reads,
whether a port is free, how much memory a process tree holds."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket

import psutil

from ..datapath.worker import DIED, KILLED, STOPPED
from ..net import PORT_MAX
from ..portable import paths
from .deathpipe import register_self

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, guardian: int = -1) -> None:
    """Runs in the child between fork and exec: no worker may outlive corral, even a SIGKILLed one. Linux's
    PDEATHSIG, or (`guardian`: the death pipe's write end) the death-pipe guardian told of this PID."""
    if guardian >= 0:
        register_self(guardian)
    else:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # AttributeError: a libc without prctl (macOS)
            pass
    if os.getppid() != parent:  # corral died before prctl took effect (the guardian kills it at exec)
        os._exit(1)


def prepare_child(parent: int, scheduling: str, guardian: int = -1) -> None:
    """Runs in the child between fork and exec (subprocess's preexec_fn)."""
    die_with_parent(parent, guardian)
    if scheduling == "batch" and paths().sched_batch:
        # Inherited by exec and by every thread the worker starts (httpuv's I/O thread included). A worker
        # woken by corral's write then no longer preempts corral before it has handed the other workers
        # theirs; only Linux has the policy, and it needs no privilege.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


# Signals that kill from outside: an operator's kill, the OOM killer (SIGKILL), a node drain (SIGTERM). A shell
# wrapper reports its child's death by signal N as exit status 128 + N.
_OUTSIDE = (signal.SIGKILL, signal.SIGTERM)
_OUTSIDE_STATUS = tuple(128 + s for s in _OUTSIDE)


def exit_cause(code: int, sent: int) -> str:
    """Why a worker's process ended, from its wait status (`Popen.returncode`) and the last signal corral sent it
    (0: none). STOPPED when corral had signalled it, whatever the exit; KILLED for SIGKILL or SIGTERM from
    anyone else; DIED for the rest: an exit status or any other signal (SIGSEGV, SIGABRT, SIGBUS, SIGINT)."""
    if sent:
        return STOPPED
    if -code in _OUTSIDE or code in _OUTSIDE_STATUS:
        return KILLED
    return DIED


def describe_error(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def port_free(host: str, port: int) -> bool:
    if not 0 < port <= PORT_MAX:
        return False
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def tree_rss(pid: int | None) -> int:
    """Resident memory of a process and all its descendants (R may fork helpers)."""
    if pid is None:
        return 0
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total
