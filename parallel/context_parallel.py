"""Context parallelism: each sequence split over the cp ranks, attention over the whole of it (native engine).

Every layer but attention works token by token, so each cp rank runs the model on its slice of every sequence; only
attention needs the rest. Here it is all-gather attention, as Llama 3 trains long context (Dubey et al. 2024, 3.3.2):
each rank all-gathers the keys and values of the layer over the cp group (the backward reduce-scatters their
gradients back to their owners) and computes its own queries against them. Keys and values are a small part of a
layer's activations under grouped-query attention, and the gathered copies live for one layer at a time.

Load balance (torchtitan's and Megatron's "head-tail" split): the sequence is cut into 2·cp chunks and rank r holds
chunks r and 2·cp−1−r, so under causal masking every rank's queries see the same number of keys in total. A rank's
tokens keep their true positions: RoPE rotates them at those positions (`ChunkedRotary`), and each chunk's queries
see the keys up to their own chunk's end, bottom-right causal (`causal_lower_right` without a window, so a fused
kernel runs; an explicit mask with a sliding window or soft-capped scores, where `Attention._attend` materialises the
scores anyway). On CUDA a later chunk's attention is two cuDNN calls instead, merged by their log-sum-exps
(`cudnn_chunk_attention`): a bottom-right mask has only FlashAttention-2 kernels, which ran a cp2 rank's attention at
seq 32k 1.8× slower on an H200 than cuDNN's Hopper kernels run the same work (23.8 vs 13.2 ms, forward and backward).

The loss: every rank holds the same number of tokens of each sequence, so the mean of the ranks' mean losses is the
mean over the whole sequence, and FSDP's gradient average over dp × cp (`ParallelDims.dp_shard`) is the gradient of
that mean. The loader does not know about cp: a cp rank reads its dp group's rows whole (token ids are cheap) and the
engine keeps its chunks (`shard_sequence`), so the loader's state and a checkpoint's data position do not depend on
cp, and a run resumes under another cp.

Applied from outside, as `parallel.activation_checkpoint` swaps a block's forward: each block's attention becomes a
`ContextParallelAttention` (the class swapped on the instance, as FSDP2's `fully_shard` does), which keeps its
parameters and their names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from parallel.model import Attention, causal_mask

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec
    from parallel.parallel_dims import ParallelDims
    from parallel.parallelize import Parallelized


def chunk_ids(cp: int, cp_rank: int) -> tuple[int, int]:
    """The two of the sequence's 2·cp chunks rank `cp_rank` holds, head and tail."""
    return cp_rank, 2 * cp - 1 - cp_rank


def shard_sequence(x: torch.Tensor, cp: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of `x` along the sequence dimension `dim`: its two chunks, head first."""
    chunks = x.chunk(2 * cp, dim)
    return torch.cat([chunks[i] for i in chunk_ids(cp, cp_rank)], dim)


def chunk_positions(local_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """The true positions of a rank's `local_len` tokens in the sequence of cp·local_len."""
    c = local_len // 2
    return torch.cat([torch.arange(i * c, (i + 1) * c) for i in chunk_ids(cp, cp_rank)])


class ChunkedRotary(nn.Module):
    """RoPE's tables at this rank's true positions: the model's rotary embedding asked for `length` positions (the
    local sequence) answers for the positions of this rank's chunks in the whole sequence."""

    def __init__(self, rotary: nn.Module, cp: int, cp_rank: int):
        super().__init__()
        self.inner, self.cp, self.cp_rank = rotary, cp, cp_rank
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (length, str(device))
        if key not in self._cache:
            cos, sin = self.inner(length * self.cp, device)
            index = chunk_positions(length, self.cp, self.cp_rank).to(device)
            self._cache[key] = cos[index], sin[index]
        return self._cache[key]


# torch 2.13 renamed the differentiable all-gather (the old name warns there); torch 2.11 has only the old name.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def gather_sequence(x: torch.Tensor, cp: int, group: dist.ProcessGroup) -> torch.Tensor:
    """[batch, heads, cp·local, head_dim]: every rank's `x` [batch, heads, local, head_dim] all-gathered and put
    back in sequence order (chunks 0 … 2·cp−1); differentiable, the backward reduce-scatters."""
    gathered = _all_gather_autograd(x.contiguous(), gather_dim=0, group=group).chunk(cp)
    c = x.shape[2] // 2
    heads = [part[:, :, :c] for part in gathered]
    tails = [part[:, :, c:] for part in reversed(gathered)]
    return torch.cat(heads + tails, dim=2)


def _cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None) -> tuple:
    """cuDNN's attention with its log-sum-exp and what its backward needs (`_scaled_dot_product_cudnn_attention`)."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)


class PrefixThenDiagonal(torch.autograd.Function):
    """One chunk's queries over every key up to its chunk's end: the earlier chunks' keys unmasked, its own chunk's
    causal (top-left, the chunk against itself), each a fused cuDNN call, their outputs merged by log-sum-exp as ring
    attention merges its blocks. The backward runs each call's backward against the merged output and log-sum-exp,
    so each part's probabilities are normalised over all the keys (Liu et al. 2023, ring attention)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor, k_diag: torch.Tensor,
                v_diag: torch.Tensor, scale: float | None) -> torch.Tensor:
        prefix = _cudnn_attention(q, k_prefix, v_prefix, False, scale)
        diag = _cudnn_attention(q, k_diag, v_diag, True, scale)
        lse_p, lse_d = prefix[1].float(), diag[1].float()
        lse = torch.logaddexp(lse_p, lse_d)
        weight_p = torch.exp(lse_p - lse).view(*q.shape[:3], 1)
        weight_d = torch.exp(lse_d - lse).view(*q.shape[:3], 1)
        out = (prefix[0].float() * weight_p + diag[0].float() * weight_d).to(q.dtype)
        lse = lse.to(prefix[1].dtype)
        ctx.save_for_backward(q, k_prefix, v_prefix, k_diag, v_diag, out, lse, *prefix[2:4], *prefix[6:8],
                              *diag[2:4], *diag[6:8])
        ctx.lengths = (prefix[4], prefix[5], diag[4], diag[5])
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple:
        (q, k_prefix, v_prefix, k_diag, v_diag, out, lse, cum_q_p, cum_k_p, seed_p, offset_p,
         cum_q_d, cum_k_d, seed_d, offset_d) = ctx.saved_tensors
        max_q_p, max_k_p, max_q_d, max_k_d = ctx.lengths
        grad_out = grad_out.contiguous()
        dq_p, dk_p, dv_p = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad_out, q, k_prefix, v_prefix, out, lse, seed_p, offset_p, None, cum_q_p, cum_k_p, max_q_p, max_k_p,
            0.0, False, scale=ctx.scale)
        dq_d, dk_d, dv_d = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad_out, q, k_diag, v_diag, out, lse, seed_d, offset_d, None, cum_q_d, cum_k_d, max_q_d, max_k_d,
            0.0, True, scale=ctx.scale)
        return dq_p + dq_d, dk_p, dv_p, dk_d, dv_d, None


