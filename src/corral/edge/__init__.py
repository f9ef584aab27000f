"""Strict HTTP/1.1 at the edge, sans I/O: parsing, framing, forwarding rules and corral's own answers."""

from .request import *  # noqa: F403 (temporary: the split of this package names its surface)
