"""The pipeline bubble's theory and the benchmark's tensor/pipeline-parallel run names.

The benchmark (`benchmarks/gpu_backends.py`) builds each run's spec from its name; a pp run must reach the engine
with the layout and schedule the name says and the rest of the `--model` spec as written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from orchestrator.errors import SpecError
from parallel.native_pipeline import bubble_fraction, stages_per_rank

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_backends  # noqa: E402


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b", "zero_bubble"])
def test_bubble_is_idle_slots_over_all_slots(schedule: str) -> None:
    """Each rank idles p − 1 slots of a stage's work while running v·m: the share shrinks with more micro-batches
    and with more stages per rank, and vanishes with one stage."""
    for pp, m in [(2, 8), (4, 16), (8, 8)]:
        v = stages_per_rank(schedule)
        idle, busy = pp - 1, v * m
        assert bubble_fraction(pp, m, schedule) == pytest.approx(idle / (idle + busy))
        assert bubble_fraction(pp, 2 * m, schedule) < bubble_fraction(pp, m, schedule)
    assert bubble_fraction(1, 8, schedule) == 0
    if schedule != "1f1b":
        assert bubble_fraction(2, 8, schedule) < bubble_fraction(2, 8, "1f1b")


def _args(**overrides) -> argparse.Namespace:
    flags = {**dict.fromkeys(gpu_backends.PARALLEL_FLAGS), "doc_tokens": 0}
    return argparse.Namespace(model=str(REPO / "examples" / "llama-8b.yaml"), seq_len=4096, device="cpu",
                              **{**flags, **overrides})


@pytest.mark.parametrize(("name", "schedule"), [("native-zero1-pp2", "1f1b"), ("native-zero1-pp2-1f1b", "1f1b"),
                                                ("native-zero1-pp2-interleaved-acfull", "interleaved_1f1b")])
def test_pp_run_names_set_layout_and_schedule(name: str, schedule: str) -> None:
    spec = _spec(name, _args(grad_accum=8))
    p = spec.parallel
    assert (p.pp, p.tp, p.dp, p.pp_schedule, p.grad_accum) == (2, 1, 1, schedule, 8)
    assert p.activation_checkpointing == ("full" if "-acfull" in name else "selective")  # the spec's unless named
    assert p.sequence_parallel and p.compile  # the rest of the spec as written


def test_zero_bubble_run_meets_the_validators_compile_rule() -> None:
    """zero_bubble under the spec's compile=true is refused with the validator's message; --no-compile runs it."""
    with pytest.raises(SpecError, match="parallel.compile: zero_bubble"):
        _spec("native-zero1-pp2-zerobubble", _args(grad_accum=8))
    assert _spec("native-zero1-pp2-zerobubble", _args(grad_accum=8, compile=False)).parallel.pp_schedule \
        == "zero_bubble"


def _spec(name: str, args: argparse.Namespace):
    run = gpu_backends.parse_run(name)
    return gpu_backends.build_spec("native", 1, 2, args, tp=int(run["tp"] or 1), pp=int(run["pp"] or 1),
                                   activation_checkpointing=run["ac"],
                                   pp_schedule=gpu_backends.SCHEDULES.get(run["schedule"] or ""))


def test_doc_tokens_run_the_spec_under_per_document_masks() -> None:
    causal = gpu_backends.build_spec("native", 1, 2, _args(), cp=2)
    documents = gpu_backends.build_spec("native", 1, 2, _args(doc_tokens=4096), cp=2)
    assert (causal.model.attention_mask, documents.model.attention_mask) == ("causal", "document")
    assert documents.model.rope_positions == causal.model.rope_positions
    assert documents.parallel.cp == 2


def test_tp_run_keeps_the_specs_sequence_parallelism() -> None:
    spec = gpu_backends.build_spec("native", 1, 2, _args(), tp=2)
    assert (spec.parallel.tp, spec.parallel.pp, spec.parallel.dp, spec.parallel.sequence_parallel) == (2, 1, 1, True)
    off = gpu_backends.build_spec("native", 1, 2, _args(sequence_parallel=False), tp=2)
    assert not off.parallel.sequence_parallel


def test_offload_run_name_offloads_under_full_checkpointing() -> None:
    run = gpu_backends.parse_run("native-zero1-acfull-offload")
    spec = gpu_backends.build_spec("native", 1, 1, _args(), activation_checkpointing=run["ac"],
                                   activation_offload=bool(run["offload"]))
    assert (spec.parallel.activation_checkpointing, spec.parallel.activation_offload) == ("full", True)
    assert not gpu_backends.parse_run("native-zero1-acfull")["offload"]


def test_loss_run_name_sets_the_loss_slices() -> None:
    run = gpu_backends.parse_run("native-zero1-acfull-offload-loss8")
    spec = gpu_backends.build_spec("native", 1, 1, _args(), activation_checkpointing=run["ac"],
                                   activation_offload=bool(run["offload"]), loss_chunks=int(run["chunks"]))
    assert (spec.parallel.loss_chunks, spec.parallel.activation_offload) == (8, True)
    assert gpu_backends.build_spec("native", 1, 1, _args()).parallel.loss_chunks == 1  # the spec's


@pytest.mark.parametrize("name", ["native-zero1-pp", "native-zero1-pp2-gpipe", "native-zero1-ac-pp2"])
def test_bad_run_name_names_the_allowed_form(name: str) -> None:
    with pytest.raises(SystemExit, match=r"is not plain or .*-pp<n>\[-1f1b\|-interleaved\|-zerobubble\]"):
        gpu_backends.parse_run(name)
