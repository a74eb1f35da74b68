"""Activation checkpointing: trade recomputation in the backward pass for activation memory, per transformer block.

Modes (`parallel.activation_checkpointing`):
  none      every activation autograd needs is kept from forward to backward;
  full      only each block's input is kept; the whole block runs again in backward;
  selective attention's outputs, every other matmul's and the collectives' are kept; the other matmuls and the
            cheap element-wise ops (RMSNorms, RoPE, SiLU·up, residual adds) run again: most of no-AC's speed for
            part of its memory;
  every_n   `full` on every n-th block (`parallel.activation_checkpointing_every`) and nothing on the others:
            memory and recomputation in steps of 1/n between none and full (n=1 is full). torchtitan's selective
            layer checkpointing (`selective_ac_option: <n>`), with its convention: counting blocks from 1, the
            n-th, 2n-th, … are checkpointed, i.e. layers n-1, 2n-1, … by 0-based index, the same layers that
            `model.full_attention_every` picks. The index is the model's, so a pipeline stage checkpoints the
            blocks it would in one process.

Every checkpointing mode goes through one function, `_checkpointed_forward`, defined here. That matters under
`torch.compile`: a block's `forward` swapped for a partial of `torch.utils.checkpoint.checkpoint` itself starts in
a file dynamo does not trace, so the compiled block silently ran eagerly (and recomputed eagerly). Starting the
compiled frame in this module lets dynamo capture the checkpoint as one region, whose forward and recomputation
inductor compiles and fuses like any other graph (torchtitan's order: checkpoint, then compile, then FSDP).

The block's `forward` is swapped on the instance rather than wrapped in another module, so parameter names (and
with them checkpoints and the Hugging Face mapping) are the same in every mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import parallel.cudnn_attention  # noqa: F401  registers torch.ops.pretrain.prefix_then_diagonal, kept like a kernel

MODES = ("none", "full", "selective", "every_n")

# What selective checkpointing keeps (torchtitan's per-op policy, and more): the outputs of every attention kernel and
# every other matmul, and of the collectives inside a block, so that recomputation sends nothing: under tensor
# parallelism the reductions after the row-parallel projections, and with sequence parallelism also the gathered inputs
# of the column-parallel ones (torchtitan gathers those again; keeping them ran Llama-3-8B's tp2 3.5% faster for 4 GiB a
# rank, docs/backends.md); under context parallelism the gathered keys and values; under expert parallelism the
# per-expert counts and the tokens sent to their experts and back. Of a block's seven projections q, v, gate (and
# down, whose output backward never reads) are kept and k, o and up recomputed: about a third of the forward matmul
# FLOPs again, for about half the memory of keeping them all. A projection with a bias (Qwen2's q/k/v) is an
# addmm rather than an mm, and a float8 one a _scaled_mm; both count the same. Soft-capped attention has no fused
# kernel: it is two batched matmuls (scores, then probabilities · values), and the second, attention's output, is kept
# like a kernel's. Every element-wise op (RMSNorms, RoPE, SiLU·up, residual adds, the soft-cap and softmax of eager
# attention) is recomputed.
_ATTENTION = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
_COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_to_all_single")
SAVED_OPS = frozenset(
    [getattr(torch.ops.aten, name).default for name in _ATTENTION if hasattr(torch.ops.aten, name)]
    + [getattr(torch.ops._c10d_functional, name).default for name in _COLLECTIVES]
    + [torch.ops.pretrain.prefix_then_diagonal.default])
# op → which of its calls in a block are kept: every other projection from the first, every second batched matmul.
# An MoE layer's grouped GEMMs (`parallel.moe`, all experts' gate, up and down at once) count as projections.
COUNTED = {torch.ops.aten.mm.default: ("linear", 1), torch.ops.aten.addmm.default: ("linear", 1),
           torch.ops.aten._scaled_mm.default: ("linear", 1), torch.ops.aten.bmm.default: ("attention", 0),
           **({torch.ops.aten._grouped_mm.default: ("linear", 1)} if hasattr(torch.ops.aten, "_grouped_mm") else {})}


def _selective_contexts() -> tuple[Any, Any]:
    """Fresh contexts for one checkpointed call: matmuls are counted separately in forward and in recomputation,
    so the same ones are kept in both."""
    counts: dict[tuple[str, bool], int] = {}

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        # MUST_SAVE, not PREFER_SAVE: under torch.compile the partitioner may otherwise recompute what is kept.
        if func in COUNTED:
            kind, kept = COUNTED[func]
            key = (kind, ctx.is_recompute)
            counts[key] = counts.get(key, 0) + 1
            return CheckpointPolicy.MUST_SAVE if counts[key] % 2 == kept else CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if func in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _recompute_collectives(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Full checkpointing's policy: everything runs again, the collectives too. Under torch.compile the partitioner
    otherwise keeps every collective's output (torch's `force_save_collectives`, so that ranks never disagree on
    what they recompute) unless the region says to recompute it: context parallelism's gathered keys and values, a
    sequence's worth per block, would stay from forward to backward, as they did (the 1B model at seq 128k under
    cp2: 15 of a rank's 37 GiB). Every rank applies the same policy, so all of them gather again."""
    if getattr(func, "namespace", None) == "_c10d_functional":
        return CheckpointPolicy.MUST_RECOMPUTE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _full_contexts() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_recompute_collectives)


def _checkpointed_forward(block: nn.Module, context_fn: Callable[[], tuple[Any, Any]],
                          *args: Any, **kwargs: Any) -> Any:
    """`type(block).forward` under non-reentrant checkpointing.

    preserve_rng_state=False: the block draws no random numbers (no dropout), so stashing and restoring the RNG
    state of every device around each recomputation buys nothing.
    """
    return checkpoint(type(block).forward, block, *args, use_reentrant=False, preserve_rng_state=False,
                      context_fn=context_fn, **kwargs)


def is_checkpointed(layer: int, every: int) -> bool:
    """Whether `every_n` checkpoints the block of 0-based index `layer`: the every-th, 2·every-th, … block."""
    return (layer + 1) % every == 0


def apply_activation_checkpointing(blocks: nn.ModuleList | list[nn.Module], mode: str, every: int = 2) -> None:
    """Checkpoint the blocks per `mode` (one of `MODES`; `every` is every_n's n); `none` leaves them as they are.

    `blocks` are all of the model's blocks in layer order (before any pipeline split), so the i-th is layer i.
    Apply before compile.
    """
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}; allowed: {', '.join(MODES)}")
    if every < 1:
        raise ValueError(f"activation checkpointing every {every} blocks; allowed: 1 or more")
    if mode == "none":
        return
    # The one side effect inside a block is RoPE's table cache filling on first use. Dynamo refuses to capture a
    # checkpointed region that mutates outer state (the whole block would fall back to eager) unless told that the
    # mutation need not be replayed when backward recomputes the region: a cache that is already full needs none.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    context_fn = _selective_contexts if mode == "selective" else _full_contexts
    for layer, block in enumerate(blocks):
        if mode != "every_n" or is_checkpointed(layer, every):
            block.forward = functools.partial(_checkpointed_forward, block, context_fn)
