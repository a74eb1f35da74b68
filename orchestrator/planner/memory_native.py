"""Memory per GPU of the native engine (FSDP2, DTensor TP, torch.distributed.pipelining), as `parallel.fsdp` runs it.

With more than one data-parallel rank every parameter lives once, as an fp32 shard (the master weights), with an fp32
gradient shard and Adam's two fp32 moments beside it: 16 bytes a parameter over dp. What FSDP2 adds is the bf16
(fp32 in fp32 training) copies it gathers to compute: under ZeRO-3 the block running and the one prefetched behind
it, plus the roots (embedding, final norm, lm_head), which stay gathered from their forward to their backward; under
ZeRO-1/2 every block, since none is resharded after forward. ZeRO-1 accumulates the micro-batches' gradients
unsharded in fp32 and reduce-scatters them once a step, so over several micro-batches its gradients are a whole fp32
copy; a step of one micro-batch reduce-scatters block by block, as ZeRO-2 does. With one data-parallel rank there is
no FSDP: fp32 weights, gradients and moments, and under bf16 autocast the bf16 casts of the weights, kept for the
backward except where a checkpointed block recomputes them; the embedding's output is fp32 there, and with it the
whole residual stream (4 bytes an element where FSDP's bf16 weights give 2).

With one micro-batch a step the gradients are made as the backward frees the activations: the peak is the
forward's, at the loss (`benchmarks/memory_peak.py` shows what is alive there: the block inputs, the logits and the
loss's buffer of their size), unless it comes near the backward's end, where nearly every gradient is made and the
first blocks' backward still holds one block's activations, its MLP intermediates' gradients and the block inputs
left (`memory.backward_end_bytes`). That is where it comes once the logits are sliced (`parallel.loss_chunks`):
1B at seq 128k on one H200 with offload and 8 slices, 32.2 GiB measured against 32.8 estimated, the trace showing 17
of 20 blocks' gradients made, block 2's recomputed MLP and three block inputs.

Activations are `memory.activation_bytes` per checkpointing mode. Compiled blocks (`parallel.compile`) save less than
eager autograd: inductor fuses each norm and RoPE into the kernels around them, so a norm keeps only its bf16 output,
attention q, k, v, its output and that output's copy laid out for o_proj, SwiGLU gate, up and the product into
down_proj, and the block's output; the fused loss holds the bf16 logits and a bf16 buffer of their size (4 bytes a
logit against eager's 12). These are the tensors `benchmarks/gpu_backends.py --memory-peak` found alive at the peak
(1.15B at seq 32k, one GPU), not fitted.

Under LoRA (`model.lora`) the model's weights are frozen: they are held (fp32 shards, gathered as above) with no
gradients or moments; only the adapters (`counting.lora_params`) have an fp32 gradient and Adam's two fp32 moments.
Activations are counted as without adapters (each adapted projection also keeps its rank-wide A·x, under 1%).
Measured on H200s (benchmarks/results/gpu_memory_lora_2gpu_h200.json: the ~1B Llama of benchmarks/gpu_memory.py,
rank 16 on every projection, bf16): one GPU +0.7%, dp2 ZeRO-3 +8.9%, tp2 -4.7%; the weights and states held before
the first step within 5% of weights + gradients + optimizer here.

Activation offload (`parallel.activation_offload`, with full checkpointing) leaves three block inputs on the GPU
(`memory.OFFLOADED_RESIDENT_INPUTS`) instead of every layer's. Measured on one H200 at 1B, peak allocated against
estimated (docs/backends.md, "Activation offload"): seq 64k 27.7 GiB against 28.3, seq 128k 42.3 against 43.3; the
trace of each peak holds exactly three block inputs.

Context parallelism (`parallel.cp`) divides the activations by cp: a rank holds seq_len / cp tokens of each
sequence, and each of them keeps what it keeps without cp (a soft-capped score row still spans the keys of the whole
sequence, so the terms computed at the full seq_len are right per token); one layer's gathered keys and values of the
whole sequence come on top (`context_parallel_kv_bytes`), and weights, gradients and moments shard over dp × cp.

Float8 (`parallel.float8`) changes no term: its weights and master copies stay bf16/fp32, and the float8 casts it
saves for backward replace bf16 activations of no larger size (measured at 8B: tensorwise 81.1 GiB, rowwise 76.6,
bf16 81.4).

Expert parallelism (`parallel.ep`, a mixture of experts): a rank holds num_experts / ep of each MoE layer's experts,
and FSDP shards those over the dp × cp / ep ranks holding the same ones, the rest of the model over dp × cp: per
rank, the master weights, gradients and moments of the experts are still 1 / (dp × cp) of them, but what is
gathered to compute (and ZeRO-1's unsharded gradients) holds only the rank's experts. One layer's tokens a rank
sends to and receives from the other ranks of its ep group are in flight beside them (`memory.ep_buffer_bytes`);
what the experts keep for backward is the same with or without ep.

Checked against the peaks measured on H200s (`torch.cuda.max_memory_allocated`, benchmarks/results/, test in
tests/orchestrator/test_plan_memory_native.py): 1.15B seq 2048 micro-batch 8 on one GPU, dp2 ZeRO-1 and ZeRO-3, one
GPU at seq 32k (none, selective) and 128k (full), and Llama-3-8B's shape seq 4096 micro-batch 1 with dp2 ZeRO-3
under each checkpointing mode (every_n too) and each float8 recipe, micro-batch 3 with none, full, selective and
selective float8, tp2 with sequence parallelism and pp2 1F1B are all within 10% (the largest gaps: float8 rowwise
+6.6%, a selective policy that kept every matmul's output -6.1%, tp2 -3.6%; all others within 2%).
"""

