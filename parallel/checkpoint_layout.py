"""layout.json of a checkpoint step, read as untrusted input: the layout (backend, dp, pp, tp, ZeRO stage) and step
it was written with.

A checkpoint directory outlives the run that wrote it and may be copied, edited or truncated, and resuming or
consolidating sizes everything from this file; so it is read through the bounded JSON reader and each value is
checked against the job spec's own limits. Any problem is one `CheckpointError` naming the file.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from orchestrator.config_parser import load_json, show
from orchestrator.errors import CheckpointError
from orchestrator.spec import STEPS_MAX, ParallelConfig

LAYOUT_FILE = "layout.json"
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
