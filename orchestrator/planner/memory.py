"""Memory per GPU for one layout: weights, gradients, optimizer states, activations and framework buffers.

The estimate is built to be compared with `torch.cuda.max_memory_allocated` (tensors only: `allocated`), and then
padded with what the allocator and the CUDA context take beside the tensors (`reserve`) to decide whether a layout
fits. Every term is per rank of the fullest pipeline stage, which is the one a run runs out of memory on.

Mixed precision keeps bf16 weights and gradients with fp32 master weights and two fp32 Adam moments (16 bytes per
parameter, as ZeRO's paper counts them); fp32 training keeps 16 bytes too (weights, gradients, two moments), without a
master copy. ZeRO stage 1 shards the optimizer states over data-parallel ranks, 2 also the gradients, 3 also the
weights (Rajbhandari et al., 2020).

Activations follow Korthikanti et al. (2022, "Reducing activation recomputation"), recounted for this model's block
(RMSNorm, grouped-query attention through a flash kernel, SwiGLU): tensors inside tensor-parallel regions shrink with
tp, the norms' and residual tensors only with sequence parallelism. The pipeline's first stage holds `pp` micro-batches
in flight under 1F1B, the last one holds the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.planner.counting import stage_params
from orchestrator.spec import JobSpec, ModelConfig, ParallelConfig

GiB = 1024**3

# DeepSpeed's defaults for the buffers it allocates beside the model (elements): ZeRO-2/3 gradient reduction
# bucket and ZeRO-3 parameter prefetch bucket.
REDUCE_BUCKET = 5e8
PREFETCH_BUCKET = 5e7

# Activation elements saved per token and layer, as multiples of the hidden size (d), of the key/value width and
# of the SwiGLU width (f); calibrated against the tensors autograd saves for the real block (tests/orchestrator).
NORM_SAVED = 4.0  # two RMSNorms: input and normalised output each (replicated unless sequence parallel)
ATTN_SAVED_D = 3.0  # q, attention output, output-projection input (tensor-parallel)
ATTN_SAVED_KV = 2.0  # k, v after RoPE (tensor-parallel)
FFN_SAVED_F = 4.0  # w1 and w3 outputs, SiLU output, product into w2 (tensor-parallel)
LOGIT_BYTES = 8  # beyond the logits themselves: fp32 log-softmax kept for backward and the fp32 gradient

# Beside the tensors: CUDA context and NCCL buffers, and the caching allocator's fragmentation.
RESERVE_BYTES = int(1.5 * GiB)
RESERVE_FRACTION = 0.08


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one GPU of the fullest pipeline stage."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int  # framework buffers: reduction buckets, gathered ZeRO-3 weights, fp32 gradients at the step
    stage: int

    @property
    def allocated(self) -> int:
        """Peak of live tensors: what `torch.cuda.max_memory_allocated` measures."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    @property
    def reserve(self) -> int:
        return RESERVE_BYTES + int(RESERVE_FRACTION * self.allocated)

    @property
    def total(self) -> int:
        return self.allocated + self.reserve

    def rows(self) -> list[tuple[str, int]]:
        return [("weights", self.weights), ("gradients", self.gradients), ("optimizer states", self.optimizer),
                ("activations", self.activations), ("framework buffers", self.overhead),
                ("allocated (peak tensors)", self.allocated), ("context + fragmentation", self.reserve),
                ("total", self.total)]


def estimate_memory(spec: JobSpec, parallel: ParallelConfig | None = None) -> MemoryBreakdown:
    """Peak bytes per GPU for `spec` under `parallel` (default: the spec's own, resolved layout)."""
    p = parallel or spec.parallel
    per_stage = stage_params(spec.model, p.pp, p.tp)
    breakdowns = [_stage_memory(spec.model, spec.data.seq_len, p, s, per_stage[s]) for s in range(p.pp)]
    return max(breakdowns, key=lambda b: b.allocated)


def _stage_memory(model: ModelConfig, seq_len: int, p: ParallelConfig, stage: int, params: int) -> MemoryBreakdown:
    mixed = p.precision == "bf16"
    width = 2 if mixed else 4
    weights_sharded = p.zero_stage >= 3
    grads_sharded = p.zero_stage >= 2
    states_sharded = p.zero_stage >= 1
    dp = max(p.dp, 1)

    weights = width * params // (dp if weights_sharded else 1)
    gradients = width * params // (dp if grads_sharded else 1)
    optimizer_per_param = 12 if mixed else 8  # fp32 master + two moments, or two moments
    optimizer = 0 if p.offload_optimizer else optimizer_per_param * params // (dp if states_sharded else 1)

    activations = _activation_bytes(model, seq_len, p, stage, width)
    # The optimizer step upcasts this rank's gradient shard to fp32 once the activations are gone: the peak is
    # whichever of the two is larger, counted here with the buffers.
    step_grads = 4 * params // (dp if states_sharded else 1) if mixed and not p.offload_optimizer else 0
    overhead = _buffer_bytes(model, p, width) + max(0, step_grads - activations)
    return MemoryBreakdown(weights=weights, gradients=gradients, optimizer=optimizer,
                           activations=activations, overhead=overhead, stage=stage)


def activation_elements_per_token(model: ModelConfig, tp: int = 1, sequence_parallel: bool = False) -> float:
    """Elements autograd keeps per token for one transformer block (no recomputation)."""
    d = model.dim
    kv = model.n_kv_heads * (d // model.n_heads)
    replicated = NORM_SAVED * d / (tp if sequence_parallel else 1)
    split = (ATTN_SAVED_D * d + ATTN_SAVED_KV * kv + FFN_SAVED_F * model.ffn_dim) / tp
    return replicated + split


def _activation_bytes(model: ModelConfig, seq_len: int, p: ParallelConfig, stage: int, width: int) -> int:
    tokens = p.micro_batch_size * seq_len
    layers = model.n_layers // p.pp
    in_flight = min(p.pp - stage, p.grad_accum)
    full_layer = tokens * activation_elements_per_token(model, p.tp, p.sequence_parallel) * width
    if p.activation_checkpointing:
        block_input = tokens * model.dim / (p.tp if p.sequence_parallel else 1) * width
        kept = layers * in_flight * block_input + full_layer  # one block recomputed at a time
    else:
        kept = layers * in_flight * full_layer
    if stage == p.pp - 1:
        kept += tokens * model.vocab_size / p.tp * (width + LOGIT_BYTES)
    return int(kept)


def _buffer_bytes(model: ModelConfig, p: ParallelConfig, width: int) -> int:
    """Buffers DeepSpeed keeps beside the model state, sized by its bucket settings.

    With ZeRO ≥ 1 every backward pass stages gradients in a contiguous bucket of REDUCE_BUCKET elements, allocated
    whole however small the model; ZeRO-3 also gathers each module's weights before it runs: the largest module
    (often the vocab-parallel embedding) plus what is prefetched behind it.
    """
    if p.zero_stage == 0:
        return 0
    bucket = REDUCE_BUCKET * width
    if p.zero_stage < 3:
        return int(bucket)
    layer = (2 * model.dim * model.dim + 3 * model.dim * model.ffn_dim) / p.tp
    largest = max(layer, model.vocab_size * model.dim / p.tp)
    return int(bucket + (largest + min(PREFETCH_BUCKET, layer)) * width)