from __future__ import annotations

from orchestrator.planner.counting import (
    attention_widths,
    layer_params,
    lora_params,
    stage_expert_params,
    stage_params,
    trainable_params,
)
from orchestrator.planner.memory import (
    LOGIT_BYTES,
    MemoryBreakdown,
    activation_bytes,
    backward_end_bytes,
    checkpointed_layers,
    ep_buffer_bytes,
    mlp_saved_bytes,
    norm_elements,
    saved_qkv,
)
from orchestrator.spec import JobSpec, ModelConfig, ParallelConfig

COMPILED_LOGIT_BYTES = 4
IN_FLIGHT_BLOCKS = 2  # ZeRO-3: the block computing and the one FSDP2 prefetches behind it


def native_memory(spec: JobSpec, p: ParallelConfig) -> MemoryBreakdown:
    """Peak bytes per GPU of the native engine: the fullest pipeline stage's."""
    per_stage = stage_params(spec.model, p.pp, p.tp, p.ep)
    experts = stage_expert_params(spec.model, p.pp, p.tp, p.ep)
    trained = trainable_params(spec.model, p.pp, p.tp, p.ep)
    adapters = lora_params(spec.model, p.pp, p.tp)
    return max((_stage_memory(spec.model, spec.data.seq_len, p, s, params + adapters[s], trained[s], experts[s])
                for s, params in enumerate(per_stage)), key=lambda b: b.allocated)


def compiled_bytes_per_token(model: ModelConfig, width: int, tp: int = 1, sequence_parallel: bool = False,
                             residual_width: int | None = None) -> float:
    """Bytes a compiled block keeps per token without recomputation: each norm's output, the block's output
    (`residual_width` bytes an element, default `width`), q, k, v, attention's output and its copy laid out for the
    output projection, gate, up and their product (split by tp; the residual-wide ones only with sequence
    parallelism)."""
    q, _ = attention_widths(model)
    sp = tp if sequence_parallel else 1
    residual = norm_elements(model, tp, sequence_parallel, qk=True) * width + model.dim / sp * (residual_width or width)
    mlp = mlp_saved_bytes(model, width, tp, 3.0, compiled=True)
    return residual + (2 * q + saved_qkv(model)) * width / tp + mlp


