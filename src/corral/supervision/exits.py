"""How corral learns that a worker process exited, in the event loop, with no thread per child.

Two watchers, chosen at start (corral.portable):

* pidfd (Linux): a descriptor per process that turns readable when it exits, added to the loop's reader set.
* SIGCHLD (any POSIX: macOS, or Linux under CORRAL_PORTABLE=1): one handler for the whole process; on each
  signal it polls the processes it was given (Popen.poll: waitpid(pid, WNOHANG) on that PID only), so a
  child corral did not start through it is never reaped here. Signals coalesce, so every signal polls all
  of them; that is a few syscalls per exit for the workers of one machine, and none per request.

`watch(proc, exited)` calls `exited(returncode)` once, in the loop, after the process has been reaped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable

from ..portable import paths

Exited = Callable[[int], None]


class PidfdWatcher:
    name = "pidfd"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def watch(self, proc: subprocess.Popen[bytes], exited: Exited) -> None:
        """Raises OSError when no descriptor is left: the caller must not let that process live on unwatched."""
        fd = os.pidfd_open(proc.pid)

        def readable() -> None:
            self.loop.remove_reader(fd)
            os.close(fd)
            exited(proc.wait())

        self.loop.add_reader(fd, readable)


class SigchldWatcher:
    name = "SIGCHLD"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.watched: dict[int, tuple[subprocess.Popen[bytes], Exited]] = {}
        self._previous: object = None
        try:
            loop.add_signal_handler(signal.SIGCHLD, self.sweep)
        except RuntimeError:
            # uvloop keeps SIGCHLD for the processes it spawns itself (corral spawns none through it): a plain
            # Python handler then runs when uvloop reads its wakeup descriptor, and hands the sweep to the loop.
            self._previous = signal.signal(signal.SIGCHLD, lambda _sig, _frame: loop.call_soon_threadsafe(self.sweep))

    def watch(self, proc: subprocess.Popen[bytes], exited: Exited) -> None:
        self.watched[proc.pid] = (proc, exited)
        # The process may have exited before it was watched: its SIGCHLD came when it was not in the table.
        self.loop.call_soon(self.sweep)

    def sweep(self) -> None:
        for pid, (proc, exited) in list(self.watched.items()):
            if proc.poll() is not None:  # waitpid(pid, WNOHANG) on this PID alone, or its returncode already known
                del self.watched[pid]
                exited(proc.returncode)

    def close(self) -> None:
        if self._previous is None:
            self.loop.remove_signal_handler(signal.SIGCHLD)
        else:
            signal.signal(signal.SIGCHLD, self._previous)  # type: ignore[arg-type]


Watcher = PidfdWatcher | SigchldWatcher
_by_loop: dict[asyncio.AbstractEventLoop, Watcher] = {}


def watcher(loop: asyncio.AbstractEventLoop) -> Watcher:
    """The loop's one watcher (a process has one SIGCHLD handler: every supervisor shares it)."""
    found = _by_loop.get(loop)
    if found is None or loop.is_closed():
        for gone in [lp for lp in _by_loop if lp.is_closed()]:
            del _by_loop[gone]
        found = _by_loop[loop] = SigchldWatcher(loop) if paths().portable_exits else PidfdWatcher(loop)
    return found
