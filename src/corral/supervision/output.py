"""Worker output: each worker's stdout and stderr relayed line by line, prefixed, into corral's stdout,
the log ring and (with --log-dir) a file per worker."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import time
from typing import IO, TYPE_CHECKING

from .. import logring
from ..logs import RING, warn, write

if TYPE_CHECKING:
    from ..datapath.worker import Worker

TAIL_LINES = 30
MAX_LINE = 64 * 1024


class WorkerOutput(asyncio.Protocol):
    """Relays one worker pipe line by line with a [name:index] prefix; keeps a tail for crash reports.

    Reading never stops (so the worker never blocks on a full pipe); a line longer than MAX_LINE is
    cut into pieces rather than held.
    """

    def __init__(self, worker: Worker, sink: IO[str] | None, stream: str = "stdout") -> None:
        self.worker = worker
        self.prefix = f"[{worker.name}] "
        self.partial = b""
        self.sink = sink  # not None: the worker writes worker.logs (read per line: SIGUSR1 may reopen it)
        self.stream = stream

    @classmethod
    def attach(cls, loop: asyncio.AbstractEventLoop, worker: Worker, log_dir: str | None) -> None:
        proc = worker.proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        sink = cls._log_file(worker, log_dir) if log_dir else None
        worker.pipes_open = 2
        for pipe, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
            loop.create_task(loop.connect_read_pipe(functools.partial(cls, worker, sink, name), pipe))

    @staticmethod
    def _log_file(worker: Worker, log_dir: str) -> IO[str] | None:
        if worker.logs is None:
            try:
                os.makedirs(log_dir, exist_ok=True)
                worker.logs = open(os.path.join(log_dir, f"{worker.app}-{worker.index}.log"), "a")  # noqa: SIM115
            except OSError as exc:  # the worker still starts: its output goes to stdout only
                warn(f"corral: cannot write worker {worker.name}'s log in {log_dir}: {exc.strerror or exc}")
        return worker.logs

    def data_received(self, data: bytes) -> None:
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > MAX_LINE:
            lines.append(self.partial)
            self.partial = b""
        self._emit(lines)

    def eof_received(self) -> bool:
        if self.partial:
            self._emit([self.partial])
            self.partial = b""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.pipes_open -= 1

    def _emit(self, lines: list[bytes]) -> None:
        if not lines:
            return
        texts = [line.decode("utf-8", "replace").rstrip("\r") for line in lines]
        worker = self.worker
        tail = worker.tail
        tail.extend(texts)
        del tail[:-TAIL_LINES]
        now = time.time()
        for t in texts:
            RING.add(worker.name, t, app=worker.app, worker=worker.index, stream=self.stream, when=now)
        ts = logring.stamp(now)
        plain = "".join(f"{ts} {self.prefix}{t}\n" for t in texts)
        if logring.coloured(sys.stdout):
            dim_ts = logring.paint(ts, logring.DIM, True)
            prefix = logring.paint(self.prefix[:-1], logring.worker_colour(worker.index), True)
            write(sys.stdout, "".join(f"{dim_ts} {prefix} {t}\n" for t in texts))
        else:
            write(sys.stdout, plain)
        if self.sink is not None and worker.logs is not None:
            write(worker.logs, plain)


def reopen_worker_log(worker: Worker, log_dir: str) -> bool:
    """SIGUSR1 (logrotate): close the worker's --log-dir file and open its path afresh. True when reopened."""
    old = worker.logs
    if old is None:
        return False
    try:
        worker.logs = open(os.path.join(log_dir, f"{worker.app}-{worker.index}.log"), "a")  # noqa: SIM115
    except OSError as exc:  # keep writing the old (renamed) file rather than lose the output
        warn(f"corral: cannot reopen worker {worker.name}'s log in {log_dir}: {exc.strerror or exc}")
        return False
    with contextlib.suppress(OSError):
        old.close()
    return True


def error_lines(tail: list[str], most: int = 15) -> list[str]:
    """A failed worker's error: its output from the first line that starts an error (R's `Error in
    parse(...)` comes before the `Error in parseUTF8` that repeats it; a Python `Traceback`), else its
    last lines; at most `most` lines."""
    start = next((i for i, line in enumerate(tail) if line.lstrip().startswith(("Error", "Traceback"))), None)
    lines = tail[start : start + most] if start is not None else tail[-most:]
    return lines or ["(the worker printed nothing)"]
