"""Tensor parallelism (+ sequence parallelism) with DTensor: `parallelize_module` plans on the tp axis of a DeviceMesh.

The split is Megatron's, as in `parallel.megatron_tp` (the DeepSpeed backend's hand-written layers): q/k/v and
gate/up column-wise (heads and hidden units split), o_proj and down_proj row-wise, the embedding row-wise over the
vocabulary, the lm_head column-wise with its logits left vocab-sharded for `VocabParallelLoss`. Attention reads its
head counts from the local projections' widths, so nothing in the model changes.

With sequence parallelism the residual stream between sub-layers is a sequence shard (`Shard(1)`): norms run on it
(`SequenceParallel`), each sub-layer's input is all-gathered on entry and its output reduce-scattered on exit.
Without it the residual stream is replicated and norms are plain modules computed identically on every rank.

Works on a model still on the meta device; the engine materialises each rank's shards afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def apply_dtensor_tp(model: nn.Module, blocks: Iterable[nn.Module], mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard `blocks` and whichever of the model's embed_tokens / norm / lm_head are present (a pipeline stage may
    hold none of them) over the 1-D tensor-parallel `mesh`."""
    residual = Shard(1) if sequence_parallel else Replicate()
    top: dict = {}
    if getattr(model, "embed_tokens", None) is not None:
        top["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if getattr(model, "lm_head", None) is not None:
        top["lm_head"] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1))
        if sequence_parallel:
            top["norm"] = SequenceParallel()
    tied = getattr(model, "embed_tokens", None) is not None and getattr(model, "lm_head", None) is not None \
        and model.lm_head.weight is model.embed_tokens.weight
    if top:
        parallelize_module(model, mesh, top)
    if tied:
        # Both are Shard(0) over the vocabulary; parallelize_module made two parameters of the one weight.
        model.lm_head.weight = model.embed_tokens.weight
    for block in blocks:
        parallelize_module(block, mesh, _block_plan(residual, sequence_parallel))


def _block_plan(residual, sequence_parallel: bool) -> dict:
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=residual),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=residual),
    }
    if sequence_parallel:
        plan.update({
            "input_layernorm": SequenceParallel(),
            "post_attention_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        })
    return plan
