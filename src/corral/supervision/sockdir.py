"""The private directory that holds the Unix sockets of workers started with worker_transport = unix.

A worker on a Unix socket is reachable by whoever may open its path, so every socket lives in one
directory per corral process, created 0700 and owned by corral's user: no other local user can reach
a worker behind the edge's back (loopback TCP ports have no such guard). The directory sits beside
the admin sockets ($XDG_RUNTIME_DIR/corral, else /tmp/corral-UID), is named after the process so a
later corral can sweep one left by a corral that was SIGKILLed, and is removed when corral exits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import stat
import sys
import tempfile

from ..net import socket_dirs

# sockaddr_un.sun_path holds 108 bytes on Linux, 104 on macOS and the BSDs; the last one is a NUL
SUN_PATH_MAX = 107 if sys.platform.startswith("linux") else 103
_OURS = re.compile(r"workers-(\d+)-\w+")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class SocketDirError(Exception):
    """The directory cannot be made private, or a path would not fit in a sockaddr_un."""


class SocketDir:
    """One corral process's worker socket directory, and the names of the sockets in it."""

    def __init__(self, base: str | None = None) -> None:
        self.base = base or socket_dirs()[0]
        _private_base(self.base)
        _sweep(self.base)
        self.path = tempfile.mkdtemp(prefix=f"workers-{os.getpid()}-", dir=self.base)  # mkdtemp: mode 0700
        self._serial = 0

    def socket_for(self, app: str, index: int, generation: int) -> str:
        """A fresh path for one worker. The serial makes it unique even for a replacement with the same
        app, index and generation (a crash restart, a recycle), so it never collides with its predecessor."""
        self._serial += 1
        name = f"{_UNSAFE.sub('_', app)[:40]}-{index}-g{generation}-{self._serial}.sock"
        path = os.path.join(self.path, name)
        if len(path.encode()) > SUN_PATH_MAX:
            raise SocketDirError(
                f"worker socket path {path} is longer than a unix socket allows ({SUN_PATH_MAX} bytes); "
                "set XDG_RUNTIME_DIR to a shorter directory"
            )
        return path

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _private_base(path: str) -> None:
    """Create the base 0700; refuse one that is not a directory of ours or that others may write to
    (they could swap our instance directory for their own)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise SocketDirError(f"worker socket directory {path} cannot be created ({exc.strerror or exc})") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise SocketDirError(f"worker socket directory {path} is not a private directory of this user; remove it")


def _sweep(base: str) -> None:
    """Remove instance directories whose corral is gone (SIGKILLed, power cut): their sockets are dead."""
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            m = _OURS.fullmatch(name)
            if m and not _alive(int(m.group(1))):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_instance: SocketDir | None = None


def instance() -> SocketDir:
    """This process's directory, created on first use and removed at exit (server.py also removes it
    when it stops, and on the second Ctrl-C, which skips atexit)."""
    global _instance
    if _instance is None:
        _instance = SocketDir()
        atexit.register(remove)
    return _instance


def remove() -> None:
    global _instance
    if _instance is not None:
        _instance.remove()
        _instance = None
