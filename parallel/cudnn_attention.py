"""One chunk's queries over every key up to its chunk's end, as two cuDNN attention calls merged by log-sum-exp, held
in one operator of our own (`torch.ops.pretrain.prefix_then_diagonal`).

Why two calls: context parallelism (`parallel.context_parallel`) gives a later chunk's queries the keys of the
earlier chunks unmasked and their own chunk's causally, a bottom-right causal mask. That mask has only
FlashAttention-2's kernels; the two halves as cuDNN calls (the earlier chunks unmasked, the chunk against itself
causal) run on cuDNN's Hopper kernels, 1.7× faster for a cp2 rank at seq 32k on an H200 (docs/long-context.md), and
ring attention merges its blocks the same way (Liu et al. 2023).

Why an operator: torch.compile traces into a Python autograd.Function, and so it first compiled these calls into the
block's graph, where a 1B cp2 run learned random tokens impossibly fast; kept out of the graph instead
(`torch.compiler.disable`), they broke it, and a checkpointed region with a break inside runs wholly eagerly, its
recomputation too. A custom operator is opaque to the compiler and whole in its graph, with or without activation
checkpointing: its outputs are laid out exactly as its fake implementation says (the same code, run on fake
tensors), and its backward is a second operator of the same kind.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CUDNN = torch.ops.aten._scaled_dot_product_cudnn_attention
_CUDNN_BACKWARD = torch.ops.aten._scaled_dot_product_cudnn_attention_backward


def _seq_major(x: Tensor) -> Tensor:
    """`x` [batch, heads, seq, dim] stored as [batch, seq, heads, dim]: how cuDNN returns its output, how its backward
    wants the output's gradient, and how the model reshapes attention's output without a copy."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _merged(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, k_diag: Tensor, v_diag: Tensor,
            scale: float | None) -> tuple[Tensor, Tensor]:
    prefix = _CUDNN(q, k_prefix, v_prefix, None, True, 0.0, False, False, scale=scale)
    diag = _CUDNN(q, k_diag, v_diag, None, True, 0.0, True, False, scale=scale)
    lse = torch.logaddexp(prefix[1], diag[1])  # float32 [batch, heads, seq, 1]
    out = prefix[0].float() * torch.exp(prefix[1] - lse) + diag[0].float() * torch.exp(diag[1] - lse)
    return _seq_major(out.to(q.dtype)), lse.contiguous()


def _merged_backward(grad_out: Tensor, q: Tensor, k_prefix: Tensor, v_prefix: Tensor, k_diag: Tensor,
                     v_diag: Tensor, out: Tensor, lse: Tensor, scale: float | None) -> tuple[Tensor, ...]:
    """Each call's backward against the merged output and log-sum-exp, so that each part's probabilities are
    normalised over all the keys."""
    grad_out = _seq_major(grad_out)
    no_dropout = torch.zeros((), dtype=torch.int64, device=q.device)  # philox seed and offset: read with dropout only
    c = q.shape[2]
    dq_p, dk_p, dv_p = _CUDNN_BACKWARD(grad_out, q, k_prefix, v_prefix, out, lse, no_dropout, no_dropout, None,
                                       None, None, c, k_prefix.shape[2], 0.0, False, scale=scale)
    dq_d, dk_d, dv_d = _CUDNN_BACKWARD(grad_out, q, k_diag, v_diag, out, lse, no_dropout, no_dropout, None,
                                       None, None, c, k_diag.shape[2], 0.0, True, scale=scale)
    return dq_p + dq_d, dk_p, dv_p, dk_d, dv_d


@torch.library.custom_op("pretrain::prefix_then_diagonal", mutates_args=(), device_types="cuda")
def prefix_then_diagonal(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, k_diag: Tensor, v_diag: Tensor,
                         scale: float | None) -> tuple[Tensor, Tensor]:
    """Attention of `q` over `k_prefix` unmasked and `k_diag` causally (top-left: the chunk against itself); the
    output and the log-sum-exp of the scores."""
    return _merged(q, k_prefix, v_prefix, k_diag, v_diag, scale)


@torch.library.custom_op("pretrain::prefix_then_diagonal_backward", mutates_args=(), device_types="cuda")
def prefix_then_diagonal_backward(grad_out: Tensor, q: Tensor, k_prefix: Tensor, v_prefix: Tensor, k_diag: Tensor,
                                  v_diag: Tensor, out: Tensor, lse: Tensor, scale: float | None
                                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _merged_backward(grad_out, q, k_prefix, v_prefix, k_diag, v_diag, out, lse, scale)


prefix_then_diagonal.register_fake(_merged)
prefix_then_diagonal_backward.register_fake(_merged_backward)


def _save(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    *tensors, ctx.scale = inputs
    ctx.save_for_backward(*tensors, *output)


def _backward(ctx, grad_out: Tensor, _grad_lse: Tensor | None) -> tuple:
    return *prefix_then_diagonal_backward(grad_out, *ctx.saved_tensors, ctx.scale), None


prefix_then_diagonal.register_autograd(_backward, setup_context=_save)


def cudnn_chunk_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """A later chunk's queries `q` over the keys `k`, `v` up to their chunk's end (bottom-right causal).
    tests/parallel/test_context_parallel_cuda.py holds it to the bottom-right SDPA call, eager and compiled whole,
    with and without checkpointing."""
    own = k.shape[2] - q.shape[2]
    out, _ = prefix_then_diagonal(q, k[:, :, :own], v[:, :, :own], k[:, :, own:], v[:, :, own:], scale)
    return out
