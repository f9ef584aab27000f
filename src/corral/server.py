"""One running corral: builds pools, supervisors and health checkers from the config, runs them under
the event loop, and turns signals into reload or a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import resource
import signal
import time
import traceback
from typing import Any

from . import config, logs, portable
from .config import Config, autoscaled, scales_to_zero, worker_ports
from .datapath import tracing
from .datapath.client import Proxy, make_listener
from .datapath.pool import FD_WARN_EVERY, Pool
from .datapath.redirect import Redirector
from .datapath.tunnel import GO_AWAY_GRACE
from .datapath.worker import State
from .logs import AccessLog, say, warn
from .ops import probes, snapshot, systemd
from .ops.admin import AdminError, AdminServer
from .ops.autoscale import Autoscaler, Policy
from .supervision import health, launch, sockdir
from .supervision.changes import Changes
from .supervision.output import reopen_worker_log
from .supervision.processes import port_free
from .supervision.supervisor import Supervisor
from .supervision.watch import Watcher
from .tls import Certificates, TLSError

OPEN_MAX = 10240  # macOS's ceiling for RLIMIT_NOFILE's soft limit
EXIT_INTERNAL = 70  # EX_SOFTWARE: a core task died; no port at all beats a port that serves nothing


class StartupError(Exception):
    pass


class Corral:
    def __init__(self, cfg: Config, balance: bool = True) -> None:
        self.cfg = cfg
        self.balance = balance
        if not balance:  # nginx or HAProxy in front reach the workers on their ports
            for app in cfg.apps:
                if app.worker_transport == "auto" and not app.command:  # a {socket} command is refused below
                    app.worker_transport = "tcp"
        self.pools: list[Pool] = []
        self.supervisors: dict[str, Supervisor] = {}
        self.checkers: list[health.HealthChecker] = []
        self.proxy: Proxy | None = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.started = time.time()
        self._stop = asyncio.Event()
        # Notified by every supervisor (a worker ready or gone, a scale, an app that cannot start) and by stop():
        # what _announce_ready and _watch_fatal wait on.
        self.changes = Changes()
        self.exit_code = 0
        self.admin: Any = None
        self.autoscalers: dict[str, Autoscaler] = {}
        self.health_listener: probes.HealthListener | None = None
        self.draining = False  # a stop has begun: /readyz answers 503 from this moment
        self.notifier = systemd.Notifier(None)  # sd_notify; read from NOTIFY_SOCKET in preflight
        self.activated = False  # serving on a socket systemd passed (LISTEN_FDS), not one we bound
        self.access_logs: list[AccessLog] = []  # reopened on SIGUSR1
        self.interrupted = False  # the stop began with Ctrl-C: a second one quits at once
        self.certificates: Certificates | None = None  # --tls-cert/--tls-key: the public port speaks HTTPS
        self.redirect_sock: Any = None  # --http-redirect: bound in preflight, served by self.redirector
        self.redirector: Redirector | None = None
        self.loop_why = ""  # why this event loop, when not the default (cli.main.event_loop_runner)
        self._fd_warned = -FD_WARN_EVERY

    # --- preflight: refuse busy ports before starting anything -----------------------------------
    def preflight(self) -> Any:
        server = self.cfg.server
        # Both read and cleared before any worker starts: workers copy corral's environment.
        self.notifier = systemd.Notifier.from_environment()
        sock = self._activation_socket()
        if self.balance and sock is None:
            try:
                sock = make_listener(server.host, server.port)
            except OSError as exc:
                raise StartupError(
                    f"public port {server.port} on {server.host} is not available ({exc.strerror}); "
                    "choose another with --port"
                ) from None
        try:
            self._prepare_sockets()
            self._prepare_tls(sock)
        except StartupError:
            if sock is not None:
                sock.close()
            raise
        for app in self.cfg.apps:
            if app.upstreams or launch.transport(app) == "unix":
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
            self.health_listener = probes.HealthListener.prepare(self.cfg)
        except probes.ProbeError as exc:
            if sock is not None:
                sock.close()
            raise StartupError(str(exc)) from None
        try:
            self.admin = AdminServer.prepare(self.cfg)
        except AdminError as exc:
            if sock is not None:
                sock.close()
            if self.redirect_sock is not None:
                self.redirect_sock.close()
            if self.health_listener is not None:
                self.health_listener.sock.close()
            raise StartupError(str(exc)) from None
        return sock

    def _prepare_tls(self, sock: Any) -> None:
        """Load the certificate and key (validated already; the files may have changed since) and bind the
        --http-redirect port, before any worker starts."""
        server = self.cfg.server
        if server.tls_cert is None or server.tls_key is None or sock is None:
            return
        try:
            self.certificates = Certificates(os.path.abspath(server.tls_cert), os.path.abspath(server.tls_key))
        except TLSError as exc:
            raise StartupError(f"{exc.key}: {exc}") from None
        if server.http_redirect is not None:
            try:
                self.redirect_sock = make_listener(server.host, server.http_redirect)
            except OSError as exc:
                raise StartupError(
                    f"http_redirect port {server.http_redirect} on {server.host} is not available ({exc.strerror}); "
                    "choose another with --http-redirect"
                ) from None

    def _prepare_sockets(self) -> None:
        """The private worker socket directory, made now so a problem with it stops corral before any
        worker starts. Behind nginx/HAProxy (--supervise-only) workers must be on ports they can reach."""
        unix = [a.name for a in self.cfg.apps if launch.transport(a) == "unix" and not a.upstreams]
        if not self.balance:
            for problem in config.supervise_only_problems(self.cfg):
                raise StartupError(problem)
        if not unix:
            return
        if not self.balance:
            raise StartupError(
                f"--supervise-only: app '{unix[0]}' has worker_transport unix, but nginx or HAProxy in front reach "
                "workers on their ports: use worker_transport tcp"
            )
        try:
            sockdir.instance()
        except sockdir.SocketDirError as exc:
            raise StartupError(str(exc)) from None

    def _activation_socket(self) -> Any:
        """The listening socket systemd passed (socket activation), or None to bind our own. Its address
        becomes the public one, so the admin socket and the default worker ports follow it."""
        try:
            socks = systemd.listen_sockets()
        except systemd.ActivationError as exc:
            raise StartupError(str(exc)) from None
        if not socks:
            return None
        for extra in socks[1:] if self.balance else socks:
            extra.close()
        if len(socks) > 1 and self.balance:
            warn(f"corral: LISTEN_FDS={len(socks)}: serving on the first socket only")
        if not self.balance:
            warn("corral: LISTEN_FDS ignored: --supervise-only has no public listener")
            return None
        where = systemd.describe(socks[0])
        if where is not None:
            self.cfg.server.host, self.cfg.server.port = where
        self.activated = True
        return socks[0]

    async def run(self, sock: Any) -> int:
        loop = asyncio.get_running_loop()
        # The start line names each platform mechanism chosen (corral.portable): Linux's, or the portable one.
        loop_name = "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
        say(f"corral: {portable.describe(portable.paths(), loop_name, self.loop_why, portable.forced())}")
        loop.set_exception_handler(self._loop_exception)
        logs.RING.resize(self.cfg.server.log_buffer)
        size_for_fd_limit(self.cfg, raise_fd_limit())
        tracing.configure(self.cfg.server.trace_sample)
        for app in self.cfg.apps:
            pool = Pool(app, loop)
            self.pools.append(pool)
            if self.cfg.server.access_log:
                pool.on_observe = AccessLog(self.cfg.server.access_log, self.cfg.server.log_format)
                self.access_logs.append(pool.on_observe)
            if app.upstreams:
                for w in health.external_workers(app):
                    pool.join(w)
            else:
                sup = Supervisor(app, self.cfg, pool, loop, self.changes)
                sup.fixed_ports = not self.balance  # nginx/HAProxy in front know the worker ports
                self.supervisors[app.name] = sup
                self.watch(loop.create_task(sup.run()), f"supervisor for app {app.name}")
                if autoscaled(app):
                    scaler = Autoscaler(app, pool, sup, Policy.of(app, os.cpu_count() or 1))
                    self.autoscalers[app.name] = scaler
                    if scales_to_zero(app):  # a request at zero wakes the autoscaler, which decides to start one
                        pool.on_demand = scaler.demand
                    self.watch(loop.create_task(scaler.run()), f"autoscaler for app {app.name}")
                if app.watch:  # development: a rolling reload when the app's files change
                    watcher = Watcher(app, self.cfg.server, sup.reload)
                    self.watch(loop.create_task(watcher.run()), f"file watcher for app {app.name}")
            checker = health.HealthChecker(app, pool)
            self.checkers.append(checker)
            self.watch(loop.create_task(checker.run()), f"health checker for app {app.name}")
        if self.health_listener is not None:  # first: /livez answers while the workers start
            await self.health_listener.start(self)
            say(f"corral: health on http://{self.health_listener.address} (/livez, /readyz)")
        if sock is not None:
            self.proxy = Proxy(loop, self.cfg.server, self.pools)
            certs = self.certificates
            await self.proxy.start(sock, certs.context if certs is not None else None)
            origin = " (socket from systemd)" if self.activated else ""
            say(f"corral: listening on {self._public_url()}{origin}")
            if certs is not None:
                say(f"corral: TLS 1.2/1.3, certificate {certs.loaded}")
            if self.redirect_sock is not None:
                self.redirector = Redirector(loop, self.cfg.server)
                await self.redirector.start(self.redirect_sock)
                say(f"corral: redirecting http://{self.cfg.server.host}:{self.cfg.server.http_redirect} to https (308)")
        if self.admin is not None:
            await self.admin.start(self)
            say(f"corral: admin on {self.admin.address}")
        self._install_signals(loop)
        self.watch(loop.create_task(self._announce_ready()), "readiness announcement")
        self.watch(loop.create_task(self._watch_fatal()), "watch for apps that cannot start")
        if self.notifier.enabled:
            self.watch(loop.create_task(self._tell_systemd()), "systemd notifications")
            if self.notifier.watchdog_interval:
                self.watch(loop.create_task(self._feed_watchdog(self.notifier.watchdog_interval)), "systemd watchdog")
        await self._stop.wait()
        await self.shutdown()
        return self.exit_code

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's own loop reports every accept() that finds no descriptor left, with a traceback, and goes on
        trying the rest of its backlog (uvloop says nothing): one line at most every FD_WARN_EVERY seconds."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            now = time.monotonic()
            if now - self._fd_warned >= FD_WARN_EVERY:
                self._fd_warned = now
                say("corral: out of file descriptors: accepting a connection (raise the open-file limit, or lower "
                    "max_connections)")  # fmt: skip
            return
        loop.default_exception_handler(context)

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
        loop.add_signal_handler(signal.SIGINT, self.interrupt)
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)

    async def _announce_ready(self) -> None:
        # A supervised worker turns ready only in its supervisor, and only a scale lowers the count wanted.
        await self.changes.until(lambda: self._stop.is_set() or self._all_ready())
        if self._stop.is_set():
            return
        names = ", ".join(self._describe(p) for p in self.pools)
        if self.balance:
            where = f"serving on {self._public_url()}"
        else:
            where = "supervise-only, no balancer; workers at " + "; ".join(
                f"{p.name} {_addresses(p)}" for p in self.pools if p.name in self.supervisors
            )
        say(f"corral: all workers ready ({names}); {where}")
        self.notifier.send("READY=1", f"STATUS={self._systemd_status()}")

    def _all_ready(self) -> bool:
        want = sum(s.desired for s in self.supervisors.values())
        ready = sum(len(p.routable()) for p in self.pools if p.name in self.supervisors)
        return ready >= want

    # --- systemd: sd_notify -------------------------------------------------------------------------
    async def _feed_watchdog(self, every: float) -> None:
        """WATCHDOG=1 from the event loop itself: a loop that stops turning stops feeding it."""
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(every)  # a heartbeat, not a wait: systemd wants one every interval

    async def _tell_systemd(self) -> None:
        """STATUS= when it changes; RELOADING=1 ... READY=1 around a reload (SIGHUP, /reload, --watch:
        any of them moves a supervisor's generation). READY=1 itself comes from _announce_ready."""
        generations = self._generations()
        reloading = False
        shown = None
        while not self._stop.is_set():
            # A sample, not a wait: STATUS= carries the queue depth, which the data path changes on every request.
            await asyncio.sleep(0.2)
            if self.notifier.failure is not None:
                warn(f"corral: sd_notify to $NOTIFY_SOCKET failed ({self.notifier.failure}); systemd may not hear us")
                self.notifier.failure = None
            now = self._generations()
            if now != generations and not reloading:
                reloading = True
                self.notifier.send("RELOADING=1", systemd.monotonic_usec(), "STATUS=reloading")
            generations = now
            status = self._systemd_status()
            if reloading and "reloading" not in status:
                reloading = False
                self.notifier.send("READY=1", f"STATUS={status}")
                shown = status
            elif status != shown:
                self.notifier.send(f"STATUS={status}")
                shown = status

    def _generations(self) -> tuple[int, ...]:
        return tuple(s.generation for s in self.supervisors.values())

    def _systemd_status(self) -> str:
        """`4/4 workers ready, 0 queued` (per app when there are several), for `systemctl status`."""
        apps = snapshot.take(self, time.monotonic(), routes=0).apps
        if len(apps) == 1:
            ready = f"{apps[0].ready}/{apps[0].desired}"
        else:
            ready = ", ".join(f"{a.name} {a.ready}/{a.desired}" for a in apps)
        out = f"{ready} workers ready, {sum(a.queue.depth for a in apps)} queued"
        if any(a.reloading for a in apps):
            out += "; reloading"
        looping = [a.name for a in apps if a.crash_loop is not None]
        if looping:
            out += "; crash-looping: " + ", ".join(looping)
        return out

    def _describe(self, pool: Pool) -> str:
        if pool.name in self.supervisors:
            return f"{pool.name} x{len(pool.routable())}"
        return f"{pool.name}: {len(pool.routable())} of {len(pool.workers)} upstreams answering so far"

    async def _watch_fatal(self) -> None:
        sups = self.supervisors.values()
        await self.changes.until(lambda: self._stop.is_set() or any(s.fatal for s in sups))
        if self._stop.is_set():
            return
        warn(f"corral: {next(s.fatal for s in sups if s.fatal)}")
        self.exit_code = 3
        self.stop()

    def stop(self) -> None:
        """Begin a graceful stop (SIGTERM, SIGINT, POST /stop). /readyz turns 503 here, at once; a second
        call changes nothing (Kubernetes' preStop `corral stop` is followed by its SIGTERM)."""
        self.draining = True
        self._stop.set()
        self.changes.notify()  # _announce_ready and _watch_fatal end with the stop

    def interrupt(self) -> None:
        """SIGINT (Ctrl-C): the first is a graceful stop that says what it waits for; a second one, or one
        during any stop, quits at once."""
        if self._stop.is_set():
            self.quit_now()
            return
        self.interrupted = True
        self.stop()

    def _drain_note(self, grace: float) -> str:
        """What the stop waits for: `draining 1 request and 2 WebSocket sessions, up to 30 s; Ctrl-C again to
        quit now`."""
        held = sum(len(p.inflight) + p.scheduler.depth for p in self.pools)
        sessions = self.proxy.open_sessions() if self.proxy is not None else 0
        parts = [f"{n} {what}{'s' * (n != 1)}" for n, what in ((held, "request"), (sessions, "WebSocket session")) if n]
        what = f"draining {' and '.join(parts)}, up to {grace:g} s" if parts else "nothing in flight"
        return what + ("; Ctrl-C again to quit now" if self.interrupted else "")

    def quit_now(self) -> None:
        """The second Ctrl-C: SIGKILL every worker's process group and exit 130, without draining."""
        for sup in self.supervisors.values():
            for w in sup.all_workers():
                if w.proc is not None and w.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(w.proc.pid, signal.SIGKILL)
        if self.admin is not None:
            with contextlib.suppress(Exception):
                self.admin.unlink_socket()  # `corral ls` must not list a corral that is gone
        sockdir.remove()  # os._exit skips atexit
        say("corral: second Ctrl-C: stopped at once (requests in flight were cut, workers killed)")
        os._exit(130)

    def reopen_logs(self) -> None:
        """SIGUSR1, for logrotate: reopen the --access-log file and every worker's --log-dir file."""
        access = [a.reopen() for a in self.access_logs]  # one per app, all on the same path
        workers = 0
        log_dir = self.cfg.server.log_dir
        if log_dir:
            for sup in self.supervisors.values():
                workers += sum(reopen_worker_log(w, log_dir) for w in sup.all_workers() if w.state is not State.STOPPED)
        done = (["the access log"] if any(access) else []) + (
            [f"{workers} worker log{'s' * (workers != 1)}"] if log_dir else []
        )
        if done:
            say(f"corral: SIGUSR1: reopened {' and '.join(done)}")
        else:
            say("corral: SIGUSR1: no log file to reopen (no --access-log file, no --log-dir)")

    def _public_url(self) -> str:
        scheme = "https" if self.certificates is not None else "http"
        return f"{scheme}://{self.cfg.server.host}:{self.cfg.server.port}"

    def reload(self) -> list[str]:
        """SIGHUP: the TLS certificate and key are read again (certbot's deploy hook), then every app's
        workers are replaced, one by one."""
        tls = self.reload_tls()
        return ([tls] if tls else []) + [sup.reload() for sup in self.supervisors.values()]

    def reload_tls(self) -> str | None:
        """Read the certificate and key again; the new pair serves every handshake from now on. A pair that
        does not load is refused in one log line, and the old one keeps serving. None without TLS."""
        if self.certificates is None:
            return None
        ok, message = self.certificates.reload()
        (say if ok else warn)(f"corral: {message}")
        return message

    def scale(self, n: int, app: str | None = None) -> list[str]:
        return [s.scale(n) for name, s in self.supervisors.items() if app is None or name == app]

    async def shutdown(self) -> None:
        """Keep serving for shutdown_delay (with /readyz at 503), then stop accepting, let in-flight
        requests finish until one drain deadline, stop workers, exit.

        The deadline is computed once, after the delay: the proxy drains against it and each supervisor
        gets it, so a stop takes at most shutdown_delay + graceful_timeout + kill_timeout (+1 s), never two
        graceful_timeouts. A stop for an internal error or an app that cannot start has no delay.
        """
        self.draining = True
        self.notifier.send("STOPPING=1", "STATUS=stopping: draining")
        delay = 0.0 if self.exit_code else self.cfg.server.shutdown_delay
        if delay > 0:
            say(
                f"corral: stopping: /readyz answers 503; still serving for {delay:g}s (shutdown_delay) "
                "while outer balancers stop sending"
            )
            await asyncio.sleep(delay)
        begun = time.monotonic()
        grace = 0.0 if self.exit_code else max((a.graceful_timeout for a in self.cfg.apps), default=0.0)
        deadline = begun + grace
        say(f"corral: stopping: {self._drain_note(grace)}")
        proxy = self.proxy
        if self.redirector is not None:
            self.redirector.close()
        if proxy is not None:
            proxy.stop_accepting()
            # Open WebSocket sessions count as in flight: they keep working until they close or the deadline
            # passes, as in a reload's drain; then each gets a close frame (1001 Going Away), not a bare close.
            for pool in proxy.pools:
                pool.on_settle = self.changes.notify
            await self.changes.until(lambda: not proxy.busy(), deadline)
            left = proxy.open_sessions()
            if left:
                say(
                    f"corral: stopping: graceful_timeout passed: closing {left} WebSocket session{'s' * (left != 1)} "
                    "(1001 going away)"
                )
            proxy.close_idle_connections()
            # A session in the middle of one of its worker's messages gets its close frame once the message
            # is through: its worker must live that long (at most GO_AWAY_GRACE; the tunnel is cut then).
            going = time.monotonic() + GO_AWAY_GRACE
            await self.changes.until(lambda: not proxy.open_sessions(), going)
        for checker in self.checkers:
            checker.stopping = True
        await asyncio.gather(
            *(s.shutdown(min(deadline, begun + s.app.graceful_timeout)) for s in self.supervisors.values())
        )
        if self.admin is not None:
            with contextlib.suppress(Exception):
                await self.admin.stop()
        if self.health_listener is not None:  # last: /livez held 200 through the whole drain
            with contextlib.suppress(Exception):
                await self.health_listener.stop()
        for task in self.tasks:
            task.cancel()
        sockdir.remove()  # the workers are gone: so are their sockets
        for pool in self.pools:
            say(
                f"corral: app {pool.name}: served {pool.served}, failed {pool.failed}, "
                f"refused {pool.outcomes['refused']}, abandoned {pool.outcomes['abandoned']}, "
                f"cut {sum(pool.cuts.values())}, "
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
    # macOS refuses a soft limit above OPEN_MAX (10240) even under an unlimited hard one (its setrlimit(2))
    for want in (target, min(target, OPEN_MAX)):
        if soft != resource.RLIM_INFINITY and soft < want:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                break
            except (ValueError, OSError):
                continue
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
    return config.connection_budget(nofile, cfg)


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
