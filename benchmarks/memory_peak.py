"""What is alive at a training step's memory peak, and which line of code allocated it.

`torch.cuda.max_memory_allocated` says how high a step goes, not what put it there; a memory model (the planner's)
needs the second. `record_step` runs one step under the CUDA caching allocator's history, which logs every
allocation and free with its Python stack, and `peak_breakdown` replays that log from the bytes allocated before
the step: the highest point it reaches is the step's peak, and the allocations alive there, grouped by the line
that made them, are its breakdown. A line of code inductor generated is named by its own text (which carries the
buffer's shape), since its file exists only on the machine that compiled it. benchmarks/gpu_backends.py
--memory-peak records one step of each run this way.
"""

from __future__ import annotations

import linecache
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

REPO = str(Path(__file__).resolve().parent.parent)
GiB = 2**30


def record_step(step: Callable[[], object], top: int = 20) -> dict:
    """Run `step` once under the allocator's history and return `peak_breakdown` of it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return peak_breakdown(snapshot["device_traces"][torch.cuda.current_device()], before, top)


def peak_breakdown(trace: list[dict], before: int, top: int = 20) -> dict:
    """The highest point of `trace` (the allocator's events of one device) counted from `before` bytes, and what
    the events made that is alive there, by allocating line, largest first."""
    allocated, peak, peak_at = before, before, -1
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            allocated += event["size"]
            if allocated > peak:
                peak, peak_at = allocated, i
        elif event["action"] == "free_completed":
            allocated -= event["size"]
    alive: dict[int, int] = {}
    for i, event in enumerate(trace[:peak_at + 1]):
        if event["action"] == "alloc":
            alive[event["addr"]] = i
        elif event["action"] == "free_completed":
            alive.pop(event["addr"], None)
    sizes, counts = Counter(), Counter()
    for i in alive.values():
        where = allocated_by(trace[i].get("frames", []))
        sizes[where] += trace[i]["size"]
        counts[where] += 1
    return {"before_gib": round(before / GiB, 2), "peak_gib": round(peak / GiB, 2),
            "from_before_at_peak_gib": round((peak - sum(sizes.values())) / GiB, 2),
            "peak_reached_by": allocated_by(trace[peak_at].get("frames", [])) if peak_at >= 0 else None,
            "at_peak": [{"where": where, "gib": round(size / GiB, 3), "tensors": counts[where]}
                        for where, size in sizes.most_common(top)]}


def allocated_by(frames: list[dict]) -> str:
    """The innermost frame in this repository, and the innermost frame of inductor's generated code when there is
    one (its text: which buffer, of which shape); "autograd" when no Python frame made it (the backward's own
    gradients and saved-tensor unpacking)."""
    ours = next((f for f in frames if f["filename"].startswith(REPO)), None)
    generated = next((f for f in frames if "torchinductor" in f["filename"]), None)
    parts = []
    if ours:
        parts.append(f"{Path(ours['filename']).relative_to(REPO)}:{ours['line']} {ours['name']}")
    if generated:
        text = linecache.getline(generated["filename"], generated["line"]).strip()
        parts.append(f"inductor: {text[:160] or generated['name']}")
    if not parts and frames:
        parts.append(f"{Path(frames[0]['filename']).name}:{frames[0]['line']} {frames[0]['name']}")
    return " | ".join(parts) or "autograd"

