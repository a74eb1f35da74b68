"""Megatron-style tensor parallelism: column/row-parallel linears, a vocab-parallel embedding and cross-entropy,
optional sequence parallelism.

Attention shards by heads (q/k/v column-parallel, o_proj row-parallel) and the MLP by its hidden size (gate/up
column-parallel, down_proj row-parallel): one all-reduce per sub-layer in the forward, one in the backward. The
lm_head is column-parallel over the vocabulary and its logits stay sharded: `vocab_parallel_cross_entropy` reduces
max, sum-exp and the target logit across ranks instead of gathering [batch, seq, vocab].

With sequence parallelism the residual stream between sub-layers is split along the sequence: the all-reduce
becomes a reduce-scatter after each row-parallel linear plus an all-gather before each column-parallel one (the same
bytes), and the block's norms (wherever its placement puts them) run on 1/tp of the tokens, so their weights'
gradients are summed over the group.

Inside attention each rank holds its own heads: q/k/v biases are split with the output features; a per-head
query/key norm (Qwen3) keeps its one weight on every rank and sums its gradient over the group, since each rank
normalises other heads; a norm over all heads together (OLMo 2) splits its weight like the projection's output and
all-reduces the sum of squares, so every rank divides by the norm of the whole vector.

Everything here works on a model still on the meta device; `parallel.materialize` fills in each rank's shard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as funcol

from parallel.model import RMSNorm, Transformer

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec
    from parallel.parallel_dims import ParallelDims
    from parallel.parallelize import Parallelized

SEQ_DIM = 1


# ---------------------------------------------------------------------------------------------- collectives


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """The sum over the group, as a new tensor: a functional collective never writes into `x`, which selective
    checkpointing may hold as a kept matmul output (an in-place sum there was summed again on recomputation), and
    its result is one that checkpointing keeps rather than sends again. Differentiable: its gradient is the sum of
    the gradients."""
    return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", group))


def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=SEQ_DIM)


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if dist.get_backend(group) == "gloo":
        # gloo has no reduce-scatter; the all-reduce moves more bytes but gives the same sums.
        return _all_reduce(x, group).chunk(size, dim=SEQ_DIM)[rank].contiguous()
    inputs = [c.contiguous() for c in x.chunk(size, dim=SEQ_DIM)]
    out = torch.empty_like(inputs[rank])
    dist.reduce_scatter(out, inputs, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient backward: entering a region that each rank computes in part."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce forward, identity backward: summing the partial results of a row-parallel layer."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence forward, reduce-scatter backward (sequence parallel → tensor parallel)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    """Reduce-scatter along the sequence forward, all-gather backward (tensor parallel → sequence parallel)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


# ---------------------------------------------------------------------------------------------- layers


class _Sharded(nn.Module):
    """A layer holding one shard of its weight (and bias, if any) split along `shard_dim`; `parallel.materialize`
    reads these fields."""

    def __init__(self, shape: tuple[int, ...], shard_dim: int, group, rank: int, size: int, sequence_parallel: bool):
        super().__init__()
        if shape[shard_dim] % size:
            raise ValueError(f"dimension {shape[shard_dim]} of a {tuple(shape)} weight does not split over tp={size}")
        local = list(shape)
        local[shard_dim] //= size
        self.weight = nn.Parameter(torch.empty(local))
        self.shard_dim, self.tp_rank, self.tp_size = shard_dim, rank, size
        self.group, self.sequence_parallel = group, sequence_parallel


