"""Choose a layout: dp × pp × tp (× ep), ZeRO stage, micro-batch, activation checkpointing and loss slices for a
number of GPUs.

Every combination is built as a spec and checked by the validator's own cross-field rules (so the planner never
proposes what `pretrain validate` would refuse), then by the memory model; the survivors are ranked by an estimated
step time. The estimate is deliberately simple and says what it counts:

    compute      model FLOPs of the step over (GPUs × peak × MFU × matmul efficiency), the efficiency falling for
                 small micro-batches as m / (m + 256) tokens (a routed expert's matmuls over the copies it gets: a
                 micro-batch's tokens × top_k × ep / num_experts); activation checkpointing adds a forward pass,
                 loss slices (`parallel.loss_chunks`, native engine) the lm_head's forward
    pp bubble    1F1B idles (pp - 1) / micro-batches of the compute (Narayanan et al., 2021)
    tp traffic   4 all-reduces of a micro-batch's hidden states per block (6 with recomputation), inside a node
    cp traffic   (native engine, parallel.cp) each block all-gathers the keys and values of the whole sequence in
                 its forward (again when recomputed) and reduce-scatters their gradients in its backward, inside a
                 node; each rank computes seq_len / cp tokens of every sequence
    ep traffic   (a mixture of experts under parallel.ep) each MoE layer all-to-alls a micro-batch's routed tokens
                 (top_k copies of each) to the ranks holding their experts and the outputs back, in the forward
                 (again when recomputed) and their gradients in the backward; (ep - 1) / ep of them leave the rank,
                 inside a node while tp × ep fits in one
    pp traffic   a micro-batch's hidden states forward and their gradient back, per micro-batch
    dp traffic   a ring all-reduce of the rank's gradients per step, hidden behind the last micro-batch's backward
                 as far as it lasts; ZeRO-3 also all-gathers weights for every micro-batch's forward and backward
                 (not hidden); across nodes once a dp group spans more than one. Routed experts reduce over the
                 dp × cp / ep ranks holding the same ones, and only the rank's num_experts / ep are gathered

A mixture of experts' compute counts its active parameters (`counting.flops_per_token`); its layouts also range
over ep, the divisors of dp × cp that divide num_experts (ep takes its ranks from the data-parallel ones).

Ranks are ordered tp fastest, then cp, dp, pp (Megatron's order, with torchtitan's cp), so tp and cp groups stay
inside a node. Context parallelism is considered only when no layout without it fits: it is for sequences whose
activations one GPU cannot hold (docs/long-context.md), and costs traffic the other layouts do not have.
`choose_layout` is what the controller calls when the spec leaves the layout open.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from dataclasses import dataclass, field

from orchestrator.errors import UserError
from orchestrator.planner.counting import (
    attention_widths,
    count_params,
    flops_per_token,
    moe_layers,
    routed_flops_share,
    stage_expert_params,
    stage_params,
)
from orchestrator.planner.memory import GiB, MemoryBreakdown, checkpointed_layers, estimate_memory
from orchestrator.spec import OFFLOADED_MODES, JobSpec, ParallelConfig
from orchestrator.validate import cross_field_problems

HALF_EFFICIENCY_TOKENS = 256  # tokens per micro-batch at which matmuls reach half their large-batch efficiency
# Activation checkpointing modes, simplest first, with the share of the step's compute each adds by recomputing:
# full runs every block's forward again (2 of the 6 FLOPs per parameter); selective a third of the matmuls and the
# element-wise ops. Measured on the Llama-3-8B shape (seq 4096, FSDP dp2, H200s): +17% and +8% step time.
RECOMPUTE_SHARE = {"none": 0.0, "selective": 0.1, "full": 1 / 3}
CHECKPOINTING = tuple(RECOMPUTE_SHARE)  # every_n is planned only when the spec asks for it, not searched
# The loss slices the planner weighs against none: an eighth of the logits left alive, for the head's forward run
# again (2.3% of the 1B model's FLOPs at seq 4k).
PLANNED_LOSS_CHUNKS = 8


class NoLayoutError(UserError):
    """No layout of the given GPUs fits the model; the message says by how much and what would make it fit."""


@dataclass(frozen=True)
class Hardware:
    """The GPUs a plan is for, and the rates the step-time estimate assumes."""

    gpus: int
    gpu_mem_bytes: int
    gpus_per_node: int = 8
    peak_flops: float = 989e12  # dense bf16 FLOP/s per GPU (H100 SXM)
    peak_flops_fp8: float = 1979e12  # dense FP8 FLOP/s per GPU: the float8 matmuls' rate (parallel.float8)
    mfu: float = 0.40  # fraction of peak the matmuls reach
    intra_node_bw: float = 300e9  # bytes/s per GPU for collectives inside a node (NVLink)
    inter_node_bw: float = 50e9  # bytes/s per GPU across nodes (one 400 Gb/s NIC per GPU)

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise UserError(f"--gpus must be at least 1, got {self.gpus}")
        if self.gpus_per_node < 1:
            raise UserError(f"--gpus-per-node must be at least 1, got {self.gpus_per_node}")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise UserError(f"--gpus {self.gpus} is not a whole number of nodes of --gpus-per-node "
                            f"{self.gpus_per_node}; use a multiple of {self.gpus_per_node}")
        if self.gpu_mem_bytes <= 0:
            raise UserError(f"--gpu-mem must be positive, got {self.gpu_mem_bytes} bytes")
        if not 0 < self.mfu <= 1:
            raise UserError(f"--mfu must be in (0, 1], got {self.mfu}")

    @property
    def node_size(self) -> int:
        return min(self.gpus, self.gpus_per_node)


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, by cause."""

    compute: float
    recompute: float
    bubble: float
    tp_comm: float
    pp_comm: float
    dp_comm: float
    cp_comm: float = 0.0
    ep_comm: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.parts().values())

    def parts(self) -> dict[str, float]:
        return {"compute": self.compute, "recomputation": self.recompute, "pipeline bubble": self.bubble,
                "tp traffic": self.tp_comm, "cp traffic": self.cp_comm, "ep traffic": self.ep_comm,
                "pp traffic": self.pp_comm, "dp traffic": self.dp_comm}


