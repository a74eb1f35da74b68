"""Apply parallelism to the model, in one order, for both engines (torchtitan's `parallelize_llama`).

The model (`parallel.model`) knows nothing of parallelism; this module changes a freshly built one, still on the
meta device, in this order:

  0. LoRA adapters on the blocks' projections (`parallel.lora`, native engine only), and float8 linear layers in
     the blocks (`parallel.float8`, native engine only), before anything wraps them;
  1. tensor parallelism (tp > 1): the engine's technique shards the linears, the embedding and the lm_head, and
     gives the loss over vocabulary-sharded logits; then context parallelism (cp > 1, native engine only:
     `parallel.context_parallel`), each block's attention gathering keys and values over the cp ranks; then expert
     parallelism (ep > 1, native engine only: `parallel.expert_parallel`), each MoE layer keeping E/ep experts and
     sending tokens to theirs;
  2. activation checkpointing of each block (`parallel.activation_checkpoint`);
  3. torch.compile of each block (`parallel.compile`), after checkpointing so a checkpointed block compiles as one
     region; skipped under ZeRO-3 where the engine's sharding hooks into the blocks (`compile_under_zero3`);
  4. pipeline split (pp > 1): the engine's technique keeps this rank's stages (after 1-3, which act per module, so
     a stage's parts arrive already sharded, checkpointed and compiled);
  5. under LoRA, every parameter but the adapters frozen (here, as tensor parallelism's plans replace parameters),
     so that FSDP shards the frozen ones without gradients or optimizer state;
  6. data-parallel sharding (dp × cp > 1: context-parallel peers hold the same weights) of blocks, then roots,
     where the engine shards the model itself (FSDP2); the DeepSpeed engine's ZeRO comes from
     `deepspeed.initialize`, once the optimizer exists.

What differs between engines is handed in as `Techniques`: Megatron-style layers vs DTensor plans for tp, DeepSpeed's
PipelineModule vs torch pipelining for pp, FSDP2 or nothing for dp. The rules a layout must satisfy are the job
spec's (`orchestrator.validate`), checked before any rank starts; here they are only asserted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from orchestrator.spec import JobSpec
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.compile import apply_compile
from parallel.context_parallel import apply_context_parallel
from parallel.expert_parallel import apply_expert_parallel
from parallel.float8 import apply_float8
from parallel.lora import apply_lora, freeze_base
from parallel.model import Transformer, cross_entropy
from parallel.parallel_dims import ParallelDims


@dataclass
class Parallelized:
    """The model as parallelisation leaves it, and what the engine runs.

    model    owns every parameter this rank trains (under pp, only its stages' parts; the rest dropped or on meta)
    blocks   this rank's transformer blocks
    roots    the modules holding the rest (the model, or each pipeline stage): FSDP shards them after the blocks
    module   what a step calls: the model, or DeepSpeed's PipelineModule
    stages   torch pipelining's stage modules of this rank (native, pp > 1)
    """

    model: Transformer
    device: torch.device
    blocks: list[nn.Module]
    roots: list[nn.Module]
    module: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy
    stages: list[nn.Module] = field(default_factory=list)


Technique = Callable[[Parallelized, ParallelDims, JobSpec], Any]


@dataclass(frozen=True)
class Techniques:
    """One engine's implementation of each technique; each takes (state, dims, spec) and updates `state`."""

    tensor_parallel: Technique
    pipeline: Technique
    data_parallel: Technique | None
    compile_under_zero3: bool


def parallelize_model(model: Transformer, dims: ParallelDims, spec: JobSpec, techniques: Techniques,
                      device: torch.device) -> Parallelized:
    """Apply LoRA, float8, tp, cp, ep, activation checkpointing, compile, pp and dp to `model` (on meta) in the order
    of this module."""
    p = spec.parallel
    assert model.dims.n_layers % dims.pp == 0, "orchestrator.validate guarantees the layers split over pp"
    assert not (p.sequence_parallel and dims.tp > 1 and spec.data.seq_len % dims.tp), \
        "orchestrator.validate guarantees the sequence splits over tp under sequence parallelism"
    state = Parallelized(model=model, device=device, blocks=list(model.layers), roots=[model], module=model)
    if spec.model.lora.rank:
        apply_lora(model, spec.model.lora, spec.checkpoint.init_from)
    if p.float8 != "none":
        apply_float8(state.blocks, p.float8, fsdp=dims.dp_shard > 1, emulate=device.type != "cuda")
    if dims.tp > 1:
        techniques.tensor_parallel(state, dims, spec)
    if dims.cp > 1:
        apply_context_parallel(state, dims, spec)
    if dims.ep > 1:
        apply_expert_parallel(state, dims, spec)
    apply_activation_checkpointing(state.blocks, p.activation_checkpointing, p.activation_checkpointing_every)
    if p.compile and (p.zero_stage < 3 or techniques.compile_under_zero3):
        apply_compile(state.blocks)
    if dims.pp > 1:
        techniques.pipeline(state, dims, spec)
    if spec.model.lora.rank:
        freeze_base(state.model)
    if dims.dp_shard > 1 and techniques.data_parallel is not None:
        techniques.data_parallel(state, dims, spec)
    return state
