"""The plumber worker fleet the harness owns.

The same worker processes serve corral and every peer in a scenario, so the
comparison measures the proxies, not differently warmed R processes.  The
harness restarts killed workers itself (T6) so corral and the peers face the
same recovery behaviour from the backend side.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from procs import HOST, Child, require_free, wait_http

APP = Path(__file__).resolve().parent / "app" / "plumber.R"
READY_PATH = "/fast"
START_TIMEOUT_S = 120.0

R_RUN = 'library(plumber); pr <- plumb("{app}"); pr$run(host="{host}", port=as.integer(Sys.getenv("PORT")), docs=FALSE)'


def upstream_spec(ports: Sequence[int]) -> str:
    """`HOST:LO-HI` for corral's --upstream; the harness only uses contiguous ranges."""
    lo, hi = min(ports), max(ports)
    if sorted(ports) != list(range(lo, hi + 1)):
        raise ValueError(f"ports are not contiguous: {ports}")
    return f"{HOST}:{lo}" if lo == hi else f"{HOST}:{lo}-{hi}"


class WorkerPool:
    """N plumber workers on consecutive ports, optionally self-healing."""

    def __init__(self, ports: Sequence[int], logdir: Path) -> None:
        self.ports = list(ports)
        self.logdir = logdir
        self.children: dict[int, Child] = {}
        self.restarts = 0
        self._lock = threading.Lock()
        self._supervising = threading.Event()
        self._supervisor: threading.Thread | None = None

    def _spawn(self, port: int) -> Child:
        env = {**os.environ, "PORT": str(port)}
        argv = ["Rscript", "-e", R_RUN.format(app=APP, host=HOST)]
        return Child(f"plumber:{port}", argv, self.logdir / f"plumber-{port}.log", env=env)

    def start(self) -> None:
        require_free(self.ports)
        self.logdir.mkdir(parents=True, exist_ok=True)
        for port in self.ports:
            self.children[port] = self._spawn(port)
        self.wait_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until every worker answers; R start-up is slow, so probe in parallel."""
        with ThreadPoolExecutor(max_workers=len(self.ports)) as pool:
            futures = [pool.submit(wait_http, self.children[p], p, READY_PATH, timeout) for p in self.ports]
            for f in futures:
                f.result()

    def pids(self) -> list[int]:
        return [c.pid for c in self.children.values()]

    def kill_random(self, rng: random.Random) -> int:
        """SIGKILL one live worker, chosen by rng; returns its port."""
        with self._lock:
            live = [p for p in self.ports if self.children[p].alive()]
            port = rng.choice(live or self.ports)
            self.children[port].kill_hard()
        return port

    def _supervise(self) -> None:
        while self._supervising.is_set():
            with self._lock:
                for port, child in list(self.children.items()):
                    if not child.alive():
                        child.stop()
                        self.children[port] = self._spawn(port)
                        self.restarts += 1
            time.sleep(0.05)

    def start_supervisor(self) -> None:
        self._supervising.set()
        self._supervisor = threading.Thread(target=self._supervise, name="worker-restarts", daemon=True)
        self._supervisor.start()

    def stop_supervisor(self) -> None:
        self._supervising.clear()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
            self._supervisor = None

    def stop(self) -> None:
        self.stop_supervisor()
        for child in self.children.values():
            child.stop()

    def __enter__(self) -> WorkerPool:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