@dataclass(frozen=True)
class Candidate:
    parallel: ParallelConfig
    memory: MemoryBreakdown
    step: StepTime
    tokens_per_step: int
    model_flops_per_step: float
    peak_flops: float  # per GPU, for this candidate's precision: float8 matmuls count at the FP8 peak

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.step.total

    def mfu(self, hw: Hardware) -> float:
        return self.model_flops_per_step / self.step.total / (hw.gpus * self.peak_flops)


@dataclass
class Plan:
    """The chosen layout, the ranked alternatives that fit, and why."""

    best: Candidate
    ranked: list[Candidate]
    hardware: Hardware
    considered: int
    too_big: int
    broke_rules: collections.Counter = field(default_factory=collections.Counter)
    explanation: list[str] = field(default_factory=list)

    @property
    def parallel(self) -> ParallelConfig:
        return self.best.parallel


def choose_layout(spec: JobSpec, gpus: int, gpu_mem_bytes: int, gpus_per_node: int = 8, *,
                  mfu: float = 0.40, peak_flops: float | None = None, intra_node_bw: float = 300e9,
                  inter_node_bw: float = 50e9, global_batch_size: int | None = None) -> Plan:
    """The fastest layout of `gpus` GPUs that fits `spec`'s model in `gpu_mem_bytes` each.

    The global batch (sequences per step) stays the spec's unless `global_batch_size` is given; precision, backend
    and optimizer offload stay the spec's. Raises `NoLayoutError` saying by how much the smallest layout misses and
    what would make it fit.
    """
    hw = Hardware(gpus=gpus, gpu_mem_bytes=gpu_mem_bytes, gpus_per_node=gpus_per_node, mfu=mfu,
                  peak_flops=peak_flops or spec.metrics.peak_flops, peak_flops_fp8=spec.metrics.peak_flops_fp8,
                  intra_node_bw=intra_node_bw, inter_node_bw=inter_node_bw)
    return plan_layouts(spec, hw, global_batch_size or spec.parallel.global_batch_size)