@torch.compiler.disable
def cudnn_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """A later chunk's queries over the keys `k`, `v` up to their chunk's end, as `PrefixThenDiagonal`'s two cuDNN
    calls. Run eagerly between a compiled block's graphs: compiled into them it gave wrong results on an H200 (a 1B
    cp2 run at seq 32k fell to a loss of 6.26 on random tokens in 12 steps, where one GPU without cp stayed at 9.81).
    tests/parallel/test_context_parallel_cuda.py holds it to the bottom-right SDPA call, in the projections' layout
    and the gathered one (the model hands over both: queries are a view of the projection, keys a fresh tensor)."""
    c, keys = q.shape[2], k.shape[2]
    own = slice(keys - c, keys)
    return PrefixThenDiagonal.apply(q, k[:, :, :keys - c], v[:, :, :keys - c], k[:, :, own], v[:, :, own], scale)


class ContextParallelAttention(Attention):
    """Attention whose queries are this rank's two chunks and whose keys and values are the whole sequence's."""

    cp: int
    cp_rank: int
    cp_group: dist.ProcessGroup
    causal_biases: dict[tuple[int, int], torch.Tensor]  # (queries, keys) → causal_lower_right, made beforehand

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # `mask` is the one forward made for the local sequence as if it were whole: not this rank's, so unused.
        k, v = gather_sequence(k, self.cp, self.cp_group), gather_sequence(v, self.cp, self.cp_group)
        c = q.shape[2] // 2
        out = []
        for chunk, queries in zip(chunk_ids(self.cp, self.cp_rank), (q[:, :, :c], q[:, :, c:]), strict=True):
            keys = (chunk + 1) * c  # a chunk's queries see every key up to their own chunk's end
            if chunk and q.is_cuda and not (self.window or self.softcap):
                out.append(cudnn_chunk_attention(queries, k[:, :, :keys], v[:, :, :keys], self.scale))
                continue
            if self.window or self.softcap:
                chunk_mask = causal_mask(c, keys, self.window, q.device)
            else:
                bias = self.causal_biases.get((c, keys))
                chunk_mask = bias if bias is not None else causal_lower_right(c, keys)
            out.append(super()._attend(queries, k[:, :, :keys], v[:, :, :keys], chunk_mask))
        return torch.cat(out, dim=2)


def apply_context_parallel(state: Parallelized, dims: ParallelDims, spec: JobSpec) -> None:
    """`parallelize_llama`'s context-parallel step: every block's attention of `state` gathers keys and values over
    the cp group and rotates its tokens at their true positions (a model on meta: nothing is allocated)."""
    assert spec.data.seq_len % (2 * dims.cp) == 0, "orchestrator.validate guarantees 2·cp chunks of the sequence"
    rotary = ChunkedRotary(state.model.rotary, dims.cp, dims.cp_rank)
    group = dims.group("cp")
    # The training sequence's causal biases, made here: a tensor subclass cannot be created under selective
    # checkpointing's dispatch mode, which a block's forward may run in.
    c = spec.data.seq_len // (2 * dims.cp)
    biases = {(c, (i + 1) * c): causal_lower_right(c, (i + 1) * c) for i in chunk_ids(dims.cp, dims.cp_rank)}
    for block in state.blocks:
        attention = block.self_attn
        attention.__class__ = ContextParallelAttention
        attention.rotary = rotary
        attention.cp, attention.cp_rank, attention.cp_group = dims.cp, dims.cp_rank, group
        attention.causal_biases = biases


def shard_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]], dims: ParallelDims
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each (inputs, targets) of whole sequences cut down to this rank's chunks (identity without cp)."""
    if dims.cp == 1:
        return pairs
    return [(shard_sequence(x, dims.cp, dims.cp_rank), shard_sequence(y, dims.cp, dims.cp_rank)) for x, y in pairs]


def mean_over_cp(loss: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """A rank's mean loss over its chunks made the mean over whole sequences (equal token counts per rank)."""
    if dims.cp > 1:
        dist.all_reduce(loss, group=dims.group("cp"))
        loss = loss / dims.cp
    return loss
