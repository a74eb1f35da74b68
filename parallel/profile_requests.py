"""The files through which `pretrain profile` asks a running job for a profile, and learns where it went.

    <checkpoint.dir>/profiles/request.json          {"id": ..., "steps": N}: written (atomically) by the command
    <checkpoint.dir>/profiles/step_<S>/rank_<r>.json   each rank's torch.profiler trace of steps S..S+N-1
    <checkpoint.dir>/profiles/step_<S>/rank_<r>_memory.pickle   each rank's CUDA memory snapshot (GPU runs)
    <checkpoint.dir>/profiles/step_<S>/done.json    {"id", "step", "steps", "files"}: written last, by rank 0

Rank 0 of the run takes the request (reads and removes it) and the ranks agree on the step to start at
(`parallel.profiling`). Plain files beside the checkpoints, so it works the same for a Ray job and a torchrun run, as
long as the command sees the checkpoint directory (the same machine or a shared filesystem). No torch here: the
command imports this module.
"""

from __future__ import annotations

import glob
import json
import os
import uuid
from typing import Any

PROFILES = "profiles"
REQUEST = "request.json"
DONE = "done.json"


def profiles_dir(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, PROFILES)


def step_dir(checkpoint_dir: str, step: int) -> str:
    return os.path.join(profiles_dir(checkpoint_dir), f"step_{step}")


def write_request(checkpoint_dir: str, steps: int) -> str:
    """Ask the run for `steps` profiled steps; the request's id. Written to a temporary name and renamed, so rank 0
    never reads half of it; an earlier request not yet taken is left alone (FileExistsError)."""
    path = os.path.join(profiles_dir(checkpoint_dir), REQUEST)
    if os.path.exists(path):
        raise FileExistsError(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    request_id = uuid.uuid4().hex
    tmp = f"{path}.{request_id}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"id": request_id, "steps": steps}, f)
    os.replace(tmp, path)
    return request_id


def withdraw_request(checkpoint_dir: str, request_id: str) -> bool:
    """Remove the request `request_id` if no rank has taken it yet; whether it was still there."""
    path = os.path.join(profiles_dir(checkpoint_dir), REQUEST)
    try:
        with open(path, encoding="utf-8") as f:
            waiting = json.load(f).get("id") == request_id
    except (OSError, ValueError):
        return False
    if waiting:
        os.remove(path)
    return waiting


def take_request(checkpoint_dir: str) -> dict[str, Any] | None:
    """The waiting request, removed so that it is served once; None when there is none (or it is unreadable,
    which is logged by the caller's absence of a profile: the command times out and says so)."""
    path = os.path.join(profiles_dir(checkpoint_dir), REQUEST)
    try:
        with open(path, encoding="utf-8") as f:
            request = json.load(f)
        os.remove(path)
    except (OSError, ValueError):
        return None
    steps = request.get("steps") if isinstance(request, dict) else None
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        return None
    return {"id": str(request.get("id", "")), "steps": steps}


def write_done(directory: str, record: dict[str, Any]) -> None:
    tmp = os.path.join(directory, f"{DONE}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(directory, DONE))


def find_done(checkpoint_dir: str, request_id: str) -> dict[str, Any] | None:
    """The done record of request `request_id`, once rank 0 has written it."""
    for path in glob.glob(os.path.join(profiles_dir(checkpoint_dir), "step_*", DONE)):
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("id") == request_id:
            return record
    return None
