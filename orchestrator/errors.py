"""Errors by cause. The CLI turns a `UserError` into one readable message and exit code 2.

This module is the contract leaf: every folder may import it, it imports nothing of the project. Above it sit
`orchestrator.config_parser` (which imports only this module) and `orchestrator.spec` (which imports only those two),
which every folder may import too.
"""

from __future__ import annotations

from dataclasses import dataclass


class PretrainError(Exception):
    """Base of every error the project raises on purpose."""


class UserError(PretrainError):
    """Something the user gave (spec, CLI argument, corpus, shard, checkpoint) is wrong; the message says what."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: where (dotted path), what was given, what is allowed."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


SHOWN_PROBLEMS = 50  # a message stays readable when a hostile file holds thousands of problems


class SpecError(UserError):
    """Every problem found in a job spec, reported together."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = list(problems)
        count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
        lines = [f"{source}: {count}"] + [f"  {p}" for p in self.problems[:SHOWN_PROBLEMS]]
        if len(self.problems) > SHOWN_PROBLEMS:
            lines.append(f"  … and {len(self.problems) - SHOWN_PROBLEMS} more")
        super().__init__("\n".join(lines))

    def __reduce__(self):
        return (SpecError, (self.source, self.problems))


class DataError(UserError):
    """A corpus, shard or manifest is unreadable or inconsistent; the message names the file."""


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or fails its checksum; the message names the file."""


class ClusterError(PretrainError):
    """Ray did not start on this machine; the message says why and what to try."""


class SchedulingError(PretrainError):
    """The cluster cannot host the requested gang; the message says what is missing."""


class WorkerFailedError(PretrainError):
    """One or more ranks failed; `failures` maps rank to a short description of its error."""

    def __init__(self, failures: dict[int, str]):
        self.failures = dict(failures)
        detail = "; ".join(f"rank {r}: {e}" for r, e in sorted(self.failures.items()))
        super().__init__(f"{len(self.failures)} rank(s) failed: {detail}")

    def __reduce__(self):
        return (WorkerFailedError, (self.failures,))
