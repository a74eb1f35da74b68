"""The memory model: activations against what autograd really saves in the model's block; how ZeRO stages,
checkpointing, sequence parallelism and pipeline stages move the bytes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from memory_probe import SPEC

from orchestrator.planner.counting import stage_params
from orchestrator.planner.memory import (
    LOGIT_BYTES,
    activation_bytes,
    activation_bytes_per_token,
    attention_bytes_per_token,
    engine_buffers,
    estimate_memory,
)
from orchestrator.validate import parse_spec
from parallel.model import build_model, cross_entropy
from tests.helpers import torchrun

PROBE = Path(__file__).with_name("memory_probe.py")
REPO = PROBE.parents[2]


def saved_activation_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
    return sum(kept.values())


@pytest.mark.parametrize(("dtype", "switches"), [
    (torch.bfloat16, {}), (torch.float32, {}), (torch.bfloat16, {"head_dim": 48, "qk_norm": "head"}),
    (torch.float32, {"qk_norm": "full"}), (torch.bfloat16, {"attn_softcap": 50.0, "head_dim": 16}),
    (torch.float32, {"attn_softcap": 50.0}), (torch.bfloat16, {"sliding_window": 16, "norm_placement": "sandwich"}),
])
def test_block_activations_match_what_autograd_saves(dtype, switches):
    def spec_of(layers: int):
        return parse_spec({"model": {"vocab_size": 512, "dim": 192, "n_layers": layers, "n_heads": 6,
                                     "n_kv_heads": 2, "multiple_of": 32, **switches}})

    per_block, estimate = block_activations(spec_of, dtype)
    assert estimate == pytest.approx(per_block, rel=0.08)


def block_activations(spec_of, dtype: torch.dtype) -> tuple[float, float]:
    """(measured, estimated) bytes one block keeps per token for backward, in `dtype`: the measured from models of
    `spec_of(1)` and `spec_of(3)` layers (2 sequences of 96 tokens; the difference is two blocks' worth). The
    weights are seeded: a MoE router's choices, and so the copies dropped at a capacity, follow them."""
    measured = []
    for layers in (1, 3):
        spec = spec_of(layers)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_model(spec.model, "cpu").to(dtype)
        tokens = torch.randint(0, 512, (2, 97), generator=torch.Generator().manual_seed(0))
        measured.append(saved_activation_bytes(model, tokens))
    width = 2 if dtype == torch.bfloat16 else 4
    estimate = activation_bytes_per_token(spec.model, width) + attention_bytes_per_token(spec.model, 96, width)
    return (measured[1] - measured[0]) / 2 / (2 * 96), estimate


@pytest.fixture(scope="module")
def billion():
    return parse_spec({
        "model": {"vocab_size": 50304, "dim": 2048, "n_layers": 16, "n_heads": 16},
        "data": {"seq_len": 2048},
        "parallel": {"micro_batch_size": 2, "precision": "bf16"},
        "resources": {"num_nodes": 1, "gpus_per_node": 8},
    })


def with_parallel(spec, **changes):
    return dataclasses.replace(spec.parallel, **changes)


@pytest.mark.parametrize("backend", ["deepspeed", "native"])
def test_each_zero_stage_shards_more(billion, backend):
    totals = [estimate_memory(billion, with_parallel(billion, backend=backend, zero_stage=z, grad_accum=4)).allocated
              for z in (1, 2, 3)]
    assert totals[0] > totals[1] > totals[2]


def test_native_zero1_accumulates_whole_gradients_only_over_several_micro_batches(billion):
    """One micro-batch a step is reduce-scattered block by block in its backward, as ZeRO-2 does."""
    def gradients(zero_stage: int, grad_accum: int) -> int:
        p = with_parallel(billion, backend="native", zero_stage=zero_stage, grad_accum=grad_accum)
        return estimate_memory(billion, p).gradients

    assert gradients(1, 1) == gradients(2, 1) < gradients(2, 4) < gradients(1, 4)


def test_deepspeed_keeps_bf16_weights_and_shards_master_and_moments(billion):
    one, three = (estimate_memory(billion, with_parallel(billion, backend="deepspeed", zero_stage=z)) for z in (1, 3))
    params = stage_params(billion.model)[0]
    assert three.weights == 2 * params // 8 and one.weights == 2 * params
    assert one.optimizer == three.optimizer == 12 * params // 8  # fp32 master + two moments, sharded from stage 1


def test_checkpointing_keeps_block_inputs_only(billion):
    plain = estimate_memory(billion).activations
    recomputed = estimate_memory(billion, with_parallel(billion, activation_checkpointing="full")).activations
    assert recomputed < plain / 2.5  # the logits of the last micro-batch stay either way
    seq = billion.data.seq_len
    block_inputs = 16 * 2 * seq * 2048 * 2
    assert recomputed > block_inputs


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_offload_leaves_three_block_inputs_on_the_gpu(billion, mode: str):
    kept = with_parallel(billion, backend="native", activation_checkpointing=mode)
    offloaded = dataclasses.replace(kept, activation_offload=True)
    moved = estimate_memory(billion, kept).activations - estimate_memory(billion, offloaded).activations
    block_input = 2 * 2048 * 2048 * 2  # micro-batch 2 × seq × dim, bf16 under FSDP over 8 ranks
    assert moved == (16 - 3) * block_input


def test_selective_checkpointing_keeps_less_than_none_and_more_than_full(billion):
    kept = {mode: estimate_memory(billion, with_parallel(billion, activation_checkpointing=mode)).activations
            for mode in ("none", "selective", "full")}
    assert kept["none"] > kept["selective"] > kept["full"]
    # Sequence parallelism splits what selective keeps; the native engine's selective also keeps the gathered
    # inputs of the column-parallel projections, a whole sequence's on every rank (test_plan_memory_native holds that
    # to a measured peak), which DeepSpeed's tensor parallelism gathers again.
    m, tokens = billion.model, billion.data.seq_len * billion.parallel.micro_batch_size
    gathered = 2 * m.dim * 2 * tokens * m.n_layers  # two a block, bf16
    for backend in ("deepspeed", "native"):
        tp = with_parallel(billion, backend=backend, tp=2, dp=4, activation_checkpointing="selective")
        without_sp = estimate_memory(billion, tp).activations
        with_sp = estimate_memory(billion, dataclasses.replace(tp, sequence_parallel=True)).activations
        assert without_sp < kept["selective"]
        assert with_sp - (gathered if backend == "native" else 0) < without_sp, backend


def test_every_n_keeps_full_on_its_blocks_and_none_on_the_others(billion):
    def kept(mode, every=2):
        p = with_parallel(billion, activation_checkpointing=mode, activation_checkpointing_every=every)
        return estimate_memory(billion, p).activations

    assert kept("every_n", 1) == kept("full")
    steps = {every: kept("every_n", every) for every in (2, 4, 8)}  # 8, 4 and 2 of the 16 blocks checkpointed
    assert kept("full") < steps[2] < steps[4] < steps[8] < kept("none")
    # Each block left unchecked adds the same: its activations over its input.
    per_block = (steps[4] - steps[2]) / (8 - 4)
    assert steps[8] - steps[4] == pytest.approx((4 - 2) * per_block, rel=1e-9)
    # Every 16th block is the last one, recomputed first in backward, after the loss has freed the logits: the
    # peak holds the other blocks' activations, its input and the larger of the logits and its recomputation.
    assert steps[8] < kept("every_n", 16) < kept("none")


def test_every_n_counts_the_models_layers_on_each_pipeline_stage(billion):
    """Stage 0 of four holds layers 0-3, stage 1 layers 4-7: every 8th block is layer 7, on stage 1 only."""
    def stage_bytes(mode, stage):
        p = with_parallel(billion, pp=4, dp=2, grad_accum=8, activation_checkpointing=mode,
                          activation_checkpointing_every=8)
        return activation_bytes(billion.model, billion.data.seq_len, p, stage, 2)

    assert stage_bytes("every_n", 0) == stage_bytes("none", 0)
    assert stage_bytes("full", 1) < stage_bytes("every_n", 1) < stage_bytes("none", 1)


def test_sequence_parallel_shards_the_norms(billion):
    tp = with_parallel(billion, tp=4, dp=2)
    without = estimate_memory(billion, tp).activations
    with_sp = estimate_memory(billion, dataclasses.replace(tp, sequence_parallel=True)).activations
    one_rank = estimate_memory(billion).activations
    assert with_sp == pytest.approx(one_rank / 4, rel=1e-6)  # every saved tensor is split four ways
    assert with_sp < without < one_rank


def test_first_pipeline_stage_holds_micro_batches_in_flight(billion):
    pp = with_parallel(billion, pp=4, dp=2, grad_accum=8)
    memory = estimate_memory(billion, pp)
    assert memory.stage == 0
    two_in_flight = estimate_memory(billion, dataclasses.replace(pp, grad_accum=2))
    assert two_in_flight.activations < memory.activations


def test_offload_leaves_no_optimizer_state_on_the_gpu(billion):
    offloaded = with_parallel(billion, backend="deepspeed", offload_optimizer=True)  # DeepSpeed's alone
    assert estimate_memory(billion, offloaded).optimizer == 0


def test_deepspeed_zero1_bf16_gradients_pile_up_only_when_accumulated_after_backward(billion):
    """With checkpointing and one sequence the activations are smaller than the model's bf16 gradients, so the
    gradients DeepSpeed holds from backward to the step set the peak; added to the fp32 buffer as they are made
    (`immediate_grad_update`, not used with optimizer offload), they never pile up."""
    ds = with_parallel(billion, backend="deepspeed", micro_batch_size=1, activation_checkpointing="full")
    looped = dataclasses.replace(ds, offload_optimizer=True)
    assert engine_buffers(billion, ds).frees_bf16_gradients and not engine_buffers(billion, looped).frees_bf16_gradients
    immediate, after = estimate_memory(billion, ds), estimate_memory(billion, looped)
    assert immediate.overhead == 0
    assert after.overhead == 2 * stage_params(billion.model, 1, 1)[0] - after.activations


def test_breakdown_rows_add_up(billion):
    memory = estimate_memory(billion)
    rows = dict(memory.rows())
    parts = ("weights", "gradients", "optimizer states", "activations", "framework buffers")
    assert sum(rows[name] for name in parts) == rows["allocated (peak tensors)"]
    assert rows["total"] == memory.allocated + memory.reserve


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1])  # ZeRO-1 is the default; stage 3 (0.3% off when tried) costs as much again
def test_model_states_match_a_real_deepspeed_engine(zero, tmp_path):
    """Tensors alive between steps of a real 2-rank bf16 engine (gloo) = the estimate's model states: weights, the
    gradients kept through the step, Adam and master shards, and ZeRO-3's resident reduction bucket."""
    out = tmp_path / "probe.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "DS_ACCELERATOR": "cpu",
           "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    cmd = [*torchrun(2), str(PROBE), str(out), str(zero)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and out.exists(), done.stdout[-2000:] + done.stderr[-4000:]
    live = json.loads(out.read_text())["live_bytes"]
    spec = parse_spec(SPEC, overrides=[f"parallel.zero_stage={zero}", "resources.gpus_per_node=2"])
    memory = estimate_memory(spec)
    kept = memory.weights + memory.gradients + memory.optimizer + (memory.overhead if zero == 3 else 0)
    assert live == pytest.approx(kept, rel=0.05)


def test_loss_slices_keep_one_slices_logits(billion):
    """At a long sequence the logits are the larger part of the peak: slices take most of them off it, down to where
    one block's recomputation is the larger part instead."""
    long = dataclasses.replace(billion, data=dataclasses.replace(billion.data, seq_len=32768))
    full = with_parallel(long, backend="native", activation_checkpointing="full", micro_batch_size=1)
    tokens = long.data.seq_len
    whole_logits = tokens * long.model.vocab_size * LOGIT_BYTES
    kept = {n: estimate_memory(long, dataclasses.replace(full, loss_chunks=n)).activations for n in (1, 8, 64)}
    assert 3 / 4 * whole_logits <= kept[1] - kept[8] <= whole_logits + tokens * long.model.dim * (4 + 2)
    assert kept[64] <= kept[8]
