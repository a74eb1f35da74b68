"""Tensor parallelism (+ sequence parallelism) with DTensor: `parallelize_module` plans on the tp axis of a DeviceMesh.

The split is Megatron's, as in `parallel.megatron_tp` (the DeepSpeed backend's hand-written layers): q/k/v and
gate/up column-wise (heads and hidden units split), o_proj and down_proj row-wise, the embedding row-wise over the
vocabulary, the lm_head column-wise with its logits left vocab-sharded for `VocabParallelLoss`. Attention reads its
head counts from the local projections' widths, so nothing in the model changes.

With sequence parallelism the residual stream between sub-layers is a sequence shard (`Shard(1)`): the block's
norms, wherever its placement puts them (`BLOCK_NORMS`), run on it (`SequenceParallel`), each sub-layer's input is
all-gathered on entry and its output reduce-scattered on exit. Without it the residual stream is replicated and
block norms are plain modules computed identically on every rank.

An MoE layer's MLP (router, experts, shared experts) is replicated over tp: every rank routes the same tokens
and computes the same experts on plain tensors (expert parallelism splits experts over dp instead); under sequence
parallelism its input is all-gathered on entry and its output cut back to the rank's sequence shard on exit.

Inside attention each rank holds its own heads. q/k/v biases are sharded with the output features by
`ColwiseParallel`. A per-head query/key norm (Qwen3) sees [batch, seq, heads, head_dim] split over heads: it runs as
`SequenceParallel` over dimension 2, its weight replicated and its gradient summed over the group. A norm over all
heads together (OLMo 2) runs on the projection's feature shard as a DTensor (`FeatureShardedNorm`): its weight split
like those features, the mean of squares over the split dimension all-reduced by DTensor.

Works on a model still on the meta device; the engine materialises each rank's shards afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from parallel.lora import lora_tp_plan
from parallel.model import Transformer
from parallel.moe import MoE


def apply_dtensor_tp(model: Transformer, blocks: Iterable[nn.Module], mesh: DeviceMesh,
                     sequence_parallel: bool) -> None:
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
        plan = _block_plan(block, model.dims.qk_norm, residual, sequence_parallel)
        parallelize_module(block, mesh, lora_tp_plan(block, plan))


class FeatureShardedNorm(ParallelStyle):
    """A norm over the last dimension of a column-wise projection's output, whose features are split over the
    ranks: the weight is sharded the same way, the input is this rank's slice, and the norm runs as a DTensor, so its
    reduction over the split dimension becomes an all-reduce. The output is local again."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, _shard_parameters, _features_as_shard, _to_local)


def _shard_parameters(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for p_name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(p_name, nn.Parameter(distribute_tensor(param, mesh, [Shard(0)],
                                                                         src_data_rank=None)))


def _features_as_shard(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    x = inputs[0]
    return (DTensor.from_local(x, mesh, [Shard(x.ndim - 1)], run_check=False), *inputs[1:])


def _to_local(module: nn.Module, output: DTensor, mesh: DeviceMesh):
    return output.to_local()


def _block_plan(block: nn.Module, qk_norm: str, residual, sequence_parallel: bool) -> dict:
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=residual),
    }
    moe = isinstance(block.mlp, MoE)
    if not moe:
        plan.update({
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=residual),
        })
    if qk_norm != "none":
        norm = SequenceParallel(sequence_dim=2, use_local_output=True) if qk_norm == "head" else FeatureShardedNorm()
        plan.update({"self_attn.q_norm": norm, "self_attn.k_norm": norm})
    if sequence_parallel:
        # Local outputs: a norm's output is added to the (local) residual stream, or enters a sub-layer that takes
        # it as the sequence shard it is.
        plan.update({name: SequenceParallel(use_local_output=True) for name in block.norm_names if name is not None})
        plan.update({
            "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
            "mlp": PrepareModuleInputOutput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                            use_local_input=True, output_layouts=(Replicate(),),
                                            desired_output_layouts=(Shard(1),)) if moe else
            PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        })
    return plan
