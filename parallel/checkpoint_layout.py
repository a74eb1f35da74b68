"""A checkpoint directory's layout: the names of its entries, in one place for everything that writes or reads one,
and its layout.json read as untrusted input.

    <checkpoint.dir>/
      step_<N>/                  one complete checkpoint
        engine/                  the engine's own files, in its own format (`Engine.save`)
        rng/rank_<r>.pt          python, numpy, torch and cuda RNG states of every rank
        loader.json              the loader's rank-independent position
        spec.yaml                the resolved job spec
        layout.json              backend, dp, pp, tp, ZeRO stage and world size it was written with
        ranks/rank_<r>.json      what each rank wrote, with checksums (assembled into the manifest)
        manifest.json            step, layout and the sha256 of every file; written last
      step_<N>.partial/          a checkpoint being written (renamed to step_<N> when complete)
      .universal/step_<N>/       what a resume derived from step_<N> once (converted or gathered state)
      latest                     name of the newest complete checkpoint, updated after the rename

layout.json holds the layout (backend, dp, pp, tp, ZeRO stage) and step a checkpoint was written with.
A checkpoint directory outlives the run that wrote it and may be copied, edited or truncated, and resuming or
consolidating sizes everything from this file; so it is read through the bounded JSON reader and each value is
checked against the job spec's own limits. Any problem is one `CheckpointError` naming the file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

from orchestrator.config_parser import WRITTEN_FILE_BOUNDS, load_json, loads_json, show
from orchestrator.errors import CheckpointError
from orchestrator.spec import STEPS_MAX, ParallelConfig

LAYOUT_FILE = "layout.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
LOADER_FILE = "loader.json"
SPEC_FILE = "spec.yaml"
ENGINE_DIR = "engine"
RNG_DIR = "rng"
RANKS_DIR = "ranks"
PARTIAL_SUFFIX = ".partial"
DERIVED_DIR = ".universal"  # named when it held only universal checkpoints; gathered weights are kept there too
STEP_PREFIX = "step_"
# What a checkpoint's layout is compared by on resume (world_size follows from the last four).
LAYOUT_KEYS = ("backend", "dp", "pp", "tp", "zero_stage")
_STEP = re.compile(rf"^{STEP_PREFIX}(\d+)$")
MAX_WORLD_SIZE = 2**20
_LIMITS = {f.name: f.metadata for f in dataclasses.fields(ParallelConfig)}


def read_layout(path: str) -> dict[str, Any]:
    """The layout.json at `path`, checked; `backend` is filled in as deepspeed for checkpoints written before
    there was a choice."""
    layout = load_json(path, error=CheckpointError)
    if not isinstance(layout, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(layout).__name__}")
    layout.setdefault("backend", "deepspeed")
    problems = []
    if layout["backend"] not in ("deepspeed", "native"):
        problems.append(f"backend is {show(layout['backend'])}, expected one of 'deepspeed', 'native'")
    if layout.get("zero_stage") not in _LIMITS["zero_stage"]["choices"]:
        problems.append(f"zero_stage is {show(layout.get('zero_stage'))}, expected one of 0, 1, 2, 3")
    bounds = {key: (1, _LIMITS[key]["max"]) for key in ("dp", "pp", "tp")}
    bounds |= {"step": (0, STEPS_MAX), "world_size": (1, MAX_WORLD_SIZE)}
    for key, (low, high) in bounds.items():
        value = layout.get(key)
        if key == "world_size" and value is None:
            continue  # written before the layout recorded it
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            problems.append(f"{key} is {show(value)}, expected an integer from {low} to {high}")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    return layout


def listed_files(data: bytes, source: str) -> dict[str, dict[str, Any]]:
    """The `files` of a manifest or rank marker: {path: {"sha256": hex, "bytes": size}}, bounded like every file
    the project reads back; a corrupt or truncated one is a `CheckpointError` naming `source`."""
    document = loads_json(data, source=source, bounds=WRITTEN_FILE_BOUNDS, error=CheckpointError)
    files = document.get("files") if isinstance(document, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and type(entry.get("bytes")) is int
            for entry in files.values()):
        raise CheckpointError(f"{source}: not a file list: it needs \"files\": {{path: {{\"sha256\": text, "
                              "\"bytes\": integer}}}}")
    return files


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step}"


def step_of(name: str) -> int | None:
    """N of a directory named step_<N>; None for any other name."""
    m = _STEP.match(name)
    return int(m.group(1)) if m else None


def rank_file(rank: int, suffix: str) -> str:
    """A rank's own file name in rng/ and ranks/: rank_<r> with five digits, so they sort by rank."""
    return f"rank_{rank:05d}{suffix}"


def holds_checkpoints(names: Iterable[str]) -> bool:
    """Whether a directory with these entries is a checkpoint directory or one of its step_<N>."""
    return any(n in (LATEST_FILE, LAYOUT_FILE) or n.startswith(STEP_PREFIX) for n in names)


def layout_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """(saved, current) of each layout key in which a checkpoint's layout (`read_layout`) differs from a run's."""
    return {k: (saved.get(k), current.get(k)) for k in LAYOUT_KEYS if saved.get(k) != current.get(k)}


def run_layout(spec: Any, dims: Any) -> dict[str, Any]:
    """The layout a run with `spec` (a JobSpec) and `dims` (its ParallelDims) writes into its checkpoints."""
    return {"backend": spec.parallel.backend, "dp": dims.dp, "pp": dims.pp, "tp": dims.tp,
            "zero_stage": spec.parallel.zero_stage, "world_size": dims.world_size}
