"""What the validator refuses for the native backend and for pipeline schedules, one message per problem."""

from __future__ import annotations

import pytest

from orchestrator.errors import SpecError
from orchestrator.validate import parse_spec

TWO_STAGES = {"model": {"n_layers": 4}, "resources": {"gpus_per_node": 2}}


def problems(parallel: dict, model: dict | None = None) -> list[str]:
    raw = {**TWO_STAGES, "parallel": {"pp": 2, **parallel}, "model": {**TWO_STAGES["model"], **(model or {})}}
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("schedule", ["interleaved_1f1b", "zero_bubble"])
def test_deepspeed_runs_only_1f1b(schedule):
    assert problems({"backend": "deepspeed", "pp_schedule": schedule, "grad_accum": 2}) == [
        f"parallel.pp_schedule: '{schedule}': DeepSpeed's pipeline engine runs only '1f1b'; use "
        "parallel.backend=native for interleaved_1f1b or zero_bubble"]


def test_1f1b_needs_a_micro_batch_per_stage():
    assert problems({"backend": "native", "grad_accum": 1}) == [
        "parallel.grad_accum: 1 micro-batches are fewer than parallel.pp=2 stages; 1F1B needs at least one per stage"]


def test_interleaved_needs_rounds_and_two_stages_per_rank():
    assert problems({"backend": "native", "pp_schedule": "interleaved_1f1b", "grad_accum": 3}, {"n_layers": 6}) == [
        "parallel.grad_accum: 3 is not a multiple of parallel.pp=2, as the interleaved_1f1b schedule's rounds need",
        "model.n_layers: 6 layers do not split into 2 × parallel.pp=2 stages (interleaved_1f1b runs two stages per "
        "rank)",
    ]


def test_zero_bubble_refuses_compile():
    (message,) = problems({"backend": "native", "pp_schedule": "zero_bubble", "grad_accum": 2, "compile": True})
    assert message.startswith("parallel.compile: zero_bubble splits each backward")


def test_native_refuses_tied_embeddings_across_stages_and_offload():
    assert problems({"backend": "native", "grad_accum": 2, "offload_optimizer": True}, {"tie_embeddings": True}) == [
        "model.tie_embeddings: with parallel.pp=2 the native backend cannot share one weight between the first and "
        "the last stage; use tie_embeddings=false or parallel.backend=deepspeed",
        "parallel.offload_optimizer: not available with parallel.backend=native; use parallel.backend=deepspeed to "
        "keep optimizer states in host memory",
    ]


def test_native_layouts_that_work_pass():
    spec = parse_spec({**TWO_STAGES, "parallel": {"backend": "native", "pp": 2, "pp_schedule": "zero_bubble",
                                                  "grad_accum": 4, "zero_stage": 3}})
    assert (spec.parallel.pp_schedule, spec.parallel.dp) == ("zero_bubble", 1)
