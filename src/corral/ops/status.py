"""The /status document: workers, queues and totals of a running corral, as JSON.

Built from one snapshot (snapshot.take) so every figure is read the same way as /metrics reads it; the
per-process figures that need a system call (RSS, CPU) are added here, where they are shown.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Protocol

import psutil

from .. import __version__
from ..datapath.worker import State
from ..supervision.processes import tree_rss
from . import snapshot

if TYPE_CHECKING:
    from ..config import Config
    from .snapshot import AppSnap, WorkerSnap


class Shown(snapshot.Fleet, Protocol):
    """What /status reads of a running corral (server.Corral, which sits above and is not imported)."""

    cfg: Config
    started: float
    balance: bool
    draining: bool


class StatusBuilder:
    """Turns the live objects into the /status document. Keeps psutil handles for cpu_percent."""

    def __init__(self, corral: Shown, address: str) -> None:
        self.corral = corral
        self.address = address
        self._procs: dict[int, psutil.Process] = {}

    def _cpu(self, pid: int | None) -> float:
        if pid is None:
            return 0.0
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            return proc.cpu_percent(None)  # since the previous call; 0.0 the first time
        except psutil.Error:
            self._procs.pop(pid, None)
            return 0.0

    def build(self) -> dict[str, Any]:
        c = self.corral
        snap = snapshot.take(c, time.monotonic())
        apps = [self._app(app) for app in snap.apps]
        self._forget_gone({w.pid for a in snap.apps for w in a.workers})
        server = c.cfg.server
        return {
            "corral": {
                "version": __version__,
                "pid": os.getpid(),
                "uptime_s": round(time.time() - c.started, 1),
                "listen": f"http://{server.host}:{server.port}" if c.balance else None,
                "admin": self.address,
                "draining": c.draining,  # a stop has begun (/readyz answers 503)
            },
            "apps": apps,
            "totals": _totals(snap),
        }

    def _forget_gone(self, live: set[int | None]) -> None:
        for pid in [p for p in self._procs if p not in live]:
            del self._procs[pid]

    def _app(self, app: AppSnap) -> dict[str, Any]:
        q = app.queue
        return {
            "name": app.name,
            "route": app.route,
            "desired": app.desired,
            "ready": app.ready,
            "generation": app.generation,
            "reloading": app.reloading,
            "reload_note": app.reload_note,
            "supervised": app.supervised,
            "worker_ceiling": app.ceiling,  # most workers /scale accepts
            "autoscale": _autoscale_doc(app),
            "workers": [self._worker(w) for w in app.workers],
            "queue": {
                "depth": q.depth,
                "max": q.max,
                "rejected": q.rejected,
                "timed_out": q.timed_out,
                "refused_early": q.refused_early,  # admission control: predicted wait > queue_timeout
                "oldest_wait_s": round(q.oldest_wait, 3),
            },
            "served": app.served,
            "failed": app.failed,
            "refused": app.refused,
            "abandoned": app.abandoned,
            "cut": dict(app.cut),  # responses that did not reach the client whole, by why
            "retried": app.retried,
            "dispatch": app.dispatch,
            "long_inflight": q.long_inflight,
            "routes": list(app.routes),  # learned per-route cost and class, busiest first
            "restarts": dict(app.restarts),
            "restarts_total": app.restarts_total,
            "crash_loop": _crash_loop_doc(app),
            "sticky": app.sticky,
            "sessions": _sessions_doc(app),
            "fair": _fair_doc(app),
            "scale_to_zero": _zero_doc(app),
            "redispatched": app.redispatched,  # sent again to another worker: theirs was killed from outside
            "quarantine": _quarantine_doc(app),
        }

    def _worker(self, w: WorkerSnap) -> dict[str, Any]:
        return {
            "index": w.index,
            "pid": w.pid,
            "port": w.port,
            "socket": w.socket,  # worker_transport unix: where corral reaches it (port is 0 then)
            "state": w.display,
            "inflight": w.inflight,
            "max_inflight": w.max_inflight,
            "served": w.served,
            "failed": w.failed,
            "restarts": w.restarts,
            "rss_bytes": tree_rss(w.pid) if w.state is not State.STOPPED else 0,
            "cpu_percent": round(self._cpu(w.pid), 1),
            "uptime_s": round(w.age, 1),
            "generation": w.generation,
            "external": w.external,
            "note": w.note,
            "sessions": w.sessions,  # open WebSocket sessions; they never count in inflight
        }


def _crash_loop_doc(app: AppSnap) -> dict[str, Any] | None:
    c = app.crash_loop
    if c is None:
        return None
    return {
        "for_s": round(c.for_s, 1),
        "exits": c.exits,
        "limit": c.limit,
        "window_s": c.window,
        "worker": c.worker,
        "last_lines": list(c.last_lines),
    }


def _zero_doc(app: AppSnap) -> dict[str, Any] | None:
    """Scale to zero (min_workers 0): its state (idle (scaled to zero), scaling to zero, cold start, start
    failed, running), for how long, and its cold starts so far."""
    z = app.zero
    if z is None:
        return None
    return {
        "state": z.state or "running",
        "for_s": round(z.for_s, 1),
        "cold_starts": z.cold_starts,
        "cold_start_failures": z.failures,
        "last_cold_start_s": round(z.last_cold_start, 3) if z.last_cold_start is not None else None,
        "refused": z.refused,  # requests answered 503 because a start from zero had failed
    }


def _autoscale_doc(app: AppSnap) -> dict[str, Any] | None:
    a = app.autoscale
    if a is None:
        return None
    return {
        "min_workers": a.min_workers,
        "max_workers": a.max_workers,
        "scale_up_wait": a.scale_up_wait,
        "idle_timeout": a.idle_timeout,
        "last_reason": a.last_reason,
    }


def _totals(snap: snapshot.Snapshot) -> dict[str, int]:
    apps = snap.apps
    workers = [w for a in apps for w in a.workers]
    return {
        "workers": len(workers),
        "ready": sum(1 for w in workers if w.display in ("ready", "busy")),
        "busy": sum(1 for w in workers if w.display == "busy"),
        "inflight": sum(w.inflight for w in workers),
        "served": sum(a.served for a in apps),
        "failed": sum(a.failed for a in apps),
        "refused": sum(a.refused for a in apps),
        "abandoned": sum(a.abandoned for a in apps),
        "cut": sum(sum(a.cut.values()) for a in apps),
        "restarts": sum(a.restarts_total for a in apps),
        "queued": sum(a.queue.depth for a in apps),
        "rejected": sum(a.queue.rejected for a in apps),
        "timed_out": sum(a.queue.timed_out for a in apps),
        "sessions": sum(a.sessions for a in apps),
    }


def _fair_doc(app: AppSnap) -> dict[str, Any] | None:
    """Fair queueing: the key, the per-client cap and its 429s, and the heaviest clients (truncated and hashed)
    with their share of the worker time of the last minute or two."""
    f = app.fair
    if f is None:
        return None
    return {
        "key": f.key,
        "max_queue_per_client": f.max_per_client,
        "rejected": f.rejected,
        "waiting_clients": f.waiting_clients,
        "clients": [
            {"client": c.key, "share": round(c.share, 4), "queued": c.queued, "inflight": c.inflight} for c in f.clients
        ],
    }


def _sessions_doc(app: AppSnap) -> dict[str, int]:
    """WebSocket sessions: open now, the per-worker limit, ever opened, refused with 503."""
    return {
        "open": app.sessions,
        "max_per_worker": app.max_sessions,
        "opened": app.sessions_opened,
        "rejected": app.sessions_rejected,
    }


def _quarantine_doc(app: AppSnap) -> dict[str, Any] | None:
    """Requests that made workers exit, answered 502 without reaching a worker until they lift."""
    q = app.quarantine
    if q is None:
        return None
    return {
        "period_s": q.period,
        "refused": q.refused,
        "total": q.total,
        "requests": [
            {"route": e.route, "digest": e.digest, "deaths": e.deaths, "for_s": round(e.for_s, 1),
             "left_s": round(e.left_s, 1)}
            for e in q.entries
        ],
    }  # fmt: skip
