"""The step classes of a prep run: each says what it does; the base classes do the keying, resuming and counting.

A `Stage` works on the whole dataset (the dedup shuffle, training the tokenizer, writing shards). A `FileStage`
runs one Ray Data task per input file: it names the settings its outputs depend on (`key`), the task payloads
(`tasks`) and what one task does (`process`), and the base class runs the pending tasks in a directory keyed by
those settings (`dataprep.executor`), so a rerun after a crash redoes only unfinished tasks. Every task returns its
counters, and the base class publishes them as the run's live counters (`PrepStats`): documents in and kept,
removed per reason, edits by name (`pii_email`), and whatever else the stage lists in `counters` (bytes, rows,
tokens).

Stages hand their results to later ones through the `PrepRun` they all receive, under their own name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dataprep.config import PrepConfig
from dataprep.executor import run_tasks, stage_dir
from dataprep.stats import PrepStats

DOCUMENT_COUNTERS = ("docs_in", "bytes_in", "docs_kept")


@dataclass
class StageOutput:
    """What a finished stage leaves for the later ones."""

    directory: str = ""  # its outputs; empty for a stage that writes none
    results: dict[str, dict] = field(default_factory=dict)  # its counters per input file
    info: Any = None  # anything else the later stages read (dedup counters, mixture plans, tokenizer, manifest)


@dataclass
class PrepRun:
    """What the stages of one run share: the config, the live counters, the input files and the stages done."""

    config: PrepConfig
    stats: PrepStats
    progress: bool
    files: list[dict]  # one entry per input file, in dedup-rank order (`pipeline.file_tasks`)
    partitions: int  # hash-shuffle partitions of the dedup stage
    done: dict[str, StageOutput] = field(default_factory=dict)

    @property
    def work(self) -> str:
        return self.config.work

    def __getitem__(self, stage: str) -> StageOutput:
        return self.done[stage]


class Stage:
    """A step of the pipeline. Subclasses set `name` and implement `run`; `count` publishes a task's counters."""

    name = "stage"
    counters: tuple[str, ...] = DOCUMENT_COUNTERS

    def __init__(self, config: PrepConfig):
        self.config = config

    def run(self, prep: PrepRun) -> StageOutput:
        raise NotImplementedError

    def count(self, stats: PrepStats, result: dict) -> None:
        """One finished task: its `counters` that it reports, and its removals per reason."""
        stats.add("tasks_done")
        for key in self.counters:
            if key in result:
                stats.add(key, result[key])
        for reason, n in result.get("removed", {}).items():
            stats.add(f"removed_{reason}", n)
        for edit, n in result.get("edits", {}).items():
            stats.add(edit, n)


class FileStage(Stage):
    """A stage of one resumable Ray Data task per input file; `process` runs on a worker, so it reads only
    `self.config` and its payload, never the `PrepRun`."""

    def key(self, prep: PrepRun) -> tuple:
        """Everything the outputs depend on: the earlier stages' directories and the settings this stage reads."""
        raise NotImplementedError

    def tasks(self, prep: PrepRun) -> list[tuple[str, dict]]:
        """(task name, JSON-able payload) per task; names prefix the task's output files."""
        raise NotImplementedError

    def process(self, payload: dict, directory: str) -> dict:
        """Do one task: write its outputs atomically into `directory`; return its counters."""
        raise NotImplementedError

    def run(self, prep: PrepRun) -> StageOutput:
        directory = stage_dir(prep.work, self.name, *self.key(prep))
        tasks = self.tasks(prep)
        prep.stats.enter(self.name, len(tasks))
        results = run_tasks(directory, tasks, self.process, lambda _, result: self.count(prep.stats, result))
        return StageOutput(directory, results)
