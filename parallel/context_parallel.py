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
scores anyway). On CUDA a later chunk's attention is two cuDNN calls instead, merged by their log-sum-exps in one
operator (`parallel.cudnn_attention`): a bottom-right mask has only FlashAttention-2 kernels, slower on an H200 than
cuDNN's Hopper kernels.

Per-document masks (`model.attention_mask: document`) come with the rows' document ids, which every cp rank has whole.
Head-tail no longer balances them: a chunk's work is the sum of its tokens' positions within their documents. So each
row is cut into more chunks, dealt to the ranks by their work (`parallel.documents.balanced_positions`, computed from
the ids on every rank alike, by the engine to shard the rows and by the model for its masks and positions). A rank
all-gathers the keys and values in rank order, not sequence order, and one mask per window (a FlexAttention block
mask on CUDA, so tiles across documents are skipped; a boolean mask elsewhere) holds its queries against them at
their true positions (`SplitMask`); its RoPE positions are its tokens' own.

The loss: every rank holds the same number of tokens of each sequence, so the mean of the ranks' mean losses is the
mean over the whole sequence, and FSDP's gradient average over dp × cp (`ParallelDims.dp_shard`) is the gradient of
that mean. The loader does not know about cp: a cp rank reads its dp group's rows whole (token ids are cheap) and the
engine keeps its tokens (`shard_pairs`), so the loader's state and a checkpoint's data position do not depend on
cp, and a run resumes under another cp.

Applied from outside, as `parallel.activation_checkpoint` swaps a block's forward: each block's attention becomes a
`ContextParallelAttention` (the class swapped on the instance, as FSDP2's `fully_shard` does), which keeps its
parameters and their names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from parallel.cudnn_attention import cudnn_chunk_attention
from parallel.documents import QuerySplit, SplitMask, chunk_ids, head_tail_positions, split_positions
from parallel.model import Attention, causal_mask

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec
    from parallel.parallel_dims import ParallelDims
    from parallel.parallelize import Parallelized


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
            index = head_tail_positions(length * self.cp, self.cp, device)[self.cp_rank]
            self._cache[key] = cos[index], sin[index]
        return self._cache[key]

    def at(self, positions: torch.Tensor, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-document positions are the tokens' own already (`DocumentContext` keeps this rank's): looked up in
        the whole sequence's table."""
        return self.inner.at(positions, length * self.cp, device)


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


def gather_ranks(x: torch.Tensor, cp: int, group: dist.ProcessGroup) -> torch.Tensor:
    """[batch, heads, cp·local, head_dim]: every rank's `x` all-gathered in rank order; differentiable."""
    return torch.cat(_all_gather_autograd(x.contiguous(), gather_dim=0, group=group).chunk(cp), dim=2)


class ContextParallelAttention(Attention):
    """Attention whose queries are this rank's chunks and whose keys and values are the whole sequence's."""

    cp: int
    cp_rank: int
    cp_group: dist.ProcessGroup
    causal_biases: dict[tuple[int, int], torch.Tensor]  # (queries, keys) → causal_lower_right, made beforehand

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        # `mask` is this rank's per-document mask (`SplitMask`), or one the forward made for the local sequence as
        # if it were whole: not this rank's, so unused.
        if isinstance(mask, SplitMask):
            k, v = gather_ranks(k, self.cp, self.cp_group), gather_ranks(v, self.cp, self.cp_group)
            return super()._attend(q, k, v, mask.mask)
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
    chunk_attention(state.model, state.blocks, dims.cp, dims.cp_rank, dims.group("cp"), spec.data.seq_len)


def chunk_attention(model: nn.Module, blocks: list[nn.Module], cp: int, cp_rank: int, group: dist.ProcessGroup,
                    seq_len: int) -> None:
    """Each block's attention made a `ContextParallelAttention` of rank `cp_rank` of `group` for sequences of
    `seq_len`. Over a group of one it computes plain causal attention by chunks, as cp runs it: how one GPU checks
    the chunked path (benchmarks/cp_chunk_attention.py)."""
    rotary = ChunkedRotary(model.rotary, cp, cp_rank)
    model.query_split = QuerySplit(cp, cp_rank)
    # The training sequence's causal biases, made here: a tensor subclass cannot be created under selective
    # checkpointing's dispatch mode, which a block's forward may run in.
    c = seq_len // (2 * cp)
    biases = {(c, (i + 1) * c): causal_lower_right(c, (i + 1) * c) for i in chunk_ids(cp, cp_rank)}
    for block in blocks:
        attention = block.self_attn
        attention.__class__ = ContextParallelAttention
        attention.rotary = rotary
        attention.cp, attention.cp_rank, attention.cp_group = cp, cp_rank, group
        attention.causal_biases = biases


def shard_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]], documents: list[torch.Tensor | None],
                dims: ParallelDims, attention_mask: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each (inputs, targets) of whole sequences cut down to this rank's tokens (identity without cp), those of the
    split the model computes from the same document ids (`split_positions`)."""
    if dims.cp == 1:
        return pairs
    out = []
    for (x, y), docs in zip(pairs, documents, strict=True):
        every = split_positions(docs, x.shape[1], dims.cp, attention_mask, x.device)
        mine = every[:, dims.cp_rank].expand(x.shape[0], -1)
        out.append((x.gather(1, mine), y.gather(1, mine)))
    return out


def mean_over_cp(loss: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """A rank's mean loss over its chunks made the mean over whole sequences (equal token counts per rank)."""
    if dims.cp > 1:
        dist.all_reduce(loss, group=dims.group("cp"))
        loss = loss / dims.cp
    return loss
