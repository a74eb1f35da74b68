"""Layout choice: what wins and why, that every proposal passes the validator, and the no-fit explanations."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.errors import SpecError, UserError
from orchestrator.planner.counting import flops_per_token
from orchestrator.planner.layout import (
    PLANNED_LOSS_CHUNKS,
    Hardware,
    NoLayoutError,
    choose_layout,
    describe,
    evaluate,
    with_layout,
)
from orchestrator.planner.memory import GiB, estimate_memory
from orchestrator.validate import load_spec, load_yaml, parse_spec, spec_to_dict


@pytest.fixture(scope="module")
def llama_8b(repo_root):
    return load_spec(repo_root / "examples" / "llama-8b.yaml")


@pytest.fixture(scope="module")
def llama_124m(repo_root):
    return load_spec(repo_root / "examples" / "llama-124m.yaml")


def test_a_small_model_runs_data_parallel(llama_124m):
    plan = choose_layout(llama_124m, gpus=16, gpu_mem_bytes=80 * GiB, gpus_per_node=8)
    p = plan.parallel
    assert (p.dp, p.pp, p.tp) == (16, 1, 1)
    assert p.activation_checkpointing == "none"
    assert p.micro_batch_size * p.grad_accum * p.dp == llama_124m.parallel.global_batch_size
    assert plan.explanation[1].startswith("chosen: dp=16 pp=1 tp=1")


def test_every_proposal_passes_the_validator(llama_8b):
    plan = choose_layout(llama_8b, gpus=16, gpu_mem_bytes=80 * GiB, gpus_per_node=8)
    hw = plan.hardware
    for candidate in plan.ranked[:20]:
        p = candidate.parallel
        assert candidate.memory.total <= 80 * GiB
        assert p.tp <= 8 and not (p.pp > 1 and p.zero_stage >= 2)
        resolved = parse_spec(spec_to_dict(with_layout(llama_8b, p, hw)))
        assert resolved.parallel.dp * resolved.parallel.pp * resolved.parallel.tp == 16


def test_less_memory_forces_sharding_or_recomputation(llama_8b):
    roomy = choose_layout(llama_8b, gpus=8, gpu_mem_bytes=80 * GiB).parallel
    tight = choose_layout(llama_8b, gpus=8, gpu_mem_bytes=40 * GiB).parallel
    def model_split(p):
        return p.tp * p.pp * (p.dp if p.zero_stage == 3 else 1) * (4 if p.activation_checkpointing != "none" else 1)
    assert model_split(tight) > model_split(roomy)


def test_every_n_recomputes_full_checkpointings_share_over_its_blocks(llama_8b):
    hw = Hardware(gpus=llama_8b.world_size, gpu_mem_bytes=141 * GiB)

    def step(mode, every=2):
        p = dataclasses.replace(llama_8b.parallel, activation_checkpointing=mode, activation_checkpointing_every=every)
        return evaluate(with_layout(llama_8b, p, hw), hw).step

    none, full = step("none"), step("full")
    assert none.recompute == 0 < full.recompute
    every_4th = step("every_n", 4)  # 8 of the 32 blocks
    assert every_4th.recompute == pytest.approx(full.recompute / 4, rel=1e-9)
    assert step("every_n", 1).recompute == pytest.approx(full.recompute, rel=1e-9)
    assert none.tp_comm < every_4th.tp_comm < full.tp_comm  # a block recomputed whole all-reduces again


def test_float8_speeds_the_block_linears_share_of_the_compute(llama_8b):
    """With parallel.float8 the planner runs the block linears' FLOPs at the FP8 peak and states MFU against the
    blended peak, as the ranks do; memory is unchanged (measured: docs/backends.md)."""
    hw = Hardware(gpus=llama_8b.world_size, gpu_mem_bytes=141 * GiB)
    native = dataclasses.replace(llama_8b.parallel, backend="native", tp=1, pp=1, dp=llama_8b.world_size)
    bf16 = evaluate(with_layout(llama_8b, native, hw), hw)
    fp8 = evaluate(with_layout(llama_8b, dataclasses.replace(native, float8="tensorwise"), hw), hw)
    assert bf16.peak_flops == hw.peak_flops < fp8.peak_flops < hw.peak_flops_fp8
    assert fp8.step.compute == pytest.approx(bf16.step.compute * hw.peak_flops / fp8.peak_flops, rel=1e-12)
    assert fp8.memory.allocated == bf16.memory.allocated
    assert fp8.mfu(hw) == pytest.approx(bf16.mfu(hw) * bf16.step.total / fp8.step.total * hw.peak_flops
                                        / fp8.peak_flops, rel=1e-12)


def test_the_explanation_compares_the_runner_up(llama_8b):
    plan = choose_layout(llama_8b, gpus=32, gpu_mem_bytes=80 * GiB)
    text = "\n".join(plan.explanation)
    assert "considered" in text and "fit in 80.0 GiB per GPU" in text
    assert "next best split: " in text and "step time, mostly " in text
    assert plan.ranked == sorted(plan.ranked, key=lambda c: c.step.total)


def test_a_model_that_fits_nowhere_says_by_how_much_and_what_would_fit(llama_8b):
    with pytest.raises(NoLayoutError) as info:
        choose_layout(llama_8b, gpus=2, gpu_mem_bytes=80 * GiB)
    message = str(info.value)
    assert message.startswith("llama-8b: 8.03B parameters fit no layout of 2 GPUs × 80.0 GiB: the smallest, ")
    assert "per GPU, " in message and " too much (weights " in message
    assert "it would fit with: GPUs of ≥ " in message
    assert "4 GPUs of 80.0 GiB (global batch scaled to 256)" in message
    assert "parallel.offload_optimizer=true" in message


def test_a_spec_no_layout_can_satisfy_is_explained():
    # 3 sequences split over no dp of 2, 4 or 8, and dp=1 needs tp=8, which 3 heads do not allow, or cp > 1, which
    # needs the sequence in 2·cp equal chunks.
    spec = parse_spec({"model": {"vocab_size": 1024, "dim": 96, "n_layers": 3, "n_heads": 3},
                       "data": {"seq_len": 2050}})
    with pytest.raises(NoLayoutError, match=r"no layout of 8 GPUs satisfies the spec's rules: model.n_layers: 3 layers "
                                            r"do not split into parallel.pp=2 .*; model.n_heads: 3 heads are not "
                                            r"divisible by parallel.tp=8"):
        choose_layout(spec, gpus=8, gpu_mem_bytes=80 * GiB, global_batch_size=3)


def test_spec_rules_are_the_validators(repo_root):
    # 6 heads: tp=4 and tp=8 break the validator's head rule, so only tp ∈ {1, 2} may be proposed.
    spec = parse_spec({"model": {"vocab_size": 4096, "dim": 768, "n_layers": 6, "n_heads": 6}})
    plan = choose_layout(spec, gpus=8, gpu_mem_bytes=80 * GiB, global_batch_size=64)
    assert {c.parallel.tp for c in plan.ranked} <= {1, 2}
    assert any("heads are not divisible by parallel.tp" in reason for reason in plan.broke_rules)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpus": 12, "gpus_per_node": 8}, r"--gpus 12 is not a whole number of nodes of --gpus-per-node 8"),
        ({"gpus": 0}, r"--gpus must be at least 1, got 0"),
        ({"gpus": 8, "mfu": 1.5}, r"--mfu must be in \(0, 1\], got 1.5"),
    ],
)
def test_bad_hardware_is_named(kwargs, message):
    with pytest.raises(UserError, match=message):
        Hardware(gpu_mem_bytes=80 * GiB, **kwargs)


def test_unresolvable_vocab_is_a_spec_error(repo_root):
    spec = load_spec(repo_root / "examples" / "tiny.yaml", ["data.path=/nonexistent"])
    with pytest.raises(SpecError, match=r"model.vocab_size: not set"):
        choose_layout(spec, gpus=2, gpu_mem_bytes=80 * GiB)


def test_a_long_sequence_that_fits_only_with_its_block_inputs_offloaded_is_told_so(repo_root):
    spec = parse_spec(load_yaml(repo_root / "examples" / "llama-1b.yaml"),
                      overrides=["data.seq_len=131072", "model.max_positions=131072", "parallel.micro_batch_size=1",
                                 "parallel.grad_accum=1", "resources.num_nodes=1", "resources.gpus_per_node=1"])
    with pytest.raises(NoLayoutError) as info:
        choose_layout(spec, gpus=1, gpu_mem_bytes=44 * GiB)
    assert "parallel.activation_offload=true with activation_checkpointing=full or selective" in str(info.value)
    offloaded = parse_spec(spec_to_dict(spec), overrides=["parallel.activation_offload=true",
                                                          "parallel.activation_checkpointing=full"])
    plan = choose_layout(offloaded, gpus=1, gpu_mem_bytes=44 * GiB)
    assert (plan.parallel.activation_checkpointing, plan.parallel.activation_offload) == ("full", True)


def test_a_long_sequence_that_misses_by_its_logits_is_planned_with_loss_slices(repo_root):
    spec = parse_spec(load_yaml(repo_root / "examples" / "llama-1b.yaml"),
                      overrides=["data.seq_len=131072", "model.max_positions=131072", "parallel.micro_batch_size=1",
                                 "parallel.grad_accum=1", "resources.num_nodes=1", "resources.gpus_per_node=1",
                                 "parallel.backend=native", "parallel.activation_checkpointing=full",
                                 "parallel.activation_offload=true"])
    assert estimate_memory(spec).total > 40 * GiB  # the logits of the whole row do not fit beside the rest
    plan = choose_layout(spec, gpus=1, gpu_mem_bytes=40 * GiB)
    assert plan.parallel.loss_chunks == PLANNED_LOSS_CHUNKS
    assert "block inputs in host memory, loss in 8 slices" in describe(plan.parallel)


def test_loss_slices_are_planned_only_where_they_make_a_faster_layout_fit(repo_root):
    spec = parse_spec(load_yaml(repo_root / "examples" / "llama-1b.yaml"),
                      overrides=["data.seq_len=4096", "resources.num_nodes=1", "resources.gpus_per_node=1"])
    roomy = choose_layout(spec, gpus=1, gpu_mem_bytes=141 * GiB)
    assert roomy.parallel.loss_chunks == 1, "slices cost the head's forward again: not taken where all fits"
    assert any(c.parallel.loss_chunks == PLANNED_LOSS_CHUNKS for c in roomy.ranked), "weighed all the same"
    deepspeed = parse_spec(spec_to_dict(spec), overrides=["parallel.backend=deepspeed"])
    assert {c.parallel.loss_chunks for c in choose_layout(deepspeed, gpus=1, gpu_mem_bytes=141 * GiB).ranked} == {1}


def test_loss_slices_add_the_heads_forward_to_the_recomputation(repo_root):
    spec = parse_spec(load_yaml(repo_root / "examples" / "llama-1b.yaml"),
                      overrides=["data.seq_len=4096", "resources.num_nodes=1", "resources.gpus_per_node=1"])
    sliced = parse_spec(spec_to_dict(spec), overrides=["parallel.loss_chunks=8"])
    hw = Hardware(gpus=1, gpu_mem_bytes=141 * GiB)
    whole, slices = evaluate(spec, hw).step, evaluate(sliced, hw).step
    head = 2 * spec.model.dim * spec.model.vocab_size / flops_per_token(spec.model, 4096)
    assert slices.compute == whole.compute
    assert slices.recompute - whole.recompute == pytest.approx(whole.compute * head)
