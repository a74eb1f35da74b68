"""Memory per GPU for one layout: weights, gradients, optimizer states, activations and framework buffers.

The estimate is built to be compared with `torch.cuda.max_memory_allocated` (tensors only: `allocated`), and then
padded with what the allocator and the CUDA context take beside the tensors (`reserve`) to decide whether a layout
fits. Every term is per rank of the fullest pipeline stage, the one a run runs out of memory on.

Each engine has its own model behind `memory_model(backend)`, with the same breakdown: this module holds the one of
DeepSpeed and the activations both share; `orchestrator.planner.memory_native` models FSDP2.

Model states follow what DeepSpeed allocates under the config `parallel.deepspeed_config` builds (read from it, so
bucket sizes and dtypes stay in step with the engine). Mixed precision keeps bf16 weights, fp32 master weights, two
fp32 Adam moments and fp32 gradient accumulation:

    ZeRO-1 (DeepSpeed's BF16_Optimizer): bf16 weights, a full fp32 gradient buffer, sharded master+Adam; bf16
            gradients from the end of backward through the step (after the activations are freed), unless the
            config adds each one to the fp32 buffer as it is made (`bf16.immediate_grad_update`)
    ZeRO-2: bf16 weights, fp32 gradient shard, sharded master+Adam, bf16 gradient buckets
    ZeRO-3: every state sharded, plus the weights of the modules gathered to run (largest one and the prefetch)

fp32 training has the same structure with 4-byte weights and gradients (ZeRO still keeps its own fp32 copy of the
rank's shard). ZeRO-0 is not planned: it moves the same bytes as ZeRO-1 and keeps more.

Activations are counted from the tensors autograd saves in `parallel.model`'s block (each RMSNorm, two or four by
norm placement and the query/key norms, saves an fp32 copy of its input; the flash attention kernel q, k, v and its
output, sized by the resolved head_dim; the gated MLP four ffn-wide tensors), after Korthikanti et al. (2022): tensors
inside tensor-parallel regions shrink with tp, the block norms' only with sequence parallelism. Soft-capped attention
runs without a fused kernel: its [heads, seq, seq] scores are materialised, and the tanh output, the fp32
probabilities and their cast are kept, with k and v repeated to every query head; a sliding window shorter than the
sequence hands SDPA a [seq, seq] mask, which it keeps. Measured on an H200 as tests/orchestrator/test_plan_memory.py
measures on the CPU (bf16, seq 2048, dim 1024, 8 heads), the model is 1-6% above what autograd keeps per block for
each switch (1% for soft-capped attention, whose scores are three quarters of it). Under 1F1B the first pipeline
stage holds `pp` micro-batches in flight; the last one holds the logits.

A mixture of experts' MLP (`model.moe`) keeps the same four tensors per expert a token is routed to (top_k of
expert_ffn_dim, and the shared experts'), whole on every tensor-parallel rank, plus each routed copy's input and its
expert's output upcast to fp32 and weighted for the combine, the router's fp32 scores and (mixed precision) the fp32
copy of the router's input; counted as an average over the layers, dense and MoE. Measured on the CPU as for dense
blocks (the experts' per-expert loop), within 10% of what autograd keeps. Compiled, the combine keeps the experts'
outputs in bf16 instead of two fp32 copies (`mlp_saved_bytes(compiled=True)`, as `memory_native` counts compiled
blocks): OLMoE-1B-7B's shape (examples/moe-1b-7b.yaml) with ep2 over 2 H200s, micro-batch 2 × seq 4096, peaked at
73.3 GiB, which the eager count over-estimates by 18% and the compiled one by 1.4%.

Per `parallel.activation_checkpointing` (see `parallel.activation_checkpoint`): `none` keeps all of that for every
block; `full` keeps each block's input and, while one block is recomputed in backward, that block's activations;
`selective` keeps attention's outputs, every other matmul's (q, v, gate) and, under tensor parallelism, the
reductions' outputs, plus the block input and one block's activations while it is recomputed; `every_n` keeps what
`full` does on the blocks it checkpoints (`checkpointed_layers`) and what `none` does on the others, plus one
block's activations while a checkpointed one is recomputed. every_n is not measured on GPUs yet.

Measured against compiled blocks (Llama-3-8B shape, seq 4096, micro-batch 1, FSDP dp2 on H200s; docs/backends.md):
the activations each mode adds over `full` are 14.6 GiB for `none` and 4.9 GiB for `selective`; this model says
23.7 and 5.8 GiB. It over-counts `none` by 1.6× (inductor fuses the norms and RoPE and saves less than eager
autograd does) and `selective` by 1.2×: on the safe side, as a planner should be. (With DeepSpeed's model states the
whole peak came 15-23% above that native run's, 76.4 / 82.2 / 100.1 GiB against 66.8 / 71.7 / 81.4 for full /
selective / none; the native model, which counts compiled blocks' activations, is within 3% of each.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.planner.counting import BLOCK_NORMS, attention_widths, count_params, moe_layers, stage_params
from orchestrator.spec import JobSpec, ModelConfig, ParallelConfig
from orchestrator.validate import pick_backend

GiB = 1024**3

# Activation elements saved per token and block (multiples of the query width n_heads·head_dim, the q/k/v widths
# and ffn_dim) beside the norms; each norm (block or query/key) saves an fp32 copy of its input and its normalised
# output in the activation dtype, and the projections into attention and the MLP each keep their dim-wide input.
BLOCK_INPUTS_D = 2.0
ATTN_SAVED_D = 2.0  # attention output and the output projection's input (tensor-parallel)
ATTN_SAVED_QKV = 1.0  # q, k, v after RoPE (tensor-parallel)
FFN_SAVED_F = 4.0  # gate and up outputs, the activation's output, product into down_proj (tensor-parallel)
# A MoE layer keeps per token, beside its experts' own tensors: each routed copy's input (activation dtype), its
# expert's output upcast to fp32 and weighted (two fp32 copies) for the combine, the router's fp32 scores and, in
# mixed precision, the fp32 copy of its input. Under expert parallelism one layer's copies sent and received (both
# ways) are in flight.
MOE_FP32_BYTES = 4
EP_BUFFERS_D = 4.0
# Soft-capped attention keeps per score: the tanh output (activation dtype), the fp32 probabilities and, in mixed
# precision, their cast back. SDPA given a sliding-window mask keeps it: a byte per key for each sequence.
SCORE_FP32_BYTES = 4
MASK_BYTES = 1
# Selective checkpointing keeps, per token and block: q, v, gate (ffn_dim), attention's output (query width)
# and its fp32 log-sum-exp (one per head), all split by tp; under tensor parallelism also the outputs of the two
# reductions after the row-parallel projections (dim each, split by tp only with sequence parallelism). On the
# native engine it keeps every collective's output in a block: with sequence parallelism the two gathered norm
# outputs (dim each, the residual's width, the whole sequence on every tp rank: Llama-3-8B tp2 at seq 4096, 4.0
# GiB measured and counted), under cp the gathered keys and values.
SELECTIVE_SPLIT_D = 2.0
SELECTIVE_REDUCTIONS_D = 2.0
# Per logit at the start of backward, either precision: the fp32 log-softmax kept for backward, the gradient coming
# into it and the one going out (the logits themselves are freed once upcast).
LOGIT_BYTES = 12
# Block inputs on the GPU under `parallel.activation_offload`: the one a backward reads and the ones brought back
# ahead of it (`parallel.activation_offload.PREFETCH`); the others are in host memory.
OFFLOADED_RESIDENT_INPUTS = 3

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
    overhead: int  # framework buffers (reduction buckets, gathered ZeRO-3 weights), gradients beyond activations
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


@dataclass(frozen=True)
class EngineBuffers:
    """The engine settings that size memory beside the model: bucket sizes (elements) and overlap."""

    reduce_bucket: float = 2e8
    prefetch_bucket: float = 5e7
    overlap_comm: bool = True
    frees_bf16_gradients: bool = False  # bf16 gradients go into the fp32 accumulator during backward


MemoryModel = Callable[[JobSpec, ParallelConfig], MemoryBreakdown]


def estimate_memory(spec: JobSpec, parallel: ParallelConfig | None = None) -> MemoryBreakdown:
    """Peak bytes per GPU for `spec` under `parallel` (default: the spec's own, resolved layout), by the memory
    model of the engine that runs it."""
    p = parallel or spec.parallel
    backend = p.backend if p.backend != "auto" else pick_backend(dataclasses.replace(spec, parallel=p))
    return memory_model(backend)(spec, p)


def memory_model(backend: str) -> MemoryModel:
    """The memory model of engine `backend`: each engine allocates its own way (DeepSpeed keeps bf16 weights beside
    its fp32 master copy, FSDP2 gathers bf16 copies only of the blocks it runs), so each has its own model with the
    same breakdown."""
    if backend == "deepspeed":
        return deepspeed_memory
    if backend == "native":
        from orchestrator.planner.memory_native import native_memory

        return native_memory
    raise ValueError(f"no memory model for backend {backend!r}; expected 'deepspeed' or 'native'")


def deepspeed_memory(spec: JobSpec, p: ParallelConfig) -> MemoryBreakdown:
    """Peak bytes per GPU of the DeepSpeed engine: the fullest pipeline stage's."""
    buffers = engine_buffers(spec, p)
    per_stage = stage_params(spec.model, p.pp, p.tp)
    breakdowns = [_stage_memory(spec.model, spec.data.seq_len, p, buffers, s, per_stage[s]) for s in range(p.pp)]
    return max(breakdowns, key=lambda b: b.allocated)


def engine_buffers(spec: JobSpec, p: ParallelConfig) -> EngineBuffers:
    """Bucket sizes from the DeepSpeed config the engine will build for this layout."""
    if p.backend != "deepspeed":
        return EngineBuffers()
    from parallel.deepspeed_config import build_ds_config
    from parallel.parallel_dims import ParallelDims

    dims = ParallelDims(dp=max(p.dp, 1), pp=p.pp, tp=p.tp)
    config = build_ds_config(dataclasses.replace(spec, parallel=p), dims)
    zero = config.get("zero_optimization", {})
    default = EngineBuffers()
    return EngineBuffers(reduce_bucket=float(zero.get("reduce_bucket_size", 5e8)),
                         prefetch_bucket=float(zero.get("stage3_prefetch_bucket_size", default.prefetch_bucket)),
                         overlap_comm=bool(zero.get("overlap_comm", p.zero_stage == 3)),
                         frees_bf16_gradients=bool(config["bf16"].get("immediate_grad_update", False)))


def _stage_memory(model: ModelConfig, seq_len: int, p: ParallelConfig, buffers: EngineBuffers, stage: int,
                  params: int) -> MemoryBreakdown:
    mixed = p.precision == "bf16"
    width = 2 if mixed else 4
    dp = max(p.dp, 1)
    zero = max(p.zero_stage, 1)

    weights = width * params // (dp if zero >= 3 else 1)
    # Gradients held through the step: ZeRO-1 in mixed precision keeps a full fp32 accumulator, ZeRO-2/3 an fp32
    # shard. ZeRO-1's gradients of the weights' width (and in fp32 the shard the step reads) live only from the end
    # of backward to the end of the step, when the activations are gone: whichever is larger sets the peak. bf16
    # gradients added to the accumulator as they are made never pile up.
    gradients = (4 * params if mixed else 0) if zero == 1 else 4 * params // dp
    held = 0 if mixed and buffers.frees_bf16_gradients else width * params
    late_gradients = held + (0 if mixed else 4 * params // dp) if zero == 1 else 0
    optimizer = 0 if p.offload_optimizer else 12 * params // dp  # fp32 master copy of the shard + two moments

    activations = activation_bytes(model, seq_len, p, stage, width)
    overhead = _buffer_bytes(model, p, buffers, width, zero) + max(0, late_gradients - activations)
    return MemoryBreakdown(weights=weights, gradients=gradients, optimizer=optimizer,
                           activations=activations, overhead=overhead, stage=stage)


def activation_bytes_per_token(model: ModelConfig, width: int, tp: int = 1, sequence_parallel: bool = False) -> float:
    """Bytes autograd keeps per token for one transformer block (no recomputation)."""
    q, _ = attention_widths(model)
    sp = tp if sequence_parallel else 1
    norms = norm_elements(model, tp, sequence_parallel, qk=True) * (4 + width) + BLOCK_INPUTS_D * model.dim * width / sp
    split = (ATTN_SAVED_D * q + ATTN_SAVED_QKV * saved_qkv(model)) * width / tp
    return norms + split + mlp_saved_bytes(model, width, tp, FFN_SAVED_F)


def mlp_saved_bytes(model: ModelConfig, width: int, tp: int, per_width: float, routing: bool = True,
                    compiled: bool = False) -> float:
    """Bytes per token one rank's MLP keeps, averaged over the layers: `per_width` tensors as wide as the MLP a
    token goes through (ffn_dim / tp in a dense block; in a MoE layer its top_k experts and the shared experts, whole
    on every tp rank), and with `routing` what a MoE layer keeps to route and combine (`MOE_FP32_BYTES`). `compiled`:
    inductor keeps the routed copies' expert outputs at the compute width for the combine and casts them again in
    backward, where eager autograd keeps two fp32 copies."""
    moe = model.moe
    sparse = sum(moe_layers(model))
    dense_layer = per_width * model.ffn_dim / tp * width
    if not sparse:
        return dense_layer
    d, k, expert = model.dim, moe.top_k, moe.expert_ffn_dim or model.ffn_dim
    moe_layer = per_width * (k + moe.num_shared_experts) * expert * width
    if routing:
        upcast = d if width < MOE_FP32_BYTES else 0
        combine = k * d * width if compiled else 2 * k * d * MOE_FP32_BYTES
        moe_layer += k * d * width + combine + (moe.num_experts + upcast) * MOE_FP32_BYTES
    return (sparse * moe_layer + (model.n_layers - sparse) * dense_layer) / model.n_layers


def ep_buffer_bytes(model: ModelConfig, p: ParallelConfig, seq_len: int, width: int) -> int:
    """One MoE layer's routed copies in flight under expert parallelism: a micro-batch's tokens × top_k, sent and
    received, dispatched and combined (0 without ep)."""
    if p.ep == 1:
        return 0
    tokens = p.micro_batch_size * seq_len // p.cp
    return int(EP_BUFFERS_D * tokens * model.moe.top_k * model.dim * width)


def norm_elements(model: ModelConfig, tp: int = 1, sequence_parallel: bool = False, qk: bool = False) -> float:
    """Elements per token the block norms of one block normalise on one rank, dim each (split by tp only with
    sequence parallelism); with `qk`, the query/key norms' query and key widths too (split by tp with the heads)."""
    q, kv = attention_widths(model)
    block = BLOCK_NORMS[model.norm_placement] * model.dim / (tp if sequence_parallel else 1)
    return block + ((q + kv) / tp if qk and model.qk_norm != "none" else 0.0)


def saved_qkv(model: ModelConfig) -> int:
    """Elements per token of the q, k and v attention keeps: in soft-capped (eager) attention k and v repeated to
    every query head."""
    q, kv = attention_widths(model)
    return 3 * q if model.attn_softcap else q + 2 * kv


def attention_bytes_per_token(model: ModelConfig, seq_len: int, width: int, tp: int = 1) -> float:
    """Bytes per token and block that grow with the sequence, averaged over the blocks: the [heads, seq, seq] scores
    soft-capped attention materialises (a query's score of every key, per head, kept as the tanh output and the
    fp32 probability, and its cast), which SDPA never does; without a cap, the [seq, seq] mask SDPA keeps in the
    layers whose window is shorter than the sequence."""
    if model.attn_softcap:
        cast = width if width != SCORE_FP32_BYTES else 0
        return model.n_heads / tp * seq_len * (width + SCORE_FP32_BYTES + cast)
    if not 0 < model.sliding_window < seq_len:
        return 0.0
    every = model.full_attention_every
    sliding = model.n_layers - (model.n_layers // every if every else 0)
    return sliding / model.n_layers * seq_len * MASK_BYTES


def selective_bytes_per_token(model: ModelConfig, width: int, p: ParallelConfig, residual_width: int) -> float:
    """Bytes selective checkpointing keeps per token and block beside the block's input; under cp per token of
    the whole sequence, as `activation_bytes` counts them before the caller divides by cp."""
    d, tp = model.dim, p.tp
    q, kv = attention_widths(model)
    split = ((SELECTIVE_SPLIT_D * q + kv) * width + 4 * model.n_heads) / tp
    gate = mlp_saved_bytes(model, width, tp, 1.0, routing=False)
    reductions = SELECTIVE_REDUCTIONS_D * d * width / (tp if p.sequence_parallel else 1) if tp > 1 else 0.0
    gathered = 0.0
    if p.backend == "native":
        if tp > 1 and p.sequence_parallel:
            gathered += 2 * d * residual_width
        if p.cp > 1:
            gathered += 2 * kv / tp * width * p.cp
        if p.ep > 1:  # each MoE layer's routed copies as they arrive at the experts and as they come back
            gathered += 2 * model.moe.top_k * d * width * sum(moe_layers(model)) / model.n_layers
    return split + gate + reductions + gathered



def checkpointed_layers(p: ParallelConfig, first: int, count: int) -> int:
    """How many of the `count` layers from `first` (0-based) `p.activation_checkpointing` recomputes: every_n's are
    the n-th, 2n-th, … of the model (`parallel.activation_checkpoint.is_checkpointed`)."""
    if p.activation_checkpointing != "every_n":
        return 0 if p.activation_checkpointing == "none" else count
    n = p.activation_checkpointing_every
    return (first + count) // n - first // n


def activation_bytes(model: ModelConfig, seq_len: int, p: ParallelConfig, stage: int, width: int,
                     block_bytes_per_token: float | None = None, logit_bytes: int = LOGIT_BYTES,
                     residual_width: int | None = None) -> int:
    """Activations at the peak of pipeline stage `stage`, per `p.activation_checkpointing`. A block keeps
    `block_bytes_per_token` without recomputation (default: what eager autograd saves, `activation_bytes_per_token`)
    and each logit of the last stage `logit_bytes`; a checkpointed block keeps its input, `residual_width` bytes an
    element (default `width`), and so does the final norm, beside its fp32 normalised input and its output. The loss
    frees its logits before the backward recomputes the first checkpointed block, so the peak holds the larger of
    the two, not both."""
    tokens = p.micro_batch_size * seq_len
    layers = model.n_layers // p.pp
    in_flight = min(p.pp - stage, p.grad_accum)
    residual_width = residual_width or width
    full_layer, block_input = _block_bytes(model, seq_len, p, width, block_bytes_per_token, residual_width)
    residual = tokens * model.dim / (p.tp if p.sequence_parallel else 1)
    recomputing = full_layer  # one block recomputed at a time
    resident = min(layers, OFFLOADED_RESIDENT_INPUTS) if p.activation_offload else layers
    inputs = resident * in_flight * block_input
    if p.activation_checkpointing == "full":
        kept = inputs
    elif p.activation_checkpointing == "selective":
        kept = inputs + layers * in_flight * tokens * selective_bytes_per_token(model, width, p, residual_width)
    elif p.activation_checkpointing == "every_n":
        recomputed = checkpointed_layers(p, stage * layers, layers)
        kept = (recomputed * block_input + (layers - recomputed) * full_layer) * in_flight
        recomputing = full_layer if recomputed else 0
    else:
        kept, recomputing = layers * in_flight * full_layer, 0
    if stage < p.pp - 1:
        return int(kept + recomputing)
    # Under loss_chunks the head keeps only its input; its norm and logits live a slice at a time.
    final_norm = residual * (residual_width + (4 + width) / p.loss_chunks)
    logits = tokens * model.vocab_size / p.tp * logit_bytes / p.loss_chunks
    return int(kept + final_norm + max(recomputing, logits))


def backward_end_bytes(model: ModelConfig, seq_len: int, p: ParallelConfig, width: int,
                       block_bytes_per_token: float | None = None, residual_width: int | None = None) -> int:
    """Activations alive as the backward reaches the first blocks, beside gradients made for nearly every parameter:
    one block's activations (recomputed, or kept) with the gradients of its MLP's intermediates, and the block
    inputs still on the GPU (three brought back under activation offload, else the block's own)."""
    full_layer, block_input = _block_bytes(model, seq_len, p, width, block_bytes_per_token, residual_width)
    tokens = p.micro_batch_size * seq_len
    inputs = min(model.n_layers // p.pp, OFFLOADED_RESIDENT_INPUTS) if p.activation_offload else 1
    return int(full_layer + tokens * mlp_saved_bytes(model, width, p.tp, 3.0, routing=False) + inputs * block_input)


def _block_bytes(model: ModelConfig, seq_len: int, p: ParallelConfig, width: int,
                 block_bytes_per_token: float | None, residual_width: int | None) -> tuple[float, float]:
    """A block's activations without recomputation, and its input, for one micro-batch (see `activation_bytes`)."""
    tokens = p.micro_batch_size * seq_len
    if block_bytes_per_token is None:
        block_bytes_per_token = activation_bytes_per_token(model, width, p.tp, p.sequence_parallel)
    full_layer = tokens * (block_bytes_per_token + attention_bytes_per_token(model, seq_len, width, p.tp))
    residual = tokens * model.dim / (p.tp if p.sequence_parallel else 1)
    return full_layer, residual * (residual_width or width)


def _buffer_bytes(model: ModelConfig, p: ParallelConfig, buffers: EngineBuffers, width: int, zero: int) -> int:
    """Buffers DeepSpeed keeps beside the model state, sized by its bucket settings.

    ZeRO-2 stages gradients in contiguous buckets of `reduce_bucket` elements (two when communication overlaps),
    allocated whole however small the model; ZeRO-1's bf16 optimizer reduces straight from its fp32 buffer. ZeRO-3
    keeps one reduction bucket and gathers each module's weights before it runs: the largest module (often the
    vocab-parallel embedding) plus what is prefetched behind it.
    """
    if zero == 1 and p.precision == "bf16":
        return 0
    copies = 2 if buffers.overlap_comm and zero < 3 else 1
    bucket = buffers.reduce_bucket * width * copies
    if zero < 3:
        return int(bucket)
    count = count_params(model)
    layer = (count.attention + count.ffn) / p.tp
    largest = max(layer, model.vocab_size * model.dim / p.tp)
    return int(bucket + (largest + min(buffers.prefetch_bucket, layer)) * width)
