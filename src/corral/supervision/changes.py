"""One notifier for the supervisors' facts, so that waiting for a condition needs no polling loop."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable


class Changes:
    """Wakes every task waiting for the supervisors' facts to change (a worker ready or exited, a scale, an
    app that cannot start): each notify() sets the event its waiters hold and arms a fresh one. A waiter
    re-checks its own condition, so one notifier serves any number of conditions and supervisors."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def until(
        self, done: Callable[[], bool], deadline: float = math.inf, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Return once done() holds, or once clock() reaches deadline, whichever comes first."""
        while not done():
            left = deadline - clock()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), None if left == math.inf else left)
