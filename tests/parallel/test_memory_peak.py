"""benchmarks/memory_peak.py replays the CUDA allocator's history of one step: the peak it finds and what is alive
there must follow the allocations and frees in order, counted from what was allocated before the step."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from memory_peak import GiB, allocated_by, peak_breakdown  # noqa: E402


def frame(path: str, line: int, name: str) -> dict:
    return {"filename": path, "line": line, "name": name}


def event(action: str, addr: int, gib: float, frames: list[dict] | None = None) -> dict:
    return {"action": action, "addr": addr, "size": int(gib * GiB), "frames": frames or []}


MODEL = frame(str(REPO / "parallel" / "model.py"), 333, "forward")
LOSS = frame(str(REPO / "parallel" / "model.py"), 423, "cross_entropy")


def test_the_peak_is_the_highest_point_and_what_is_alive_there():
    trace = [
        event("alloc", 1, 2.0, [MODEL]),  # a block's input, kept
        event("alloc", 2, 1.0, [MODEL]),  # freed before the peak
        event("free_requested", 2, 1.0),
        event("free_completed", 2, 1.0),
        event("alloc", 3, 4.0, [LOSS]),  # the logits: the peak is reached here, at 3 + 2 + 4 GiB
        event("free_completed", 3, 4.0),
        event("free_completed", 99, 3.0),  # a tensor from before the step, freed: the count falls below it
        event("alloc", 4, 5.0, [LOSS]),  # 3 - 3 + 2 + 5 = 7 GiB, under the peak
    ]
    result = peak_breakdown(trace, before=3 * GiB)
    assert result["peak_gib"] == 9.0
    assert result["from_before_at_peak_gib"] == 3.0
    assert result["peak_reached_by"] == "parallel/model.py:423 cross_entropy"
    assert [(row["where"], row["gib"], row["tensors"]) for row in result["at_peak"]] == [
        ("parallel/model.py:423 cross_entropy", 4.0, 1), ("parallel/model.py:333 forward", 2.0, 1)]


def test_a_step_that_allocates_nothing_peaks_where_it_began():
    result = peak_breakdown([event("free_completed", 7, 1.0)], before=2 * GiB)
    assert result["peak_gib"] == 2.0 and result["at_peak"] == [] and result["peak_reached_by"] is None


def test_frames_outside_the_repository_name_the_innermost_one():
    torch_frame = frame("/usr/lib/python3/site-packages/torch/autograd/graph.py", 10, "backward")
    assert allocated_by([torch_frame]) == "graph.py:10 backward"
    assert allocated_by([torch_frame, MODEL]) == "parallel/model.py:333 forward"
    assert allocated_by([]) == "autograd"
