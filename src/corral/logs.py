"""What corral prints: worker state changes (one format), relayed worker output, the access log.

Nothing here raises on an output error: a corral whose stdout reader went away (`corral run | head`)
must go on serving, so a dead stdout or stderr is pointed at /dev/null and log files keep working.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .worker import Worker

TAIL_LINES = 30
MAX_LINE = 64 * 1024


def say(line: str) -> None:
    write(sys.stdout, line + "\n")


def warn(line: str) -> None:
    write(sys.stderr, line + "\n")


def write(stream: IO[str], text: str) -> None:
    """Write and flush; never raise. Text that cannot be written is lost, and the service goes on."""
    try:
        stream.write(text)
        stream.flush()
    except UnicodeError:  # a lone surrogate (a path, a header): the stream is fine, escape the text
        enc = getattr(stream, "encoding", None) or "utf-8"
        write(stream, text.encode(enc, "backslashreplace").decode(enc))
    except (OSError, ValueError) as exc:  # ValueError: the stream was closed
        _discard(stream, exc)


def _discard(stream: IO[str], exc: Exception) -> None:
    # A broken stdout/stderr fails every later write too (and the flush at exit): send it to /dev/null
    # once. A log file is left alone, so it works again once the disk has room.
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return
    if fd not in (1, 2):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    if fd == 1:
        why = getattr(exc, "strerror", None) or exc
        warn(f"corral: stdout is gone ({why}); its output is discarded from now on, log files are still written")


def event(worker: Worker, state: str, reason: str) -> None:
    """Every worker state change, one format: `corral: worker APP:I STATE: reason`."""
    say(f"corral: worker {worker.name} {state}: {reason}")


class WorkerOutput(asyncio.Protocol):
    """Relays one worker pipe line by line with a [name:index] prefix; keeps a tail for crash reports.

    Reading never stops (so the worker never blocks on a full pipe); a line longer than MAX_LINE is
    cut into pieces rather than held.
    """

    def __init__(self, worker: Worker, sink: IO[str] | None) -> None:
        self.worker = worker
        self.prefix = f"[{worker.name}] "
        self.partial = b""
        self.sink = sink

    @classmethod
    def attach(cls, loop: asyncio.AbstractEventLoop, worker: Worker, log_dir: str | None) -> None:
        proc = worker.proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        sink = cls._log_file(worker, log_dir) if log_dir else None
        for pipe in (proc.stdout, proc.stderr):
            loop.create_task(loop.connect_read_pipe(lambda: cls(worker, sink), pipe))

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

    def _emit(self, lines: list[bytes]) -> None:
        if not lines:
            return
        texts = [line.decode("utf-8", "replace").rstrip("\r") for line in lines]
        tail = self.worker.tail
        tail.extend(texts)
        del tail[:-TAIL_LINES]
        out = "".join(f"{self.prefix}{t}\n" for t in texts)
        write(sys.stdout, out)
        if self.sink is not None:
            write(self.sink, out)


class AccessLog:
    """One line per request: time, method, path, status, bytes, queue wait, service time, worker, client, id."""

    def __init__(self, target: str, fmt: str) -> None:
        self.json = fmt == "json"
        self.out: IO[str] = sys.stdout if target == "-" else open(target, "a", buffering=1)  # noqa: SIM115

    def __call__(self, ex: Any) -> None:  # an exchange.Exchange: logs sits below it, so no import
        now = time.time()
        wait = (ex.dispatched_at - ex.created) if ex.dispatched_at else (time.monotonic() - ex.created)
        service = (time.monotonic() - ex.dispatched_at) if ex.dispatched_at else 0.0
        worker = ex.served_by
        rec: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
            "method": ex.head.method.decode("latin-1"),
            "path": ex.head.target.decode("latin-1"),
            "status": ex.status,
            "bytes": ex.bytes_out,
            "queue_wait_ms": round(wait * 1000, 3),
            "service_ms": round(service * 1000, 3),
            "worker": worker.index if worker is not None else None,
            "client": ex.client.peer.decode(),
            "request_id": ex.request_id.decode("latin-1"),
        }
        if self.json:
            line = json.dumps(rec) + "\n"
        else:
            line = (
                f'{rec["time"]} {rec["client"]} "{rec["method"]} {rec["path"]}" {rec["status"]} {rec["bytes"]} '
                f"wait={rec['queue_wait_ms']}ms service={rec['service_ms']}ms worker={rec['worker']} "
                f"id={rec['request_id']}\n"
            )
        write(self.out, line)
