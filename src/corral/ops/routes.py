"""What each admin endpoint answers, once the channel (admin.py) has let the request through.

    GET  /          the dashboard (one self-contained page that polls /status and /series)
    GET  /status    workers, queues and totals as JSON
    GET  /series    the last minutes of queue depth, request rate and latency quantiles, as JSON
    GET  /metrics   Prometheus text format
    POST /reload    rolling replacement of every worker (?app=NAME for one app)
    POST /scale     ?workers=N (&app=NAME when there are several apps)
    POST /stop      graceful stop, as SIGTERM
    GET  /logs      recent worker output and corral's own lines (?after=SEQ&n=N&worker=I|APP:I&app=NAME), as
                    JSON lines, oldest first, each with a sequence number (`corral logs -f` asks after the last)
    GET  /livez     200 while the event loop runs (probes.py; no token needed, no data)
    GET  /readyz    200 while every app has ready_min ready workers and corral is not stopping, else 503

Every answer is (status, body, content type), built in memory: the admin channel is not the hot path.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Protocol
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST

from .. import logs
from . import dashboard, metrics, probes, snapshot
from .status import Shown, StatusBuilder

LOGS_PAGE = 10_000  # most log lines one GET /logs returns: an answer is built in memory (lines are <= 4 KiB)
ROUTES: dict[str, str] = {
    "/": "GET",
    "/status": "GET",
    "/series": "GET",
    "/metrics": "GET",
    "/reload": "POST",
    "/scale": "POST",
    "/stop": "POST",
    "/logs": "GET",
    "/livez": "GET",
    "/readyz": "GET",
}
# Answered without the token: the page is a static shell that sends the token itself, and a probe is a
# status code and a fixed word (as on --health-listen).
OPEN = ("/", *probes.PATHS)

Answer = tuple[int, bytes, str]  # (status, body, content type)


class Corral(Shown, Protocol):
    """What the admin channel uses of server.Corral (which sits above it and is not imported)."""

    def stop(self) -> None: ...


def json_answer(status: int, doc: Any) -> Answer:
    return status, json.dumps(doc, indent=None, separators=(",", ":")).encode(), "application/json"


def unrouted(method: str, path: str) -> Answer | None:
    """404 for a path that is no endpoint, 405 for one asked with the wrong method; None when routed."""
    want = ROUTES.get(path)
    if want is None:
        return json_answer(404, {"error": f"no such admin endpoint: {path}", "endpoints": sorted(ROUTES)})
    if method != want:
        return json_answer(405, {"error": f"{path} takes {want}, not {method}"})
    return None


class Routes:
    """The endpoints of one running corral, and what they read: the request counters behind /metrics and
    /series (attached to every pool here), the /status builder and the dashboard's history."""

    def __init__(self, corral: Corral, address: str) -> None:
        self.corral = corral
        self.stats: dict[str, metrics.PoolStats] = {}
        for pool in corral.pools:
            self.stats[pool.name] = metrics.PoolStats()
            metrics.attach(pool, self.stats[pool.name])
        self.registry = metrics.registry_for(self._metrics_snapshot, corral.started, self.stats)
        self.status = StatusBuilder(corral, address)
        self.series = dashboard.Series(corral, self.stats)

    def _metrics_snapshot(self) -> snapshot.Snapshot:
        return snapshot.take(self.corral, time.monotonic(), routes=metrics.ROUTES_EXPORTED)

    def answer(self, path: str, query: str) -> Answer:
        """The answer for a routed request (see unrouted) that the channel has let through."""
        if path == "/":
            return 200, dashboard.page(), "text/html; charset=utf-8"
        if path in probes.PATHS:
            status, body = probes.answer(path, self.corral)
            return status, body, "text/plain; charset=utf-8"
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        if path == "/status":
            return json_answer(200, self.status.build())
        if path == "/series":
            return json_answer(200, self.series.document())
        if path == "/metrics":
            return 200, metrics.render(self.registry), CONTENT_TYPE_LATEST
        if path == "/logs":
            return _logs(params)
        if path == "/reload":
            return self._reload(params.get("app"))
        if path == "/scale":
            return self._scale(params.get("workers"), params.get("app"))
        return self._stop()

    def _pick(self, app: str | None) -> tuple[list[str], Answer | None]:
        sups = self.corral.supervisors
        if app is not None:
            if app in sups:
                return [app], None
            known = [p.name for p in self.corral.pools]
            if app in known:
                return [], json_answer(
                    400, {"error": f"app {app!r} balances external upstreams; corral does not run them"}
                )
            return [], json_answer(404, {"error": f"no app named {app!r}", "apps": known})
        if not sups:
            return [], json_answer(400, {"error": "no app whose workers corral runs"})
        return list(sups), None

    def _reload(self, app: str | None) -> Answer:
        # `corral reload` (no app) also reads the TLS certificate and key again, as SIGHUP does: certbot's
        # deploy hook runs either. A pair that does not load is refused and the old one keeps serving.
        tls = self.corral.reload_tls() if app is None else None
        if tls is not None and not self.corral.supervisors:
            return json_answer(202, {"ok": True, "messages": [tls]})
        names, err = self._pick(app)
        if err:
            return err
        reloads = [self.corral.supervisors[n].reload() for n in names]
        return json_answer(202, {"ok": True, "messages": ([tls] if tls else []) + reloads})

    def _scale(self, workers: str | None, app: str | None) -> Answer:
        if workers is None or not workers.isascii() or not workers.isdigit():
            return json_answer(400, {"error": "give workers=N with N >= 1"})
        names, err = self._pick(app)
        if err:
            return err
        if len(names) > 1:
            return json_answer(400, {"error": "several apps: give app=NAME", "apps": names})
        name, n = names[0], int(workers)
        scaler = self.corral.autoscalers.get(name)
        if n == 0 and (scaler is None or scaler.policy.min_workers != 0):
            # Zero only for an app that scales to zero: one without a worker would never start one again.
            error = "give workers=N with N >= 1 (0 only for an app with min_workers 0)"
            return json_answer(400, {"error": error, "ceiling": snapshot.ceiling(self.corral.supervisors[name].app)})
        if scaler is not None:  # its policy's bounds already lie within the ceiling
            return self._scale_to(name, scaler.policy.clamp(n), n)
        sup = self.corral.supervisors[name]
        top = snapshot.ceiling(sup.app)
        if n > top:  # each worker is a process and file descriptors: /scale?workers=100000 must not fork them
            return json_answer(400, {"error": _range_error(top), "ceiling": top})
        return self._scale_to(name, n, n)

    def _scale_to(self, name: str, n: int, asked: int) -> Answer:
        messages = [self.corral.supervisors[name].scale(n)]
        scaler = self.corral.autoscalers.get(name)
        if n != asked and scaler is not None:
            messages.append(f"autoscaled app: kept within {scaler.policy.min_workers}..{scaler.policy.max_workers}")
        return json_answer(202, {"ok": True, "workers": n, "messages": messages})

    def _stop(self) -> Answer:
        self.corral.draining = True  # /readyz turns 503 now, as on SIGTERM (a preStop hook relies on it)
        asyncio.get_running_loop().call_later(0.05, self.corral.stop)  # after this answer is written
        return json_answer(202, {"ok": True, "messages": ["stopping: finishing in-flight requests"]})


def _logs(params: dict[str, str]) -> Answer:
    """GET /logs: the ring's entries after `after`, the newest `n` of them (default 100), one JSON per line."""
    try:
        after = int(params.get("after", "0"))
        n = int(params.get("n", "100"))
    except ValueError:
        return json_answer(400, {"error": "after and n must be integers"})
    n = min(max(n, 0), LOGS_PAGE)
    entries = logs.RING.read(after, n, params.get("worker") or None, params.get("app") or None)
    body = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries)
    return 200, body.encode(), "application/x-ndjson"


def _range_error(top: int) -> str:
    why = "worker ceiling: max_workers, else 4 x CPUs and at least 16, within the open-file limit"
    return f"workers must be between 1 and {top} ({why})"
