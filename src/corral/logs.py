"""What corral prints: worker state changes (one format), relayed worker output, the access log."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .proxy import Exchange
    from .worker import Worker

TAIL_LINES = 30
MAX_LINE = 64 * 1024


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


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
        sink = None
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            if worker.logs is None:
                worker.logs = open(os.path.join(log_dir, f"{worker.app}-{worker.index}.log"), "a")  # noqa: SIM115
            sink = worker.logs
        for pipe in (proc.stdout, proc.stderr):
            loop.create_task(loop.connect_read_pipe(lambda: cls(worker, sink), pipe))

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
        sys.stdout.write(out)
        sys.stdout.flush()
        if self.sink is not None:
            self.sink.write(out)
            self.sink.flush()


class AccessLog:
    """One line per request: time, method, path, status, bytes, queue wait, service time, worker, client, id."""

    def __init__(self, target: str, fmt: str) -> None:
        self.json = fmt == "json"
        self.out: IO[str] = sys.stdout if target == "-" else open(target, "a", buffering=1)  # noqa: SIM115

    def __call__(self, ex: Exchange) -> None:
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
            self.out.write(json.dumps(rec) + "\n")
        else:
            self.out.write(
                f'{rec["time"]} {rec["client"]} "{rec["method"]} {rec["path"]}" {rec["status"]} {rec["bytes"]} '
                f"wait={rec['queue_wait_ms']}ms service={rec['service_ms']}ms worker={rec['worker']} "
                f"id={rec['request_id']}\n"
            )
        self.out.flush()
