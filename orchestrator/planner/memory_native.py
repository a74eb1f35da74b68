"""Memory per GPU of the native engine (FSDP2, DTensor TP, torch.distributed.pipelining), as `parallel.fsdp` runs it.

With more than one data-parallel rank every parameter lives once, as an fp32 shard (the master weights), with an fp32
gradient shard and Adam's two fp32 moments beside it: 16 bytes a parameter over dp. What FSDP2 adds is the bf16
(fp32 in fp32 training) copies it gathers to compute: under ZeRO-3 the block running and the one prefetched behind
it, plus the roots (embedding, final norm, lm_head), which stay gathered from their forward to their backward; under
ZeRO-1/2 every block, since none is resharded after forward. ZeRO-1 accumulates the micro-batches' gradients
unsharded in fp32 and reduce-scatters them once a step, so its gradients are a whole fp32 copy. With one
data-parallel rank there is no FSDP: fp32 weights, gradients and moments, and under bf16 autocast the bf16 casts of
the weights, cached through the forward for the backward.

Activations are `memory.activation_bytes` per checkpointing mode. Compiled blocks (`parallel.compile`) save less than
eager autograd: inductor fuses each norm and RoPE into the kernels around them, so a norm keeps only its bf16 input,
attention q, k, v and its output, SwiGLU gate, up and the product into down_proj, plus one more residual-wide tensor
a block; the fused loss holds the bf16 logits and the fp32 gradient of the softmax at its peak (6 bytes a logit
against eager's 12). The last two are fitted: which tensors inductor saves is not visible from the model, and the
peaks measured at micro-batch 1 and 3 (8B, every checkpointing mode) fix them.

Under LoRA (`model.lora`) the model's weights are frozen: they are held (fp32 shards, gathered as above) with no
gradients or moments; only the adapters (`counting.lora_params`) have an fp32 gradient and Adam's two fp32 moments.
Activations are counted as without adapters (each adapted projection also keeps its rank-wide A·x, under 1%).
Measured on H200s (benchmarks/results/gpu_memory_lora_2gpu_h200.json: the ~1B Llama of benchmarks/gpu_memory.py,
rank 16 on every projection, bf16): one GPU +0.7%, dp2 ZeRO-3 +8.9%, tp2 -4.7%; the weights and states held before
the first step within 5% of weights + gradients + optimizer here.

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
tests/orchestrator/test_plan_memory_native.py): 1.15B seq 2048 micro-batch 8 on one GPU, dp2 ZeRO-1 and ZeRO-3, and
Llama-3-8B's shape seq 4096 micro-batch 1 with dp2 ZeRO-3 under each checkpointing mode (every_n too) and each float8
recipe, micro-batch 3 with none, full, selective and selective float8, tp2 with sequence parallelism and pp2 1F1B are
all within 10% (the largest gaps: float8 rowwise +6.4%, full at micro-batch 3 +6.1%, tp2 +6.0%).
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
    MemoryBreakdown,
    activation_bytes,
    ep_buffer_bytes,
    mlp_saved_bytes,
    norm_elements,
    saved_qkv,
)
from orchestrator.spec import JobSpec, ModelConfig, ParallelConfig

COMPILED_LOGIT_BYTES = 6
IN_FLIGHT_BLOCKS = 2  # ZeRO-3: the block computing and the one FSDP2 prefetches behind it


def native_memory(spec: JobSpec, p: ParallelConfig) -> MemoryBreakdown:
    """Peak bytes per GPU of the native engine: the fullest pipeline stage's."""
    per_stage = stage_params(spec.model, p.pp, p.tp, p.ep)
    experts = stage_expert_params(spec.model, p.pp, p.tp, p.ep)
    trained = trainable_params(spec.model, p.pp, p.tp, p.ep)
    adapters = lora_params(spec.model, p.pp, p.tp)
    return max((_stage_memory(spec.model, spec.data.seq_len, p, s, params + adapters[s], trained[s], experts[s])
                for s, params in enumerate(per_stage)), key=lambda b: b.allocated)


def compiled_bytes_per_token(model: ModelConfig, width: int, tp: int = 1, sequence_parallel: bool = False) -> float:
    """Bytes a compiled block keeps per token without recomputation: each norm's input and one more residual-wide
    tensor, q, k, v and attention's output, gate, up and their product (split by tp; the residual-wide ones only with
    sequence parallelism)."""
    q, _ = attention_widths(model)
    residual = (norm_elements(model, tp, sequence_parallel, qk=True) + model.dim / (tp if sequence_parallel else 1))
    mlp = mlp_saved_bytes(model, width, tp, 3.0, compiled=True)
    return residual * width + (q + saved_qkv(model)) * width / tp + mlp


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
        gathered = width * params if mixed else 0  # autocast's cached bf16 casts of the fp32 weights
    else:
        gradients = 4 * trained if p.zero_stage <= 1 else 4 * shard(trained, trained_experts)
        gathered = width * (params if p.zero_stage < 3 else _resident_when_resharding(model, p, stage, params))
    if p.compile:
        block = compiled_bytes_per_token(model, width, p.tp, p.sequence_parallel)
        activations = activation_bytes(model, seq_len, p, stage, width, block, COMPILED_LOGIT_BYTES)
    else:
        activations = activation_bytes(model, seq_len, p, stage, width)
    if p.cp > 1:
        activations = activations // p.cp + context_parallel_kv_bytes(model, seq_len, p, width)
    return MemoryBreakdown(weights=4 * shard(params, experts), gradients=gradients,
                           optimizer=8 * shard(trained, trained_experts), activations=activations,
                           overhead=gathered + ep_buffer_bytes(model, p, seq_len, width), stage=stage)


def context_parallel_kv_bytes(model: ModelConfig, seq_len: int, p: ParallelConfig, width: int) -> int:
    """The keys and values of the whole sequence one layer gathers under context parallelism (and, in its
    backward, their gradients): 2 × 2 × kv width × seq tokens of a micro-batch, split by tp with the heads."""
    _, kv = attention_widths(model)
    return int(4 * p.micro_batch_size * seq_len * kv / p.tp * width)


def _resident_when_resharding(model: ModelConfig, p: ParallelConfig, stage: int, params: int) -> int:
    """Parameters gathered at once under ZeRO-3: the blocks in flight (the stage's largest) and the stage's roots."""
    size = model.n_layers // p.pp
    blocks = sorted((held for held, _ in layer_params(model, p.tp, p.ep)[stage * size:(stage + 1) * size]),
                    reverse=True)
    roots = params - sum(blocks)
    return sum(blocks[:IN_FLIGHT_BLOCKS]) + roots
