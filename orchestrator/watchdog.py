"""Notice a gang that stopped advancing.

A hung collective leaves every rank alive and silent, so liveness alone says nothing: the watchdog watches the
step each rank reports and fires when no rank has advanced for `hang_timeout_s`. Until the first step of an
attempt the allowance is longer (`startup_s`): imports, JIT-compiled kernels and a checkpoint load come first.
"""

from __future__ import annotations

import time
from collections.abc import Callable

STARTUP_S = 300.0


class Watchdog:
    def __init__(self, hang_timeout_s: float, *, startup_s: float = STARTUP_S,
                 clock: Callable[[], float] = time.monotonic):
        self.hang_timeout_s = hang_timeout_s
        self.startup_s = max(startup_s, hang_timeout_s)
        self.clock = clock
        self.steps: dict[int, int] = {}
        self.started = clock()
        self.advanced: float | None = None

    def observe(self, rank: int, step: int) -> None:
        """A rank's last finished step; any change is progress (after a rewind over a loss spike the steps since
        the checkpoint are trained again, under the same numbers)."""
        if step != self.steps.get(rank, -1):
            self.steps[rank] = step
            self.advanced = self.clock()

    def stalled_for(self) -> float:
        """Seconds since any rank last advanced (or since the start, before the first step)."""
        return self.clock() - (self.started if self.advanced is None else self.advanced)

    def hung(self) -> bool:
        limit = self.startup_s if self.advanced is None else self.hang_timeout_s
        return self.stalled_for() > limit
