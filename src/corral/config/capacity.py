"""File descriptors: how many client connections and workers a machine can hold.

Every client connection can need an upstream connection, and every worker pipes and probes, so the
open-file limit bounds both. The defaults of max_connections and of the scaling ceiling come from here.
"""

from __future__ import annotations

import contextlib
import os
import resource

from .derived import parse_upstream, port_span
from .model import WORKERS_MAX, AppConfig, Config

FD_RESERVE = 64  # file descriptors kept back for everything corral opens now and then (files, DNS, admin clients)


def _nofile(nofile: int | None) -> int:
    """The open-file limit to plan with: the hard limit when not given; 'unlimited' as 2**20."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if nofile < 0 or nofile == resource.RLIM_INFINITY:
        return 1 << 20
    return nofile


def reserved_fds(cfg: Config) -> int:
    """File descriptors corral needs besides client connections and their upstream connections:
    per worker it may run (twice its range: a rolling reload runs a replacement beside each worker)
    three pipes and a probe, plus an output file with log_dir; a probe per upstream address; the
    public and admin listeners; the access log; and FD_RESERVE for everything else."""
    n = FD_RESERVE + 2 + (1 if cfg.server.access_log else 0)
    for app in cfg.apps:
        if app.upstreams:
            for spec in app.upstreams:
                with contextlib.suppress(ValueError):
                    n += len(parse_upstream(spec))
            continue
        workers = 2 * min(port_span(app), WORKERS_MAX)
        n += workers * (3 + 1 + (1 if cfg.server.log_dir else 0))
    return n


def connection_budget(nofile: int, cfg: Config) -> int:
    """How many client connections corral can hold with `nofile` open files: each client connection
    can need one upstream connection too, after reserved_fds(cfg). At least 1. This is what
    max_connections means when left out (the caller raises RLIMIT_NOFILE to its hard limit first);
    a max_connections set above it is not a config error, since limits differ per machine."""
    return max(1, (_nofile(nofile) - reserved_fds(cfg)) // 2)


def worker_ceiling(app: AppConfig, nofile: int | None = None) -> int:
    """The most workers `corral scale` or autoscaling may ever ask for: max_workers when set, else
    max(4 x CPUs, 16) bounded by the fd limit (8 per worker, after FD_RESERVE: pipes, probe, pooled
    connections, a replacement's share), and never below the configured workers. At least 1."""
    if app.max_workers is not None:
        return app.max_workers
    cpus = os.cpu_count() or 1
    by_fds = (_nofile(nofile) - FD_RESERVE) // 8
    ceiling = min(max(4 * cpus, 16), by_fds, WORKERS_MAX)
    return max(1, ceiling, min(app.workers or 0, WORKERS_MAX))
