"""Expert parallelism: each MoE layer's experts split over the ep ranks, tokens sent to their experts' rank and back
(native engine).

ep does not add ranks (torchtitan's and Megatron's layout): the ep ranks are taken from the data-parallel ones
(`ParallelDims`: ep consecutive ranks of dp × cp, so an ep group lies inside a node first). Each rank keeps E/ep
experts of every MoE layer: the 3-D expert parameters [E, ...] become DTensors sharded on dim 0 over the ep mesh,
so the full initial values are sliced (every layout starts bit-identical), DCP writes them under their global shape
and a checkpoint of ep2 loads under ep1, and `full_tensor()` gathers them whole.

The MoE block routes, sorts its tokens by expert and calls `mlp.experts(x_sorted, counts)`; that call is the seam
(`parallel.moe`). Here the experts' class is swapped on the instance (as `parallel.context_parallel` swaps
attention's) for one whose forward dispatches: the per-expert counts are exchanged first (`all_to_all_single` over
the ep group, one host sync for the split sizes), the tokens go to the ranks owning their experts, are regrouped by
local expert, run through the local experts, put back in arrival order and returned by the reverse all-to-all. Both
token all-to-alls are autograd-aware (`_functional_collectives.all_to_all_single_autograd`: the backward is the
reverse all-to-all), and work over gloo on CPU and NCCL on GPU.

Gradients: a rank's expert gradient sums the contributions of the tokens of all ep ranks, so it is scaled by 1/ep
in the backward; FSDP shards expert parameters over the ranks holding the same experts (dp·cp/ep,
`ParallelDims.expert_fsdp_mesh`) and averages over them, dense ones over all dp·cp: each token's loss counts once,
as in one process. (FSDP's own divide factor would do the same, but gloo has no PREMUL_SUM and a one-rank FSDP
mesh skips the division.)

Tensor parallelism: the experts are replicated over tp (each tp rank routes the same tokens and computes the same
experts; the dense parts use their tp plans), the simplest correct split; its cost is tp× the expert compute.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.tensor import Shard, distribute_tensor

from parallel.moe import MoE

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec
    from parallel.parallel_dims import ParallelDims
    from parallel.parallelize import Parallelized


def exchange_counts(counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[ep, E/ep]: row j holds how many tokens rank j sends to each of this rank's experts, from every rank's
    `counts` [E] (its tokens per expert, experts split over the ep ranks in order)."""
    ep = dist.get_world_size(group)
    # The functional collective, as the tokens' are: selective checkpointing keeps its output rather than exchanging
    # the counts again in the recomputation.
    return funcol.all_to_all_single(counts.contiguous(), None, None, group).wait().view(ep, -1)


def segment_order(lengths: torch.Tensor) -> torch.Tensor:
    """The rows of a tensor cut into consecutive segments of `lengths` [a, b] (in a-major order), taken in b-major
    order: the index that regroups tokens received from each rank (a) for each local expert (b) by expert."""
    flat = lengths.flatten()
    starts = (torch.cumsum(flat, 0) - flat).view_as(lengths).t().flatten()
    by_b = lengths.t().flatten()
    first = torch.repeat_interleave(torch.cumsum(by_b, 0) - by_b, by_b)
    return torch.repeat_interleave(starts, by_b) + torch.arange(int(by_b.sum()), device=lengths.device) - first


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient multiplied by `scale` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def dispatch_and_combine(experts: nn.Module, x_sorted: torch.Tensor, counts: torch.Tensor,
                         group: dist.ProcessGroup) -> torch.Tensor:
    """`experts` (this rank's) applied to tokens `x_sorted` grouped by global expert, `counts` [E] of them per
    expert, wherever those experts live in the ep `group`: all-to-all out, local experts, all-to-all back."""
    ep = dist.get_world_size(group)
    received = exchange_counts(counts, group)
    # One host sync: the collective's split sizes are host integers.
    sizes = torch.stack([counts.view(ep, -1).sum(1), received.sum(1)]).tolist()
    send, recv = sizes
    arrived = funcol.all_to_all_single_autograd(x_sorted, recv, send, group)
    order = segment_order(received)
    # The local experts' parameter gradients sum the tokens of all ep ranks, where a replicated parameter's would
    # hold this rank's only: scaled by 1/ep (exact for powers of two), so FSDP's average over the ranks holding the
    # same experts makes the average over dp × cp. The tokens' own gradients pass unscaled.
    y = experts(_ScaleGrad.apply(arrived[order], ep), received.sum(0))
    y = _ScaleGrad.apply(y, 1 / ep)
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)
    return funcol.all_to_all_single_autograd(y[back], send, recv, group)


class ExpertParallel:
    """Mixed in before a GroupedExperts class: its forward runs on this rank's experts with tokens from all ep
    ranks (`dispatch_and_combine`)."""

    ep_group: dist.ProcessGroup

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return dispatch_and_combine(super().forward, x_sorted, counts, self.ep_group)


@functools.cache
def expert_parallel_class(cls: type) -> type:
    return type(f"ExpertParallel{cls.__name__}", (ExpertParallel, cls), {})


def moe_experts(blocks: list[nn.Module]) -> list[nn.Module]:
    """The `mlp.experts` module of each MoE block of `blocks`."""
    return [block.mlp.experts for block in blocks if isinstance(block.mlp, MoE)]


def shard_experts(experts: nn.Module, mesh, group: dist.ProcessGroup) -> None:
    """`experts` (on meta) keeps its share of the experts: each 3-D parameter a DTensor Shard(0) over `mesh`, and
    its forward dispatches over `group`."""
    for name, param in list(experts.named_parameters(recurse=False)):
        sharded = distribute_tensor(param.data, mesh, [Shard(0)], src_data_rank=None)
        experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
    dispatch_over(experts, group)


def dispatch_over(experts: nn.Module, group: dist.ProcessGroup) -> None:
    """`experts`' forward runs on the experts it holds with the tokens of every rank of `group`."""
    experts.__class__ = expert_parallel_class(type(experts))
    experts.ep_group = group


def apply_expert_parallel(state: Parallelized, dims: ParallelDims, spec: JobSpec) -> None:
    """`parallelize_llama`'s expert-parallel step: every MoE block of `state` keeps E/ep experts and sends its
    tokens to the ranks of theirs."""
    assert spec.model.moe.num_experts % dims.ep == 0, "orchestrator.validate guarantees the experts split over ep"
    mesh = dims.ep_mesh()
    for experts in moe_experts(state.blocks):
        shard_experts(experts, mesh, mesh.get_group())
