"""`corral export systemd`: a Type=notify service unit for corral (and with --socket, its .socket unit)."""

from __future__ import annotations

import math
import shlex
import shutil
import sys
from pathlib import Path

from ..config import Config, plain_number, reserved_fds
from .common import STOP_MARGIN, address, generated_header, stop_bound

START_MARGIN = 30  # seconds for corral's own start (Python, the admin socket) before READY=1 is late
WATCHDOG_SEC = 30  # the event loop never blocks for long; a hang this long is a hung corral
NOFILE_AUTO = 524288  # systemd's default hard limit: corral raises its soft limit to it and sizes connections from it


def systemd(cfg: Config, supervise_only: bool = False, run_args: list[str] | None = None, socket: bool = False) -> str:
    """A Type=notify service unit (corral sends READY=1 once every worker is ready, RELOADING=1 around a
    reload, STOPPING=1, and WATCHDOG=1 from its event loop). `run_args`: what follows `corral run` (the
    flags `corral export systemd` was given); default `-c FILE`. With `socket`, the .socket unit too,
    both `systemctl cat` style: each after a `# /etc/systemd/system/NAME` line."""
    from_file = cfg.source != "command line"
    path = Path(cfg.source).resolve() if from_file else None
    unit = f"corral-{path.stem if path is not None else cfg.apps[0].name if cfg.apps else 'app'}"
    workdir = path.parent if path is not None else Path.cwd()
    corral = shutil.which("corral")
    exe = [corral] if corral else [sys.executable, "-m", "corral"]
    if run_args is None:
        run_args = ["-c", str(path)] + (["--supervise-only"] if supervise_only else [])
    args = [*exe, "run", *run_args]
    stop = stop_bound(cfg)
    names = ", ".join(a.name for a in cfg.apps)
    what = "workers only (supervise-only)" if supervise_only else "balancer and workers"
    activated = socket and not supervise_only
    service = "\n".join(
        [
            *(f"# {line[2:]}" for line in generated_header("systemd", str(path or cfg.source))[:1]),
            f"# Install as /etc/systemd/system/{unit}.service, then",
            f"#   systemctl daemon-reload && systemctl enable --now {unit}" + (f".socket {unit}" if activated else ""),
            "[Unit]",
            f"Description=corral: {names} ({what})",
            "After=network-online.target",
            "Wants=network-online.target",
            *([f"Requires={unit}.socket", f"After={unit}.socket"] if activated else []),
            "",
            "[Service]",
            "# corral tells systemd when every worker is ready (READY=1), around reloads and when it stops.",
            "Type=notify",
            "NotifyAccess=main",
            f"# READY=1 comes once every worker answers: each has startup_timeout "
            f"({plain_number(_startup(cfg))} s), twice",
            f"# over if its first start fails, plus {START_MARGIN} s for corral itself.",
            f"TimeoutStartSec={math.ceil(2 * _startup(cfg)) + START_MARGIN}",
            "# corral sends WATCHDOG=1 from its event loop every WatchdogSec/2: a loop that hangs is restarted.",
            f"WatchdogSec={WATCHDOG_SEC}s",
            f"ExecStart={shlex.join(args)}",
            "ExecReload=/bin/kill -HUP $MAINPID",
            *_tls_lines(cfg, unit),
            f"WorkingDirectory={workdir}",
            "Environment=PYTHONUNBUFFERED=1",
            "# User=corral",
            "Restart=on-failure",
            "RestartSec=2s",
            "# exit 2 is a configuration problem: restarting will not fix it",
            "RestartPreventExitStatus=2",
            "# corral serves on for shutdown_delay, drains in-flight requests (graceful_timeout), then stops its",
            "# workers (kill_timeout): at most shutdown_delay + max(graceful_timeout) + max(kill_timeout) + 1",
            f"# = {plain_number(stop)} s, plus a {STOP_MARGIN} s margin.",
            "KillSignal=SIGTERM",
            "KillMode=mixed",
            f"TimeoutStopSec={math.ceil(stop) + STOP_MARGIN}",
            *_nofile_lines(cfg),
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )
    if not activated:
        return service
    return "\n".join(
        [
            f"# /etc/systemd/system/{unit}.service",
            service,
            f"# /etc/systemd/system/{unit}.socket",
            _socket_unit(cfg, unit),
        ]
    )


def _tls_lines(cfg: Config, unit: str) -> list[str]:
    if cfg.server.tls_cert is None:
        return []
    return [
        "# TLS: a reload (SIGHUP) also reads tls_cert and tls_key again. certbot's deploy hook:",
        f"#   certbot renew --deploy-hook 'systemctl reload {unit}'",
        "# The key must be readable by the User= below (e.g. a group with read access to it).",
    ]


def _startup(cfg: Config) -> float:
    return max((a.startup_timeout for a in cfg.apps if not a.upstreams), default=0.0)


def _socket_unit(cfg: Config, unit: str) -> str:
    """Socket activation: systemd holds the public port, so a restart of corral refuses no connection
    (they wait in the backlog); corral serves on the socket it is passed (LISTEN_FDS) instead of binding."""
    host = "127.0.0.1" if cfg.server.host == "localhost" else cfg.server.host
    return "\n".join(
        [
            "[Unit]",
            f"Description=corral: public socket of {unit}",
            "",
            "[Socket]",
            f"ListenStream={address(host, cfg.server.port)}",
            *(["BindIPv6Only=both"] if host == "::" else []),
            "# the same backlog corral gives its own listener",
            "Backlog=1024",
            "",
            "[Install]",
            "WantedBy=sockets.target",
            "",
        ]
    )


def _nofile_lines(cfg: Config) -> list[str]:
    mc = cfg.server.max_connections
    if mc is None:
        return [
            "# max_connections is automatic: about half the open-file limit corral raises itself to",
            f"LimitNOFILE={NOFILE_AUTO}",
        ]
    return [
        "# each client connection can need an upstream connection too, besides corral's own files",
        f"LimitNOFILE={max(65536, 2 * mc + reserved_fds(cfg))}",
    ]
