"""One running corral: builds pools, supervisors and health checkers from the config, runs them under
the event loop, and turns signals into reload or a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import resource
import signal
import time
import traceback
from typing import Any

from . import config, health
from .admin import AdminError, AdminServer
from .autoscale import Autoscaler, Policy
from .config import Config, autoscaled, port_span, worker_ports
from .logs import AccessLog, say, warn
from .pool import Pool
from .proxy import Proxy, make_listener
from .supervisor import Supervisor, port_free

EXIT_INTERNAL = 70  # EX_SOFTWARE: a core task died; no port at all beats a port that serves nothing


class StartupError(Exception):
    pass


class Corral:
    def __init__(self, cfg: Config, balance: bool = True) -> None:
        self.cfg = cfg
        self.balance = balance
        self.pools: list[Pool] = []
        self.supervisors: dict[str, Supervisor] = {}
        self.checkers: list[health.HealthChecker] = []
        self.proxy: Proxy | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.started = time.time()
        self._stop = asyncio.Event()
        self.exit_code = 0
        self.admin: Any = None
        self.autoscalers: dict[str, Autoscaler] = {}

    # --- preflight: refuse busy ports before starting anything -----------------------------------
    def preflight(self) -> Any:
        server = self.cfg.server
        sock = None
        if self.balance:
            try:
                sock = make_listener(server.host, server.port)
            except OSError as exc:
                raise StartupError(
                    f"public port {server.port} on {server.host} is not available ({exc.strerror}); "
                    "choose another with --port"
                ) from None
        for app in self.cfg.apps:
            if app.upstreams:
                continue
            for i, port in enumerate(worker_ports(self.cfg, app)):
                if not port_free(app.worker_host, port):
                    if sock is not None:
                        sock.close()
                    raise StartupError(
                        f"worker port {port} (app '{app.name}', worker {i}) is already in use; "
                        "choose another range with --base-port"
                    )
        try:
            self.admin = AdminServer.prepare(self.cfg)
        except AdminError as exc:
            if sock is not None:
                sock.close()
            raise StartupError(str(exc)) from None
        return sock

    async def run(self, sock: Any) -> int:
        loop = asyncio.get_running_loop()
        size_for_fd_limit(self.cfg, raise_fd_limit())
        for app in self.cfg.apps:
            pool = Pool(app, loop)
            self.pools.append(pool)
            if self.cfg.server.access_log:
                pool.on_observe = AccessLog(self.cfg.server.access_log, self.cfg.server.log_format)
            if app.upstreams:
                for w in health.external_workers(app):
                    pool.join(w)
            else:
                sup = Supervisor(app, self.cfg, pool, loop)
                sup.fixed_ports = not self.balance  # nginx/HAProxy in front know the worker ports
                self.supervisors[app.name] = sup
                self.watch(loop.create_task(sup.run()), f"supervisor for app {app.name}")
                if autoscaled(app):
                    scaler = Autoscaler(app, pool, sup, Policy.of(app, os.cpu_count() or 1))
                    self.autoscalers[app.name] = scaler
                    self.watch(loop.create_task(scaler.run()), f"autoscaler for app {app.name}")
            checker = health.HealthChecker(app, pool)
            self.checkers.append(checker)
            self.watch(loop.create_task(checker.run()), f"health checker for app {app.name}")
        if sock is not None:
            self.proxy = Proxy(loop, self.cfg.server, self.pools)
            await self.proxy.start(sock)
            say(f"corral: listening on http://{self.cfg.server.host}:{self.cfg.server.port}")
        if self.admin is not None:
            await self.admin.start(self)
            say(f"corral: admin on {self.admin.address}")
        self._install_signals(loop)
        self.watch(loop.create_task(self._announce_ready()), "readiness announcement")
        self.watch(loop.create_task(self._watch_fatal()), "watch for apps that cannot start")
        await self._stop.wait()
        await self.shutdown()
        return self.exit_code

    def watch(self, task: asyncio.Task[Any], what: str) -> None:
        """Own a core task: should it ever end with an error, corral stops with EXIT_INTERNAL rather
        than keep its port open with nothing behind it."""
        self.tasks.append(task)
        task.add_done_callback(functools.partial(self._core_task_ended, what))

    def _core_task_ended(self, what: str, task: asyncio.Task[Any]) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is None:
            return
        trace = "".join(traceback.format_exception(exc)).rstrip()
        warn(f"corral: internal error: {what} ended: {exc!r}; stopping\n{trace}")
        self.exit_code = self.exit_code or EXIT_INTERNAL
        self.stop()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    async def _announce_ready(self) -> None:
        while not self._stop.is_set():
            want = sum(s.desired for s in self.supervisors.values())
            ready = sum(len(p.routable()) for p in self.pools if p.name in self.supervisors)
            if ready >= want:
                names = ", ".join(self._describe(p) for p in self.pools)
                if self.balance:
                    where = f"serving on http://{self.cfg.server.host}:{self.cfg.server.port}"
                else:
                    where = "supervise-only, no balancer; workers at " + "; ".join(
                        f"{p.name} {_addresses(p)}" for p in self.pools if p.name in self.supervisors
                    )
                say(f"corral: all workers ready ({names}); {where}")
                return
            await asyncio.sleep(0.05)

    def _describe(self, pool: Pool) -> str:
        if pool.name in self.supervisors:
            return f"{pool.name} x{len(pool.routable())}"
        return f"{pool.name}: {len(pool.routable())} of {len(pool.workers)} upstreams answering so far"

    async def _watch_fatal(self) -> None:
        while not self._stop.is_set():
            for sup in self.supervisors.values():
                if sup.fatal:
                    warn(f"corral: {sup.fatal}")
                    self.exit_code = 3
                    self.stop()
                    return
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()

    def reload(self) -> list[str]:
        return [sup.reload() for sup in self.supervisors.values()]

    def scale(self, n: int, app: str | None = None) -> list[str]:
        return [s.scale(n) for name, s in self.supervisors.items() if app is None or name == app]

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish until one drain deadline, stop workers, exit.

        The deadline is computed once, here: the proxy drains against it and each supervisor gets it, so
        a stop takes at most graceful_timeout + kill_timeout (+1 s), never two graceful_timeouts.
        """
        begun = time.monotonic()
        grace = 0.0 if self.exit_code else max((a.graceful_timeout for a in self.cfg.apps), default=0.0)
        deadline = begun + grace
        say(f"corral: stopping: no new connections; finishing in-flight requests (drain deadline {grace:g}s)")
        proxy = self.proxy
        if proxy is not None:
            proxy.stop_accepting()
            while proxy.busy() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            proxy.close_idle_connections()
        for checker in self.checkers:
            checker.stopping = True
        await asyncio.gather(
            *(s.shutdown(min(deadline, begun + s.app.graceful_timeout)) for s in self.supervisors.values())
        )
        if self.admin is not None:
            with contextlib.suppress(Exception):
                await self.admin.stop()
        for task in self.tasks:
            task.cancel()
        for pool in self.pools:
            say(
                f"corral: app {pool.name}: served {pool.served}, failed {pool.failed}, "
                f"rejected {pool.scheduler.rejected + pool.scheduler.refused_early}, "
                f"timed out in queue {pool.scheduler.timed_out}"
            )
        say("corral: stopped")


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one; returns the soft limit now in force.

    Every client connection costs a descriptor, and its upstream connection another: the usual soft
    default of 1024 would cap corral far below what the machine allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _nr_open() -> int:
    # An 'unlimited' hard limit still cannot exceed the kernel's per-process ceiling.
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def size_for_fd_limit(cfg: Config, nofile: int) -> None:
    """Fill in max_connections when left to auto, and say so once; warn when one set explicitly is
    more than the descriptors allow (those connections would fail with EMFILE, not a clean 503)."""
    server = cfg.server
    budget = _connection_budget(nofile, cfg)
    if server.max_connections is None:
        server.max_connections = budget
    elif server.max_connections > budget:
        warn(
            f"corral: warning: max_connections {server.max_connections} is more than the open files limit "
            f"({nofile}) allows: about {budget}; raise `ulimit -n` (LimitNOFILE=) or lower max_connections"
        )
    say(f"corral: open files limit {nofile}; max_connections {server.max_connections}")


def _connection_budget(nofile: int, cfg: Config) -> int:
    budget = getattr(config, "connection_budget", None)
    if budget is not None:
        return int(budget(nofile, cfg))
    workers = sum(port_span(a) for a in cfg.apps)  # config without connection_budget: the same rule, roughly
    return max(1, (nofile - 64 - 4 * workers) // 2)


def _addresses(pool: Pool) -> str:
    """'127.0.0.1:9000-9003' for consecutive ports, else a comma list."""
    by_host: dict[str, list[int]] = {}
    for w in pool.routable():
        by_host.setdefault(w.host if w.external else pool.app.worker_host, []).append(w.port)
    out = []
    for host, ports in by_host.items():
        ports.sort()
        if ports == list(range(ports[0], ports[0] + len(ports))) and len(ports) > 1:
            out.append(f"{host}:{ports[0]}-{ports[-1]}")
        else:
            out.extend(f"{host}:{p}" for p in ports)
    return ", ".join(out)
