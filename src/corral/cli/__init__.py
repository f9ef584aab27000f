"""The `corral` command: `run` and the verbs that talk to a running corral."""

from .main import main

__all__ = ["main"]