def _stage_memory(model: ModelConfig, seq_len: int, p: ParallelConfig, stage: int, params: int,
                  trained: int, experts: int = 0) -> MemoryBreakdown:
    """`experts` of the stage's `params` are routed experts (this rank's num_experts / ep of each MoE layer), which
    shard over dp × cp / ep ranks; the rest over dp × cp."""
    mixed = p.precision == "bf16"
    width = 2 if mixed else 4
    dp = max(p.dp, 1) * p.cp  # FSDP shards over dp × cp

    trained_experts = 0 if model.lora.rank else experts  # LoRA trains adapters only

    def shard(n: int, held: int) -> int:
        return (n - held) // dp + held * p.ep // dp

    if dp == 1:
        gradients = 4 * trained
        # autocast's bf16 casts of the fp32 weights: kept for backward, except those of blocks that recompute them,
        # whose casts go with autocast's cache when the forward leaves it; a pipeline schedule runs forward and
        # backward inside one autocast, which keeps every cast until the schedule ends
        recast = _recomputed_block_params(model, p, stage) if p.pp == 1 else 0
        gathered = width * (params - recast) if mixed else 0
    else:
        whole = p.zero_stage <= 1 and p.grad_accum > 1  # one micro-batch is reduce-scattered block by block
        gradients = 4 * trained if whole else 4 * shard(trained, trained_experts)
        gathered = width * (params if p.zero_stage < 3 else _resident_when_resharding(model, p, stage, params))
    residual = 4 if dp == 1 else width  # without FSDP's bf16 weights the embedding and the residual stream are fp32
    block = compiled_bytes_per_token(model, width, p.tp, p.sequence_parallel, residual) if p.compile else None
    activations = activation_bytes(model, seq_len, p, stage, width, block,
                                   COMPILED_LOGIT_BYTES if p.compile else LOGIT_BYTES, residual)
    ending = backward_end_bytes(model, seq_len, p, width, block, residual)
    if p.cp > 1:
        kv = context_parallel_kv_bytes(model, seq_len, p, width)
        activations, ending = activations // p.cp + kv, ending // p.cp + kv
    if p.grad_accum == 1 and p.pp == 1:
        # The gradients are made as the backward frees the activations, all but what its last blocks hold.
        activations = max(activations, ending)
        gradients = max(0, gradients - (activations - ending))
    return MemoryBreakdown(weights=4 * shard(params, experts), gradients=gradients,
                           optimizer=8 * shard(trained, trained_experts), activations=activations,
                           overhead=gathered + ep_buffer_bytes(model, p, seq_len, width), stage=stage)


def context_parallel_kv_bytes(model: ModelConfig, seq_len: int, p: ParallelConfig, width: int) -> int:
    """The keys and values of the whole sequence one layer gathers under context parallelism (and, in its
    backward, their gradients): 2 × 2 × kv width × seq tokens of a micro-batch, split by tp with the heads."""
    _, kv = attention_widths(model)
    return int(4 * p.micro_batch_size * seq_len * kv / p.tp * width)


def _recomputed_block_params(model: ModelConfig, p: ParallelConfig, stage: int) -> int:
    """Parameters of the stage's blocks that activation checkpointing recomputes."""
    size = model.n_layers // p.pp
    first = stage * size
    layers = layer_params(model, p.tp, p.ep)[first:first + size]
    return sum(held for i, (held, _) in enumerate(layers) if checkpointed_layers(p, first + i, 1))


def _resident_when_resharding(model: ModelConfig, p: ParallelConfig, stage: int, params: int) -> int:
    """Parameters gathered at once under ZeRO-3: the blocks in flight (the stage's largest) and the stage's roots."""
    size = model.n_layers // p.pp
    blocks = sorted((held for held, _ in layer_params(model, p.tp, p.ep)[stage * size:(stage + 1) * size]),
                    reverse=True)
    roots = params - sum(blocks)
    return sum(blocks[:IN_FLIGHT_BLOCKS]) + roots
