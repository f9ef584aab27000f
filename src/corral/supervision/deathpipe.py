"""The death pipe: no worker outlives corral, even a SIGKILLed one, where PR_SET_PDEATHSIG does not exist.

Linux kills each worker when corral dies (PDEATHSIG, processes.die_with_parent). Elsewhere (macOS, or Linux
under CORRAL_PORTABLE=1) one small guardian process does it for all of them:

* corral holds the only write end of a pipe; the guardian (a `python -c` of a few lines, in its own session so
  a terminal's Ctrl-C or hang-up never reaches it) holds the read end and reads worker PIDs from it;
* every worker writes its own PID there between fork and exec, before it can run a line of the app: had
  corral died in between, the child's inherited copy of the write end still keeps the pipe open until the
  exec, so the guardian learns the PID before it sees the end;
* corral writes `-PID` when it has reaped a worker, so the guardian never kills a process group whose number
  a later process may reuse;
* when the last write end closes (corral exited, however it died), the guardian reads EOF and SIGKILLs the
  process group of every PID still registered, then exits.

It costs one process per corral, a write per worker start and exit, and nothing per request. A guardian that
dies (`kill` by hand) is started again at the next worker start, with every live worker registered anew;
until then a start finds the pipe closed and the worker refuses to run (exit 1, with a line saying why).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

# The guardian: argv[1] is its read end. Reads `PID` and `-PID` lines until EOF, then kills what is left.
GUARDIAN = """\
# corral's death-pipe guardian
import os, signal, sys
fd, pids, rest = int(sys.argv[1]), set(), b""
while True:
    try:
        chunk = os.read(fd, 65536)
    except InterruptedError:
        continue
    if not chunk:
        break
    *lines, rest = (rest + chunk).split(b"\\n")
    for line in lines:
        if line.startswith(b"-"):
            pids.discard(int(line[1:]))
        elif line:
            pids.add(int(line))
for pid in pids:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""


class Guardian:
    """corral's side: the write end, the guardian process, and the PIDs it was told of."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.fd = -1  # the write end: held by corral alone (non-inheritable; a child holds it only until exec)
        self.pids: set[int] = set()

    def ensure(self) -> int:
        """The write end for the next worker to register on, with a live guardian behind it."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        return self.fd

    def started(self, pid: int) -> None:
        """A worker's Popen returned: it registered itself before exec; kept here for a new guardian."""
        self.pids.add(pid)

    def reaped(self, pid: int) -> None:
        """A worker was reaped: its PID (and process group number) may be reused from now on."""
        if pid in self.pids:
            self.pids.discard(pid)
            self._send(f"-{pid}\n".encode())

    def _start(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        read_end, write_end = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", GUARDIAN, str(read_end)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(read_end,),
                start_new_session=True,
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        os.set_blocking(write_end, False)  # never stall the event loop on a guardian that stopped reading
        self.fd = write_end
        if self.pids:
            self._send("".join(f"{pid}\n" for pid in sorted(self.pids)).encode())

    def _send(self, data: bytes) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.fd, data)


def register_self(fd: int) -> None:
    """Runs in the child between fork and exec: tell the guardian this PID, or refuse to become a worker that
    nothing would stop. SIGPIPE is back to its default here (subprocess restores it), so it is ignored for the
    write: a closed pipe is an error to report, not a silent death."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        os.write(fd, b"%d\n" % os.getpid())
    except OSError:
        os.write(2, b"corral: the death-pipe guardian is gone; not starting a worker it could not stop\n")
        os._exit(1)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)


_instance: Guardian | None = None


def instance() -> Guardian:
    global _instance
    if _instance is None:
        _instance = Guardian()
    return _instance