def plan_layouts(spec: JobSpec, hw: Hardware, global_batch: int) -> Plan:
    count_params(spec.model)  # a model the planner cannot count fails here, with its field named
    fitting: list[Candidate] = []
    broke: collections.Counter = collections.Counter()
    too_big: list[Candidate] = []
    considered = 0
    plain_broke: collections.Counter = collections.Counter()  # why layouts without cp broke, for a no-fit message
    for context_parallel in (False, True):
        if fitting:
            break
        plain_broke = plain_broke or broke.copy()
        for parallel in enumerate_layouts(spec, hw, global_batch, context_parallel):
            considered += 1
            candidate_spec = with_layout(spec, parallel, hw)
            problems = cross_field_problems(candidate_spec)
            if problems:
                broke[str(problems[0])] += 1
                continue
            candidate = evaluate(candidate_spec, hw)
            (fitting if candidate.memory.total <= hw.gpu_mem_bytes else too_big).append(candidate)
    if not fitting:
        raise NoLayoutError(explain_no_fit(spec, hw, global_batch, too_big, plain_broke or broke))
    fitting.sort(key=_rank_key)
    plan = Plan(best=fitting[0], ranked=fitting, hardware=hw, considered=considered, too_big=len(too_big),
                broke_rules=broke)
    plan.explanation = explain_choice(plan)
    return plan


