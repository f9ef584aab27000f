"""Health checks that do not lie about single-threaded workers.

A busy single-threaded worker cannot answer a probe, so a probe never goes to a worker that holds a
request: a probe that falls due while the worker is busy waits for it to free (the worker takes no new
request meanwhile) and then goes first, so every worker is probed at least once per interval, under
load too. A busy worker is also judged by its process being alive (the supervisor) and its request
deadline (the pool). A probe gives way to a real request that has waited PROBE_GRACE
(pool._preempt_probe). External workers (`upstreams`) are found and dropped by the same probes.
"""

from __future__ import annotations

import asyncio
import errno
import time
from typing import TYPE_CHECKING

from ..datapath.worker import State, Worker
from ..logs import event

if TYPE_CHECKING:
    from ..config import AppConfig
    from ..datapath.pool import Pool


REFUSED = "connection refused"  # nothing listens there: certain, unlike a timeout
OUT_OF_FDS = "corral is out of file descriptors"


async def probe(host: str, port: int, path: str | None, timeout: float, unix: str | None = None) -> tuple[bool, str]:
    """GET the health path (any HTTP answer on / when there is none). True when it passes.
    `unix`: the worker's Unix socket, probed instead of host:port."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            if unix is not None:
                reader, writer = await asyncio.open_unix_connection(unix)
                authority = "localhost"
            else:
                reader, writer = await asyncio.open_connection(host, port)
                authority = f"{host}:{port}"
            target = path or "/"
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: corral-health\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            line = await reader.readline()
    except TimeoutError:
        return False, f"no answer within {timeout:g}s"
    except ConnectionRefusedError:
        return False, REFUSED
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return False, OUT_OF_FDS
        return False, exc.strerror or str(exc)
    finally:
        if writer is not None:
            writer.close()
    parts = line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return False, "not an HTTP answer"
    status = int(parts[1])
    if path is None or 200 <= status < 400:
        return True, str(status)
    return False, f"status {status}"


class HealthChecker:
    """Periodic probes of one pool's idle workers, and discovery of its external workers."""

    def __init__(self, app: AppConfig, pool: Pool) -> None:
        self.app = app
        self.pool = pool
        self.stopping = False
        mark = pool.on_unreachable

        def unreachable(worker: Worker, why: str) -> None:
            was = worker.state
            mark(worker, why)
            if worker.external and was is State.READY and worker.state is not State.READY:
                event(worker, worker.state.value, f"{worker.address} {why}; out of rotation until a probe answers")

        pool.on_unreachable = unreachable
        pool.on_probe_due = self.start_probe

    async def run(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            for worker in list(self.pool.workers):
                if worker.probing or worker.probe_due:
                    continue
                if self._due(worker, now):
                    if worker.inflight:
                        # Busy workers are probed too, or a worker under steady load would never be:
                        # it takes no new request until it frees, then the probe goes first.
                        worker.probe_due = True
                    else:
                        self.start_probe(worker)
            await asyncio.sleep(self._tick())

    def _tick(self) -> float:
        return max(0.05, min(self.app.health_interval / 4, 1.0))

    def _due(self, worker: Worker, now: float) -> bool:
        since = now - worker.last_probe
        if worker.external and worker.state is not State.READY:
            return since >= min(self.app.health_interval, 1.0)  # absent workers are looked for often
        return worker.state is State.READY and since >= self.app.health_interval

    def start_probe(self, worker: Worker) -> None:
        worker.probe_due = False
        worker.probing = True
        worker.probe_started = time.monotonic()
        asyncio.get_running_loop().create_task(self._check(worker))

    async def _check(self, worker: Worker) -> None:
        # A server that serves one connection at a time would never see a probe behind our idle
        # keep-alive connection: hand that connection back first.
        self.pool.close_idle(worker)
        try:
            ok, detail = await probe(
                worker.host, worker.port, self.app.health_path, self.app.health_timeout, unix=worker.socket
            )
            preempted = not worker.probing
            worker.probing = False
            worker.last_probe = time.monotonic()
            # The verdict comes before the queue moves: a worker found failing is out before it takes a
            # request, so replacing it costs no request. Two cases say nothing about the worker: corral's
            # own fd shortage, and a failure after a real request took the worker mid-probe (that
            # request is the better probe).
            if detail == OUT_OF_FDS:
                self.pool.out_of_descriptors("health probes skipped")
            elif ok or not preempted:
                self._verdict(worker, ok, detail)
        finally:
            worker.probing = False
            self.pool.pump()  # a request may have queued rather than wait on this worker

    def _verdict(self, worker: Worker, ok: bool, detail: str) -> None:
        pool = self.pool
        if ok:
            worker.probe_fails = 0
            if worker.state in (State.STARTING, State.UNHEALTHY, State.STOPPED) and worker.external:
                worker.ready_at = time.monotonic()
                pool.set_state(worker, State.READY)
                event(worker, "ready", f"{worker.address} answered its probe ({detail})")
            return
        if worker.state is not State.READY:
            if worker.state is State.STARTING and worker.external:
                pool.set_state(worker, State.STOPPED)  # not there (yet): keep looking, quietly
            return
        worker.probe_fails += 1
        if worker.external and detail == REFUSED:
            # An upstream whose port refuses has gone away: out at once, probes bring it back.
            worker.stop_reason = f"{worker.address} {detail}"
            pool.set_state(worker, State.UNHEALTHY)
            event(worker, "unhealthy", f"{worker.stop_reason}; out of rotation until a probe answers")
            return
        if worker.probe_fails >= self.app.health_fails:
            worker.stop_reason = f"{worker.probe_fails} failed probes while idle (last: {detail})"
            pool.set_state(worker, State.UNHEALTHY)
            event(worker, "unhealthy", worker.stop_reason)


def external_workers(app: AppConfig) -> list[Worker]:
    from ..config import parse_upstream

    out = []
    index = 0
    for spec in app.upstreams:
        for host, port in parse_upstream(spec):
            w = Worker(app.name, index, host, port, app.max_inflight, external=True)
            w.last_probe = -1e9  # probe at once
            out.append(w)
            index += 1
    return out
