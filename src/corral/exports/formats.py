"""The exports `corral export` prints from a checked config, by name (kubernetes.py has its own entry)."""

from __future__ import annotations

from .haproxy import haproxy
from .nginx import nginx
from .systemd import systemd

EXPORTERS = {"nginx": nginx, "haproxy": haproxy}

__all__ = ["EXPORTERS", "haproxy", "nginx", "systemd"]
