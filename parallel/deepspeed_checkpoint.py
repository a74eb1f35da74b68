"""The DeepSpeed engine's checkpoint format: DeepSpeed's own files, written off the training thread, and a change of
layout through DeepSpeed's universal checkpoint.

Saving: DeepSpeed's `save_checkpoint` goes through a `RecordingEngine`, which keeps each file's state as a host copy
(the only stall training sees) and names the files this rank writes; `write_deferred` writes them later, on the
checkpointer's writer thread. Loading in the saved layout is DeepSpeed's `load_checkpoint`. Another dp, pp, tp or ZeRO
stage goes through `convert_to_universal` (DeepSpeed's converter, in a subprocess) and a universal load; the patterns
it needs to merge and re-split tensor-parallel weights are saved with every checkpoint (`universal_checkpoint_info`).

Imported only by `parallel.deepspeed_engine`: nothing backend-neutral imports DeepSpeed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from orchestrator.errors import CheckpointError
from parallel.checkpoint_layout import ENGINE_DIR
from parallel.engine import MakeOnce

UNIVERSAL_DIR = ENGINE_DIR  # the converted engine state, in the checkpoint's cache of derived state
_ROW_PARALLEL = re.compile(r"(^|\.)(o_proj|down_proj)\.weight$")


def snapshot_to_host(obj: Any) -> Any:
    """A copy of `obj` whose tensors live in fresh host memory, so training may change the originals at once."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, snapshot_to_host(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(snapshot_to_host(v) for v in obj)
    return obj


class RecordingEngine(CheckpointEngine):
    """DeepSpeed checkpoint engine that records which files this rank writes, and can defer writing them.

    DeepSpeed calls `save` for each of its files inside `save_checkpoint`. Deferred, `save` keeps only a host copy,
    so `save_checkpoint` returns after the copy and `drain()` hands the (path, state) pairs to a writer thread;
    otherwise it writes at once and keeps (path, None). Either way the paths say which files are this rank's.
    """

    def __init__(self, defer: bool):
        super().__init__()
        self.name = "RecordingEngine"
        self.defer = defer
        self.pending: list[tuple[str, Any]] = []

    def create(self, info) -> None:
        self.pending = []

    def save(self, state_dict, path: str) -> None:
        if self.defer:
            self.pending.append((path, snapshot_to_host(state_dict)))
        else:
            torch.save(state_dict, path)
            self.pending.append((path, None))

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info) -> bool:
        return True

    def preserves_storage_sharing(self) -> bool:
        # the host copy already gives every tensor its own storage; DeepSpeed's extra clone would copy twice
        return not self.defer

    def drain(self) -> list[tuple[str, Any]]:
        pending, self.pending = self.pending, []
        return pending


def save_recorded(ds: Any, directory: str, defer: bool, client_state: dict[str, Any]) -> list[tuple[str, Any]]:
    """DeepSpeed's save of engine `ds` into `directory` with its file writes captured (as host snapshots when
    `defer`): the (path, state or None) of every file this rank writes, for `write_deferred`."""
    recorder = RecordingEngine(defer=defer)
    original, ds.checkpoint_engine = ds.checkpoint_engine, recorder
    parent, tag = os.path.split(os.path.normpath(directory))
    client_state = {**client_state, "universal_checkpoint_info": universal_checkpoint_info(ds.module)}
    try:
        ds.save_checkpoint(parent, tag=tag, save_latest=False, client_state=client_state)
    finally:
        ds.checkpoint_engine = original
    return recorder.drain()


def write_deferred(pending: list[tuple[str, Any]], directory: str, rank: int) -> list[str]:
    """Write the host snapshots `save_recorded` kept; the files this rank wrote (rank 0: with the files DeepSpeed
    writes beside them once, such as its recovery script)."""
    for path, state in pending:
        if state is not None:
            torch.save(state, path)
    mine = [path for path, _ in pending]
    if rank == 0:
        mine += [os.path.join(root, n) for root, _, names in os.walk(directory) for n in names
                 if not n.endswith(".pt")]
    return mine


def load_deepspeed(ds: Any, directory: str, universal: bool) -> dict[str, Any]:
    """DeepSpeed's load of `directory` (a universal checkpoint when `universal`) into engine `ds`; its client state."""
    # DeepSpeed reads `load_universal` from its config only inside load_checkpoint, so it is set for this call
    config = ds._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = universal
    parent, tag = os.path.split(os.path.normpath(directory))
    try:
        path, client_state = ds.load_checkpoint(parent, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = before
    if path is None:
        raise CheckpointError(f"{directory}: DeepSpeed found no engine state to load")
    return client_state or {}


def load_converted(ds: Any, directory: str, make_once: MakeOnce) -> dict[str, Any]:
    """Load `directory`, written in another layout, through a universal checkpoint made once beside it."""

    def convert(done: str) -> None:
        output = os.path.join(os.path.dirname(done), UNIVERSAL_DIR)
        shutil.rmtree(output, ignore_errors=True)  # what a conversion cut short left
        convert_to_universal(directory, output)
        with open(done, "w", encoding="utf-8") as f:
            f.write(directory + "\n")

    done = make_once("done", "universal checkpoint", convert)
    return load_deepspeed(ds, os.path.join(os.path.dirname(done), UNIVERSAL_DIR), universal=True)


def universal_checkpoint_info(module: torch.nn.Module) -> dict[str, Any]:
    """How `ds_to_universal` merges tensor-parallel slices and how a later run re-splits them, for any tp.

    A sharded weight carries `partition_dim` (0: split by output rows, 1: by input columns). A checkpoint written
    at tp=1 has no sharded weights, yet a resume at tp>1 must split the row-parallel ones (o_proj, down_proj in the
    model's Hugging Face names) along dim 1, so those are recognised by name too; vectors (norms) are replicated.
    Layer numbers become a wildcard so one pattern covers a parameter of every block.
    """
    replicated, by_columns = set(), set()
    for name, param in module.named_parameters():
        pattern = re.sub(r"(^|\\\.)\d+(?=\\\.)", r"\1\\d+", re.escape(name)) + "$"
        dim = getattr(param, "partition_dim", None)
        if dim is None and _ROW_PARALLEL.search(name):
            dim = 1
        if dim is None and param.dim() == 1:
            replicated.add(pattern)
        elif dim == 1:
            by_columns.add(pattern)
    return {
        "universal_checkpoint_version": 0.2,
        "tp_replicated_parameter_patterns": sorted(replicated),
        "parameter_with_row_parallelism_patterns": sorted(by_columns),
    }


def convert_to_universal(engine_dir: str, output_dir: str) -> None:
    """Run DeepSpeed's converter (in a subprocess: it starts worker pools and may use much memory)."""
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", engine_dir,
               "--output_folder", output_dir, "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise CheckpointError(f"{engine_dir}: conversion to a universal checkpoint failed:\n{tail}")
