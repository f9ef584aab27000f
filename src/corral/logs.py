"""What corral prints: worker state changes (one format), relayed worker output, the access log.

Nothing here raises on an output error: a corral whose stdout reader went away (`corral run | head`)
must go on serving, so a dead stdout or stderr is pointed at /dev/null and log files keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sys
import time
from typing import IO, TYPE_CHECKING, Any

from . import logring

if TYPE_CHECKING:
    from .worker import Worker

TAIL_LINES = 30
MAX_LINE = 64 * 1024
RING = logring.Ring()  # what `corral logs` reads (GET /logs); sized from log_buffer by the server


def say(line: str, *, app: str | None = None, worker: int | None = None) -> None:
    """One of corral's own lines on stdout, timestamped, and into the ring. `app`/`worker` tag a line
    about one worker, so `corral logs --worker I` shows it next to that worker's output."""
    _own(sys.stdout, "stdout", line, app, worker, "")


def warn(line: str, *, app: str | None = None, worker: int | None = None) -> None:
    _own(sys.stderr, "stderr", line, app, worker, logring.YELLOW)


def _own(
    stream: IO[str], name: str, text: str, app: str | None, worker: int | None, colour: str, shown: str | None = None
) -> None:
    now = time.time()
    on = logring.coloured(stream)
    ts = logring.paint(logring.stamp(now), logring.DIM, on)
    out = []
    for line in text.split("\n"):  # a multi-line message (a trace, a worker's last lines): each line stamped
        RING.add("corral", line, app=app, worker=worker, stream=name, when=now)
        out.append(f"{ts} {shown if on and shown else logring.paint(line, colour, on)}\n")
    write(stream, "".join(out))


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
    """Every worker state change, one format: `corral: worker APP:I STATE: reason` (the state coloured
    on a terminal)."""
    line = f"corral: worker {worker.name} {state}: {reason}"
    word = logring.paint(state, logring.STATE_COLOURS.get(state, ""), True)
    shown = f"corral: worker {worker.name} {word}: {reason}"
    _own(sys.stdout, "stdout", line, worker.app, worker.index, "", shown=shown)


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


class AccessLog:
    """One line per request: time, method, path, status, bytes, queue wait, service time, worker, client, id,
    trace id."""

    def __init__(self, target: str, fmt: str) -> None:
        self.json = fmt == "json"
        self.target = target
        self.out: IO[str] = sys.stdout if target == "-" else open(target, "a", buffering=1)  # noqa: SIM115

    def reopen(self) -> bool:
        """SIGUSR1 (logrotate): open the path afresh, so lines go to the new file, not the renamed one."""
        if self.target == "-":
            return False
        try:
            new = open(self.target, "a", buffering=1)  # noqa: SIM115
        except OSError as exc:  # keep the old file rather than lose lines
            warn(f"corral: cannot reopen the access log {self.target}: {exc.strerror or exc}")
            return False
        old, self.out = self.out, new
        with contextlib.suppress(OSError):
            old.close()
        return True

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
            "trace_id": ex.traceparent[3:35].decode("latin-1"),  # W3C trace id (tracing.trace_id)
            "outcome": ex.outcome,  # served, failed, refused, abandoned (exchange.OUTCOMES)
            "cut": ex.cut,  # why the response did not reach the client whole; "" when it did
        }
        if self.json:
            line = json.dumps(rec) + "\n"
        else:
            line = (
                f'{rec["time"]} {rec["client"]} "{rec["method"]} {rec["path"]}" {rec["status"]} {rec["bytes"]} '
                f"wait={rec['queue_wait_ms']}ms service={rec['service_ms']}ms worker={rec['worker']} "
                f"id={rec['request_id']} trace={rec['trace_id']}"
                + (f" cut={ex.cut.replace(' ', '_')}" if ex.cut else "")
                + "\n"
            )
        write(self.out, line)