class ColumnParallelLinear(_Sharded):
    """y_i = x · W_i^T + b_i: the output features (and the bias) split over ranks; the input is whole on every rank."""

    def __init__(self, in_features: int, out_features: int, group, rank: int, size: int, sequence_parallel: bool,
                 bias: bool = False):
        super().__init__((out_features, in_features), 0, group, rank, size, sequence_parallel)
        self.bias = nn.Parameter(torch.empty(out_features // size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _GatherSequence.apply(x, self.group) if self.sequence_parallel else _CopyToRegion.apply(x, self.group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(_Sharded):
    """y = Σ_i x_i · W_i^T: the input features split over ranks, partial outputs summed."""

    def __init__(self, in_features: int, out_features: int, group, rank: int, size: int, sequence_parallel: bool):
        super().__init__((out_features, in_features), 1, group, rank, size, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        return _ReduceScatterSequence.apply(y, self.group) if self.sequence_parallel \
            else _ReduceFromRegion.apply(y, self.group)


class VocabParallelEmbedding(_Sharded):
    """Rows [rank·V/tp, (rank+1)·V/tp) of the table; tokens outside look up zeros, and the ranks' rows are summed."""

    def __init__(self, vocab_size: int, dim: int, group, rank: int, size: int, sequence_parallel: bool):
        super().__init__((vocab_size, dim), 0, group, rank, size, sequence_parallel)
        self.vocab_start = rank * (vocab_size // size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        h = h.masked_fill(outside.unsqueeze(-1), 0.0)
        return _ReduceScatterSequence.apply(h, self.group) if self.sequence_parallel \
            else _ReduceFromRegion.apply(h, self.group)


class SequenceParallelRMSNorm(RMSNorm):
    """RMSNorm over this rank's share of the rows (a slice of the sequence, or its heads); the weight is the same on
    every rank and its gradient is summed over the group."""

    def __init__(self, dim: int, eps: float, group):
        super().__init__(dim, eps)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return _CopyToRegion.apply(self.weight, self.group) * h.to(x.dtype)


class FeatureParallelRMSNorm(_Sharded):
    """RMSNorm over features split across the group, as a column-parallel projection leaves them: each rank holds
    its slice of the weight, and the sum of squares is all-reduced (its gradient too) so all divide by the whole
    vector's norm."""

    def __init__(self, features: int, eps: float, group, rank: int, size: int):
        super().__init__((features,), 0, group, rank, size, sequence_parallel=False)
        self.features, self.eps = features, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        # Every rank's output depends on every rank's share of the squares: the gradient is summed back.
        squares = _all_reduce(h.pow(2).sum(-1, keepdim=True), self.group)
        h = h * torch.rsqrt(squares / self.features + self.eps)
        return self.weight * h.to(x.dtype)


def _shard_log_sum_exp(logits: torch.Tensor) -> torch.Tensor:
    """[rows]: log Σ exp over this shard's logits, in fp32. Compiled it is one pass over them, the fp32 copy existing
    only inside the kernel; eager makes the copy."""
    return torch.logsumexp(logits.float(), dim=-1)


def _shard_grad(logits: torch.Tensor, log_normaliser: torch.Tensor, local: torch.Tensor, outside: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    """d loss / d logits of this shard: (softmax - one-hot target) · scale, recomputed from the logits and the
    rows' log-normaliser rather than kept from the forward. Eager: in place on one fp32 buffer."""
    grad = (logits.float() - log_normaliser.unsqueeze(-1)).exp_()
    grad.scatter_add_(-1, local.unsqueeze(-1), -(~outside).to(grad.dtype).unsqueeze(-1))
    return grad.mul_(scale).to(logits.dtype)


def _fused_shard_grad(logits: torch.Tensor, log_normaliser: torch.Tensor, local: torch.Tensor, outside: torch.Tensor,
                      scale: torch.Tensor) -> torch.Tensor:
    """`_shard_grad` as one element-wise expression, which inductor fuses into a single pass over the logits that
    writes only the gradient (a scatter would make it write an fp32 buffer first: 1.3× the time, 3× the memory)."""
    target = (torch.arange(logits.shape[-1], device=logits.device) == local.unsqueeze(-1)) & ~outside.unsqueeze(-1)
    softmax = (logits.float() - log_normaliser.unsqueeze(-1)).exp()
    return ((softmax - target.float()) * scale).to(logits.dtype)


_compiled_shard_log_sum_exp = torch.compile(_shard_log_sum_exp)
_compiled_shard_grad = torch.compile(_fused_shard_grad)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Keeps the logits as they came (bf16 under mixed precision) and a few numbers a row: 2 bytes a logit where
    keeping the fp32 softmax took 4. Each rank reduces its shard to a log-sum-exp per row; the rows' normaliser
    is then log Σ_ranks exp(shard's), taken about their maximum, so only [rows] vectors cross the group."""

    @staticmethod
    def forward(ctx, logits, labels, group, compiled):
        log_sum_exp, grad = ((_compiled_shard_log_sum_exp, _compiled_shard_grad) if compiled
                             else (_shard_log_sum_exp, _shard_grad))
        local = labels - dist.get_rank(group) * logits.shape[-1]
        outside = (local < 0) | (local >= logits.shape[-1])
        local = local.masked_fill(outside, 0)
        shard = log_sum_exp(logits)
        top = shard.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        target = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1).float().masked_fill(outside, 0.0)
        sums = torch.stack([(shard - top).exp(), target])
        dist.all_reduce(sums, group=group)
        log_normaliser = top + sums[0].log()
        ctx.save_for_backward(logits, log_normaliser, local, outside)
        ctx.shard_grad = grad
        return (log_normaliser - sums[1]).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, log_normaliser, local, outside = ctx.saved_tensors
        return ctx.shard_grad(logits, log_normaliser, local, outside, grad_loss / local.numel()), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group,
                                 compiled: bool = False) -> torch.Tensor:
    """Mean next-token loss from vocab-sharded logits [..., V/tp]; the full-vocab logits never exist anywhere.

    Computed in fp32 whatever the logits' dtype, like `parallel.model.cross_entropy`; `compiled` fuses each
    direction's fp32 arithmetic over the logits into a kernel (torch.compile), as the unsharded loss is under
    `parallel.compile`.
    """
    return _VocabParallelCrossEntropy.apply(logits, labels, group, compiled)


class VocabParallelLoss:
    """`loss_fn(logits, labels)` bound to a tensor-parallel group (picklable, unlike a lambda)."""

    def __init__(self, group, compiled: bool = False):
        self.group, self.compiled = group, compiled

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, self.group, self.compiled)


# ---------------------------------------------------------------------------------------------- applying


def apply_tensor_parallel(model: Transformer, group, rank: int, size: int,
                          sequence_parallel: bool = False) -> Transformer:
    """Swap the model's layers for sharded ones in place (on the meta device) and lower its head counts to this
    rank's share. The forward then returns vocab-sharded logits: train with `VocabParallelLoss(group)`.
    """
    d = model.dims
    sp = sequence_parallel
    if d.moe is not None:
        raise ValueError("Megatron-style tensor parallelism has no MoE layers (orchestrator.validate refuses MoE on "
                         "DeepSpeed): use parallel.backend=native")

    def column(i, o, bias=False):
        return ColumnParallelLinear(i, o, group, rank, size, sp, bias)

    def row(i, o):
        return RowParallelLinear(i, o, group, rank, size, sp)

    def qk_norm(features):
        if d.qk_norm == "head":
            return SequenceParallelRMSNorm(d.head_dim, d.norm_eps, group)
        return FeatureParallelRMSNorm(features, d.norm_eps, group, rank, size)

    with torch.device("meta"):
        for block in model.layers:
            attn, mlp = block.self_attn, block.mlp
            q, kv = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
            attn.q_proj = column(d.dim, q, d.qkv_bias)
            attn.k_proj, attn.v_proj = column(d.dim, kv, d.qkv_bias), column(d.dim, kv, d.qkv_bias)
            attn.o_proj = row(q, d.dim)
            attn.n_heads, attn.n_kv_heads = d.n_heads // size, d.n_kv_heads // size
            if d.qk_norm != "none":
                attn.q_norm, attn.k_norm = qk_norm(q), qk_norm(kv)
            mlp.gate_proj, mlp.up_proj = column(d.dim, d.ffn_dim), column(d.dim, d.ffn_dim)
            mlp.down_proj = row(d.ffn_dim, d.dim)
            if sp:
                for name in block.norm_names:
                    if name is not None:
                        setattr(block, name, SequenceParallelRMSNorm(d.dim, d.norm_eps, group))
        model.embed_tokens = VocabParallelEmbedding(d.vocab_size, d.dim, group, rank, size, sp)
        model.lm_head = column(d.dim, d.vocab_size)
        if sp:
            model.norm = SequenceParallelRMSNorm(d.dim, d.norm_eps, group)
    if d.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def apply_megatron_tp(state: Parallelized, dims: ParallelDims, spec: JobSpec) -> None:
    """`parallelize_llama`'s tensor-parallel step for the DeepSpeed engine: the layers above over the tp group,
    trained with the vocabulary-parallel loss."""
    group = dims.group("tp")
    apply_tensor_parallel(state.model, group, dims.tp_rank, dims.tp, spec.parallel.sequence_parallel)
    state.loss_fn = VocabParallelLoss(group, spec.parallel.compile)
