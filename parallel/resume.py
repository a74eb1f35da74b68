"""Where a run continues from: the newest good checkpoint, whichever engine wrote it.

A checkpoint of this run's backend is loaded by this run's engine, in any layout (`Engine.load`). One of the other
backend cannot be: the two engines keep their state in unrelated formats. Its weights are gathered once by the
engine that wrote them (`parallel.consolidate`, in local CPU processes of the saved layout), cached beside the
checkpoints, and set into this engine; the LR schedule goes on from the saved step. AdamW's moments start again from
zero, so the first steps move as after a warm restart. This module is the one place that chooses between the two.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from parallel.checkpoint import Checkpointer
from parallel.checkpoint_layout import layout_changes
from parallel.consolidate import TorchWriter, consolidate
from parallel.engine import Engine
from parallel.optim import set_schedule_step
from parallel.restore import Opened, load_engine, open_checkpoint, restore_rank_state

log = logging.getLogger(__name__)


@dataclass
class Resumed:
    """What a resume restored: the step to continue after, the loader position, where it came from."""

    step: int
    loader_state: dict[str, Any]
    path: str
    converted: bool  # written in another layout or by the other backend


def resume(checkpointer: Checkpointer, engine: Engine) -> Resumed | None:
    """Restore engine, RNG and loader position from the newest good checkpoint, if resuming is on; collective."""
    if not checkpointer.config.resume:
        return None
    name = checkpointer.find_resumable()
    return None if name is None else restore(checkpointer, engine, name)


def restore(checkpointer: Checkpointer, engine: Engine, name: str) -> Resumed:
    """Restore engine, RNG and loader position from checkpoint `name` (a step_<N> under checkpoint.dir)."""
    opened = open_checkpoint(checkpointer, name)
    changes = layout_changes(opened.layout, checkpointer.layout)
    if changes and checkpointer.rank == 0:
        log.warning("checkpoint %s was written with %s, this run has %s", name,
                    {k: saved for k, (saved, _) in changes.items()}, {k: now for k, (_, now) in changes.items()})
    if "backend" in changes:
        _load_across_backends(checkpointer, engine, opened)
    else:
        load_engine(checkpointer, engine, opened)
        # The learning rate is this run's schedule at the saved step, not the rate saved with the optimizer: a run
        # that changes its schedule (a longer run, a WSD branch decaying from a stable run's checkpoint) goes on
        # under its own; with the schedule unchanged the two are the same number.
        set_schedule_step(engine.scheduler, opened.layout["step"])
    loader_state = restore_rank_state(opened, checkpointer.rank)
    path = checkpointer.storage.path(name)
    return Resumed(step=opened.layout["step"], loader_state=loader_state, path=path, converted=bool(changes))


def _load_across_backends(checkpointer: Checkpointer, engine: Engine, opened: Opened) -> None:
    """This engine's weights from a checkpoint of the other backend, gathered once (cached beside the checkpoints)."""
    backend, current = opened.layout["backend"], checkpointer.layout["backend"]

    def gather(weights: str) -> None:
        if checkpointer.rank == 0:
            log.warning("checkpoint %s was written by the %s backend, this run uses %s: gathering its weights "
                        "with the %s engine; optimizer moments restart", opened.name, backend, current, backend)
        consolidate(checkpointer.spec, opened.local, TorchWriter(weights))

    weights = checkpointer.make_once(opened.name, f"weights-{backend}.pt", f"{backend} weights", gather)
    engine.load_full_state_dict(torch.load(weights, weights_only=True), step=opened.layout["step"])
