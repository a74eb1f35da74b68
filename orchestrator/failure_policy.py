"""Decide what a failed attempt leads to: restart the gang after a backoff, or give up.

Deciding is kept apart from acting (the controller tears down and restarts), so the rules read in one place:
a mistake in the user's input (a bad shard, a checkpoint failing its checksum) fails the same way on every
attempt and is raised at once; anything else (a dead process or node, a hang, a crashed collective) is retried
with exponential backoff until `resources.max_restarts` restarts have been spent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Cause(str, Enum):
    RANK_DIED = "rank died"
    NODE_LOST = "node lost"
    HANG = "hang"
    RANK_ERROR = "rank raised"
    USER_ERROR = "bad input"


class Action(str, Enum):
    RESTART = "restart"
    RAISE = "raise"


@dataclass
class Failure:
    """Why an attempt ended: the cause and each failed rank's short description."""

    cause: Cause
    ranks: dict[int, str] = field(default_factory=dict)

    def __str__(self) -> str:
        detail = "; ".join(f"rank {r}: {e}" for r, e in sorted(self.ranks.items()))
        return f"{self.cause.value}" + (f" ({detail})" if detail else "")


@dataclass
class Decision:
    action: Action
    delay_s: float = 0.0
    reason: str = ""


@dataclass
class FailurePolicy:
    max_restarts: int
    backoff_s: float
    restarts: int = 0

    def decide(self, failure: Failure) -> Decision:
        if failure.cause is Cause.USER_ERROR:
            return Decision(Action.RAISE, reason="the input is wrong; a restart would fail the same way")
        if self.restarts >= self.max_restarts:
            return Decision(Action.RAISE, reason=f"resources.max_restarts={self.max_restarts} restarts spent")
        delay = self.backoff_s * 2**self.restarts
        self.restarts += 1
        return Decision(Action.RESTART, delay_s=delay, reason=f"restart {self.restarts} of {self.max_restarts}")
