"""Reading a verified checkpoint back, for any engine: its files made local, its model checked against the run's,
the engine state loaded by the engine that wrote it, and this rank's RNG state and the loader position.

`parallel.resume` decides what a run resumes from (and goes across backends); `parallel.consolidate` uses the same
steps to gather a checkpoint in its own layout.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from orchestrator.config_parser import WRITTEN_FILE_BOUNDS, load_json, load_yaml
from orchestrator.errors import CheckpointError
from orchestrator.spec import JobSpec, ModelConfig
from parallel import checkpoint_layout as names
from parallel.checkpoint import Checkpointer
from parallel.engine import Engine
from parallel.lora_base import check_same_base, load_base


@dataclass
class Opened:
    """A checkpoint about to be restored: its name, a local copy's path and the layout it was written with."""

    name: str
    local: str
    layout: dict[str, Any]

    @property
    def engine_dir(self) -> str:
        return os.path.join(self.local, names.ENGINE_DIR)


def open_checkpoint(checkpointer: Checkpointer, name: str) -> Opened:
    """Checkpoint `name` (a step_<N> under checkpoint.dir) as local files, its model checked against this run's."""
    local = checkpointer.storage.local_path(name)
    if local is None:
        local = checkpointer.staging(f"resume-{name}")
        checkpointer.storage.download(local, name)
    check_same_model(os.path.join(local, names.SPEC_FILE), checkpointer.spec)
    check_same_base(local, checkpointer.spec)
    return Opened(name=name, local=local, layout=names.read_layout(os.path.join(local, names.LAYOUT_FILE)))


def load_engine(checkpointer: Checkpointer, engine: Engine, opened: Opened) -> None:
    """The engine state of a checkpoint of this run's backend, in whatever layout it was written; what a change of
    layout derives (a converted copy) is kept beside the checkpoints."""
    load_base(checkpointer.spec, engine)  # a LoRA checkpoint's adapters go on top of its frozen model
    engine.load(opened.engine_dir, opened.layout, lambda *how: checkpointer.make_once(opened.name, *how))


def restore_rank_state(opened: Opened, rank: int) -> dict[str, Any]:
    """This rank's RNG state set from the checkpoint; the loader position returned."""
    rng_file = os.path.join(opened.local, names.RNG_DIR, names.rank_file(rank, ".pt"))
    if os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    loader_file = os.path.join(opened.local, names.LOADER_FILE)
    state = load_json(loader_file, bounds=WRITTEN_FILE_BOUNDS, error=CheckpointError)
    if not isinstance(state, dict):
        raise CheckpointError(f"{loader_file}: expected a JSON object (the loader position), "
                              f"got {type(state).__name__}")
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what `parallel.checkpoint.rng_state` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


NOT_THE_MODEL = ("family", "size", "attention_mask", "rope_positions")


def check_same_model(saved_spec: str, spec: JobSpec) -> None:
    """A layout can change on resume, the model cannot: name every `model.*` value that differs.

    `model.vocab_size: null` is filled with the shards' tokenizer size padded to a multiple of 1024 whatever tp
    is, so a resume at another tp keeps the vocabulary; it changes when the shards' tokenizer does.
    """
    document = load_yaml(saved_spec, empty=None, bounds=WRITTEN_FILE_BOUNDS, error=CheckpointError) or {}
    saved = document.get("model") if isinstance(document, dict) else None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{saved_spec}: expected a job spec with a `model` section")
    # model.family and model.size only name the preset the values came from: the values themselves are compared.
    # attention_mask and rope_positions say how rows are read, not what the weights are: a run may switch them.
    # A field the checkpoint's spec lacks came after it was written: it ran with that field's default.
    current = {k: v for k, v in dataclasses.asdict(spec.model).items() if k not in NOT_THE_MODEL}
    default = dataclasses.asdict(ModelConfig())
    changed = [f"model.{k}: {saved.get(k, default[k])!r} in the checkpoint, {v!r} now" for k, v in current.items()
               if saved.get(k, default[k]) != v]
    if changed:
        raise CheckpointError(f"{saved_spec}: the checkpoint's model differs from this run's: " + "; ".join(changed)
                              + "; set the checkpoint's values in the job spec (pin model.vocab_size when the "
                              "tokenizer changed)")

