"""What corral prints: its own lines, worker state changes (one format) and the access log.

Worker output is relayed by supervision.output.

Nothing here raises on an output error: a corral whose stdout reader went away (`corral run | head`)
must go on serving, so a dead stdout or stderr is pointed at /dev/null and log files keep working.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import IO, Any, Protocol

from . import logring


class Named(Protocol):
    """What a log line needs of a worker (a datapath.worker.Worker; logs sits below it)."""

    name: str
    app: str
    index: int


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


def event(worker: Named, state: str, reason: str) -> None:
    """Every worker state change, one format: `corral: worker APP:I STATE: reason` (the state coloured
    on a terminal)."""
    line = f"corral: worker {worker.name} {state}: {reason}"
    word = logring.paint(state, logring.STATE_COLOURS.get(state, ""), True)
    shown = f"corral: worker {worker.name} {word}: {reason}"
    _own(sys.stdout, "stdout", line, worker.app, worker.index, "", shown=shown)


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
            "outcome": ex.outcome,  # served, failed, refused, abandoned (datapath/outcomes.py OUTCOMES)
            "cut": ex.cut,  # why the response did not reach the client whole; "" when it did
            "redispatched": getattr(ex, "redispatched", False),  # sent again: its first worker was killed
        }
        if self.json:
            line = json.dumps(rec) + "\n"
        else:
            line = (
                f'{rec["time"]} {rec["client"]} "{rec["method"]} {rec["path"]}" {rec["status"]} {rec["bytes"]} '
                f"wait={rec['queue_wait_ms']}ms service={rec['service_ms']}ms worker={rec['worker']} "
                f"id={rec['request_id']} trace={rec['trace_id']}"
                + (f" cut={ex.cut.replace(' ', '_')}" if ex.cut else "")
                + (" redispatched" if rec["redispatched"] else "")
                + "\n"
            )
        write(self.out, line)
