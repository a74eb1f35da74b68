"""Data parallelism with FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the dp axis.

The spec's ZeRO stage maps onto FSDP2 as follows:

  zero_stage 3 → reshard after forward: each block's parameters are gathered for its forward, freed, and gathered
                 again for its backward (ZeRO-3: least memory, one more all-gather per block).
  zero_stage 2 → no reshard after forward: gathered parameters stay until the block's backward (ZeRO-2's memory
                 for parameters during a step, ZeRO-3's for them between steps).
  zero_stage 1, 0 → as 2, with gradients accumulated unsharded (in fp32) over the micro-batches of a step and
                 reduce-scattered once at its end: ZeRO-1's gradient memory and traffic. FSDP2 has no
                 replicated-parameter mode; reduce-scatter + all-gather move the bytes of ZeRO-0's all-reduce.

With one data-parallel rank there is nothing to shard: the native engine skips FSDP and keeps fp32 parameters under
bf16 autocast, the plain single-GPU loop's recipe.

Blocks are sharded one by one (one all-gather and one reduce-scatter per block, prefetched by FSDP2 while the previous
block computes), then the roots, which gather what is left (embedding, final norm, lm_head). Mixed precision computes
in bf16 on gathered copies and reduces gradients in fp32 into fp32 shards, so the optimizer steps fp32 master weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from parallel.expert_parallel import moe_experts

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec
    from parallel.parallel_dims import ParallelDims
    from parallel.parallelize import Parallelized


def reshards_after_forward(zero_stage: int) -> bool:
    return zero_stage == 3


def apply_fsdp(blocks: Iterable[nn.Module], roots: Iterable[nn.Module], mesh: DeviceMesh, param_dtype: torch.dtype,
               reshard_after_forward: bool) -> None:
    """Shard each block, then each root module (a whole model, or each pipeline stage's module) over `mesh`."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        # The last block's backward comes right after its forward: freeing its parameters would only re-gather them.
        last = i == len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward and not last)
    for root in roots:
        # What the roots gather (embedding, final norm, lm_head) stays until the backward, which starts with lm_head
        # right after the forward ends: resharding would only be followed by an all-gather nothing can hide.
        fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def shard_data_parallel(state: Parallelized, dims: ParallelDims, spec: JobSpec) -> None:
    """`parallelize_llama`'s data-parallel step for the native engine: FSDP2 over the mesh's dp axis (dp × cp
    flattened under context parallelism, whose ranks hold the same weights), bf16 compute
    under bf16 precision, resharding after forward per the ZeRO stage. Under expert parallelism each MoE layer's
    experts are sharded first, over the ranks holding the same experts (`ParallelDims.expert_fsdp_mesh`)."""
    p = spec.parallel
    dtype, reshard = torch.bfloat16 if p.precision == "bf16" else torch.float32, reshards_after_forward(p.zero_stage)
    if dims.ep > 1:
        apply_fsdp(moe_experts(state.blocks), [], dims.expert_fsdp_mesh(), dtype, reshard)
    apply_fsdp(state.blocks, state.roots, dims.fsdp_mesh(), dtype, reshard)