def enumerate_layouts(spec: JobSpec, hw: Hardware, global_batch: int, context_parallel: bool = False):
    """Every dp × pp × tp (× ep) × ZeRO (1-3) × micro-batch × checkpointing × loss slices combination that keeps
    the global batch; with `context_parallel`, those with cp > 1 (cp × tp inside a node), else cp = 1."""
    base = spec.parallel
    modes = OFFLOADED_MODES if base.activation_offload else CHECKPOINTING
    for tp in _divisors(hw.node_size):
        for cp in _divisors(hw.node_size // tp) if context_parallel else [1]:
            if (cp > 1) != context_parallel:
                continue
            for pp in _divisors(hw.gpus // (tp * cp)):
                if hw.gpus % (tp * cp * pp) or pp > spec.model.n_layers:
                    continue
                dp = hw.gpus // (tp * cp * pp)
                if global_batch % dp:
                    continue
                per_rank = global_batch // dp
                for ep in expert_parallel_sizes(spec, dp * cp):
                    for micro in _divisors(per_rank):
                        for zero, checkpointing, chunks in itertools.product(
                                (1, 2, 3),  # ZeRO-0 moves the same bytes as ZeRO-1 and keeps more
                                modes, _loss_chunks(spec, cp * tp)):
                            yield dataclasses.replace(
                                base, dp=dp, cp=cp, pp=pp, tp=tp, ep=ep, zero_stage=zero, micro_batch_size=micro,
                                grad_accum=per_rank // micro, global_batch_size=global_batch,
                                sequence_parallel=tp > 1, activation_checkpointing=checkpointing,
                                loss_chunks=chunks)


def _loss_chunks(spec: JobSpec, shards: int) -> tuple[int, ...]:
    """The spec's loss slices if it sets them, else none and, on the native engine where they divide a rank's part
    of a row (seq_len / (cp · tp), sequence parallelism being planned with tp), PLANNED_LOSS_CHUNKS."""
    p = spec.parallel
    if p.loss_chunks > 1 or p.backend != "native" or spec.data.seq_len % (shards * PLANNED_LOSS_CHUNKS):
        return (p.loss_chunks,)
    return (1, PLANNED_LOSS_CHUNKS)


def expert_parallel_sizes(spec: JobSpec, batch_ranks: int) -> list[int]:
    """The ep sizes to consider: 1 for a dense model; for a mixture of experts the divisors of the dp × cp ranks
    that split its experts evenly."""
    experts = spec.model.moe.num_experts
    return [ep for ep in _divisors(batch_ranks) if not experts % ep] if experts else [1]


def with_layout(spec: JobSpec, parallel: ParallelConfig, hw: Hardware) -> JobSpec:
    nodes = max(1, hw.gpus // hw.gpus_per_node)
    resources = dataclasses.replace(spec.resources, num_nodes=nodes, gpus_per_node=hw.node_size,
                                    min_nodes=min(spec.resources.min_nodes, nodes))
    return dataclasses.replace(spec, parallel=parallel, resources=resources)


def evaluate(spec: JobSpec, hw: Hardware) -> Candidate:
    """Memory and estimated step time of the spec's own (resolved) layout on `hw`."""
    p, m = spec.parallel, spec.model
    seq = spec.data.seq_len
    tokens = p.global_batch_size * seq
    model_flops = flops_per_token(m, seq) * tokens
    width = 2 if p.precision == "bf16" else 4

    micro_tokens = p.micro_batch_size * seq // p.cp  # what one rank computes of a micro-batch
    # A routed expert multiplies only the copies sent to it: top_k of every token over num_experts, gathered from
    # the ep ranks (`routed_flops_share` of the FLOPs run at that size).
    expert_tokens = micro_tokens * m.moe.top_k * p.ep / max(m.moe.num_experts, 1)
    routed = routed_flops_share(m, seq)
    slowdown = (1 - routed) / _efficiency(micro_tokens) + (routed / _efficiency(expert_tokens) if routed else 0.0)
    peak = peak_flops(spec, hw)
    compute = model_flops * slowdown / (hw.gpus * peak * hw.mfu)
    recompute = compute * (_recompute_share(p, m.n_layers) + _head_recompute_share(spec))
    bubble = (compute + recompute) * (p.pp - 1) / p.grad_accum

    hidden_bytes = micro_tokens * m.dim * width
    blocks = m.n_layers // p.pp
    # A block recomputed whole all-reduces twice more; selective keeps every collective's output.
    whole = 0.0 if p.activation_checkpointing == "selective" else checkpointed_layers(p, 0, m.n_layers) / m.n_layers
    all_reduces = 4 + 2 * whole
    tp_comm = blocks * p.grad_accum * all_reduces * _ring(p.tp) * hidden_bytes / hw.intra_node_bw
    # Keys and values of the whole micro-batch sequence: gathered in the forward (and again in every block
    # recomputed whole; selective keeps them), their gradients reduce-scattered in the backward; each moves
    # (cp - 1) / cp of them.
    kv_bytes = 2 * p.micro_batch_size * seq * attention_widths(m)[1] / p.tp * width
    cp_comm = blocks * p.grad_accum * (2 + whole) * _ring(p.cp) / 2 * kv_bytes / hw.intra_node_bw

    spans_nodes = hw.gpus > hw.gpus_per_node
    pp_bw = hw.inter_node_bw if spans_nodes and p.tp * p.cp * p.dp >= hw.gpus_per_node else hw.intra_node_bw
    pp_comm = 2 * p.grad_accum * hidden_bytes / pp_bw if p.pp > 1 else 0.0

    # Routed tokens to the experts' ranks and back in the forward (and recomputation), gradients in the backward.
    routed_bytes = hidden_bytes * m.moe.top_k * (p.ep - 1) / p.ep
    ep_bw = hw.inter_node_bw if p.tp * p.ep > hw.gpus_per_node else hw.intra_node_bw
    moe_blocks = sum(moe_layers(m)) / p.pp
    ep_comm = moe_blocks * p.grad_accum * 2 * (2 + whole) * routed_bytes / ep_bw

    stage = max(range(p.pp), key=stage_params(m, p.pp, p.tp, p.ep).__getitem__)
    rank_params = stage_params(m, p.pp, p.tp, p.ep)[stage]
    experts = stage_expert_params(m, p.pp, p.tp, p.ep)[stage]
    dp_bw = hw.inter_node_bw if p.tp * p.cp * p.dp > hw.gpus_per_node else hw.intra_node_bw
    last_backward = compute * 2 / 3 / p.grad_accum
    shard = p.dp * p.cp  # FSDP reduces gradients over dp × cp, the routed experts' over dp × cp / ep
    reduced = _ring(shard) * (rank_params - experts) + _ring(shard // p.ep) * experts
    dp_comm = max(0.0, reduced * width / dp_bw - last_backward)
    if p.zero_stage == 3:  # an all-gather moves half what an all-reduce does
        dp_comm += p.grad_accum * 2 * reduced / 2 * width / dp_bw

    step = StepTime(compute=compute, recompute=recompute, bubble=bubble, tp_comm=tp_comm, pp_comm=pp_comm,
                    dp_comm=dp_comm, cp_comm=cp_comm, ep_comm=ep_comm)
    return Candidate(parallel=p, memory=estimate_memory(spec), step=step, tokens_per_step=tokens,
                     model_flops_per_step=model_flops, peak_flops=peak)


def peak_flops(spec: JobSpec, hw: Hardware) -> float:
    """FLOP/s per GPU at the spec's precision: with `parallel.float8` the block linears' share of the FLOPs runs at
    the FP8 peak (the same blend the ranks' MFU uses, `parallel.callbacks.mixed_peak_flops`)."""
    if spec.parallel.float8 == "none":
        return hw.peak_flops
    from parallel.callbacks import mixed_peak_flops
    from parallel.float8 import float8_flops_per_token
    from parallel.model import ModelDims

    dims = ModelDims.from_config(spec.model)
    share = float8_flops_per_token(dims) / dims.flops_per_token(spec.data.seq_len)
    return mixed_peak_flops(hw.peak_flops, hw.peak_flops_fp8, share)


def explain_choice(plan: Plan) -> list[str]:
    hw, best = plan.hardware, plan.best
    lines = [
        f"considered {plan.considered} layouts of {hw.gpus} GPUs ({hw.node_size} per node): {len(plan.ranked)} fit "
        f"in {_gib(hw.gpu_mem_bytes)} per GPU, {plan.too_big} need more memory, {sum(plan.broke_rules.values())} "
        "break a spec rule" + (f" (most often: {plan.broke_rules.most_common(1)[0][0]})" if plan.broke_rules else ""),
        f"chosen: {describe(best.parallel)}: {_gib(best.memory.total)} of {_gib(hw.gpu_mem_bytes)} per GPU, "
        f"step ≈ {best.step.total:.3g} s ({_parts(best.step)}), ≈ {best.tokens_per_second:,.0f} tokens/s, "
        f"MFU ≈ {best.mfu(hw):.2f}",
    ]
    runner = next((c for c in plan.ranked[1:] if _shape(c) != _shape(best)), None)
    if runner is not None:
        slower = runner.step.total / best.step.total - 1
        lines.append(f"next best split: {describe(runner.parallel)}: {slower:+.1%} step time, "
                     f"mostly {_largest_difference(runner.step, best.step)}")
    same = [c for c in plan.ranked if _shape(c) == _shape(best) and c.parallel.zero_stage != best.parallel.zero_stage]
    if same:
        other = same[0]
        extra = other.memory.total - best.memory.total
        lines.append(f"ZeRO-{best.parallel.zero_stage} rather than ZeRO-{other.parallel.zero_stage} at this split, "
                     f"which would take {other.step.total / best.step.total - 1:+.1%} step time and "
                     f"{_gib(abs(extra))} {'more' if extra >= 0 else 'less'} memory per GPU")
    return lines


def explain_no_fit(spec: JobSpec, hw: Hardware, global_batch: int, too_big: list[Candidate],
                   broke: collections.Counter) -> str:
    if not too_big:
        reasons = "; ".join(reason for reason, _ in broke.most_common(3)) or (
            f"the global batch of {global_batch} sequences does not split over any data-parallel size")
        return f"no layout of {hw.gpus} GPUs satisfies the spec's rules: {reasons}"
    smallest = min(too_big, key=lambda c: c.memory.total)
    need, have = smallest.memory.total, hw.gpu_mem_bytes
    lines = [
        f"{spec.name}: {count_params(spec.model).total / 1e9:.2f}B parameters fit no layout of {hw.gpus} GPUs × "
        f"{_gib(have)}: the smallest, {describe(smallest.parallel)}, needs {_gib(need)} per GPU, "
        f"{_gib(need - have)} ({need / have - 1:.0%}) too much "
        f"({', '.join(f'{name} {_gib(size)}' for name, size in smallest.memory.rows()[:5])})",
        "it would fit with: " + "; ".join(_what_would_fit(spec, hw, global_batch, smallest)),
    ]
    return "\n".join(lines)


def _what_would_fit(spec: JobSpec, hw: Hardware, global_batch: int, smallest: Candidate) -> list[str]:
    options = [f"GPUs of ≥ {_gib(smallest.memory.total)}"]
    for factor in (2, 4, 8, 16, 32, 64):
        bigger = dataclasses.replace(hw, gpus=hw.gpus * factor)
        if _fits_somewhere(spec, bigger, global_batch * factor):
            options.append(f"{bigger.gpus} GPUs of {_gib(hw.gpu_mem_bytes)} (global batch scaled to "
                           f"{global_batch * factor})")
            break
    # Activation offload passes the rules only with full or selective checkpointing and no pp, as its option says.
    for setting, value, option in (("offload_optimizer", True, "(optimizer states in host memory)"),
                                   ("activation_offload", True, "with activation_checkpointing=full or selective "
                                                                "(the blocks' inputs in host memory)")):
        if getattr(spec.parallel, setting) == value:
            continue
        changed = dataclasses.replace(spec, parallel=dataclasses.replace(spec.parallel, **{setting: value}))
        if _fits_somewhere(changed, hw, global_batch):
            options.append(f"parallel.{setting}={str(value).lower()} {option}")
    shorter = spec.data.seq_len // 2
    if shorter >= 8:
        short = dataclasses.replace(spec, data=dataclasses.replace(spec.data, seq_len=shorter))
        if _fits_somewhere(short, hw, global_batch):
            options.append(f"data.seq_len={shorter}")
    return options


def _fits_somewhere(spec: JobSpec, hw: Hardware, global_batch: int) -> bool:
    for parallel in enumerate_layouts(spec, hw, global_batch):
        candidate_spec = with_layout(spec, parallel, hw)
        if cross_field_problems(candidate_spec):
            continue
        if estimate_memory(candidate_spec).total <= hw.gpu_mem_bytes:
            return True
    return False


def _head_recompute_share(spec: JobSpec) -> float:
    """Loss slices run the lm_head's forward again in the backward: 2·dim·vocab FLOPs a token, as a share of the
    FLOPs counted (1B at seq 4k: 2.3%; measured 3.8% slower on an H200, with the loss recomputed too)."""
    if spec.parallel.loss_chunks == 1:
        return 0.0
    m = spec.model
    return 2 * m.dim * m.vocab_size / flops_per_token(m, spec.data.seq_len)


def _recompute_share(p: ParallelConfig, n_layers: int) -> float:
    """The share of the step's compute recomputation adds: every_n's is full's over the blocks it checkpoints."""
    if p.activation_checkpointing == "every_n":
        return RECOMPUTE_SHARE["full"] * checkpointed_layers(p, 0, n_layers) / n_layers
    return RECOMPUTE_SHARE[p.activation_checkpointing]


def describe(p: ParallelConfig) -> str:
    extras = [f"micro-batch {p.micro_batch_size} × {p.grad_accum} accumulation"]
    if p.sequence_parallel:
        extras.append("sequence parallel")
    extras.append(f"activation checkpointing {p.activation_checkpointing}")
    if p.activation_offload:
        extras.append("block inputs in host memory")
    if p.loss_chunks > 1:
        extras.append(f"loss in {p.loss_chunks} slices")
    cp = f" cp={p.cp}" if p.cp > 1 else ""
    ep = f" ep={p.ep}" if p.ep > 1 else ""
    return f"dp={p.dp}{cp}{ep} pp={p.pp} tp={p.tp} ZeRO-{p.zero_stage}, " + ", ".join(extras)


def _rank_key(c: Candidate) -> tuple:
    """Fastest first; among equals the one leaving the most memory free, then the simpler one."""
    p = c.parallel
    return (round(c.step.total, 9), c.memory.total, p.zero_stage, CHECKPOINTING.index(p.activation_checkpointing),
            p.pp, p.tp, p.ep)


def _shape(c: Candidate) -> tuple:
    p = c.parallel
    return (p.dp, p.cp, p.ep, p.pp, p.tp)


def _largest_difference(worse: StepTime, better: StepTime) -> str:
    a, b = worse.parts(), better.parts()
    name = max(a, key=lambda k: a[k] - b[k])
    return f"{name} ({b[name]:.3g} s → {a[name]:.3g} s)"


def _parts(step: StepTime) -> str:
    return ", ".join(f"{name} {seconds:.3g} s" for name, seconds in step.parts().items() if seconds > 0)


def _efficiency(tokens: float) -> float:
    """The share of their large-batch rate matmuls over `tokens` rows reach."""
    return tokens / (tokens + HALF_EFFICIENCY_TOKENS)


def _ring(n: int) -> float:
    """Bytes a ring all-reduce moves per byte of data, per rank."""
    return 2 * (n - 1) / n


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"
