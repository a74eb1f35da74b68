"""The job spec's rules: load a spec from YAML and overrides, and report every problem in it at once.

OmegaConf alone stops at the first bad key; users fixing a 64-GPU spec want the whole list. So the raw YAML is
walked against the dataclasses of `orchestrator.spec` by the generic `orchestrator.config_parser` (unknown keys
with a did-you-mean, wrong types, values out of range), then the cross-field rules below add theirs; all are
raised together in one `SpecError`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from dataprep import filesystem
from orchestrator import config_parser
from orchestrator.config_parser import WRITTEN_FILE_BOUNDS, leaf_fields, loads_json, parse_config
from orchestrator.errors import Problem, SpecError
from orchestrator.presets import apply_preset
from orchestrator.spec import LORA_TARGETS, OFFLOADED_MODES, TRACKERS_INSTALL, JobSpec, ModelConfig, parse_windows

# Padding independent of tp, so a run resumed under another tensor-parallel size keeps the same vocabulary.
VOCAB_PAD = 1024
EMPTY_SPEC = ("a job spec needs at least one section, e.g. `model: {n_layers: 4}`; write `{}` to run with every "
              "default")


def load_spec(path: str | os.PathLike, overrides: Sequence[str] = (), *, require_data: bool = False) -> JobSpec:
    """Read `path`, apply `section.key=value` overrides, validate, and return the resolved spec."""
    return parse_spec(load_yaml(path), source=os.fspath(path), overrides=overrides, require_data=require_data)


def load_yaml(path: str | os.PathLike) -> Any:
    """A job spec file's plain data; an unreadable, hostile or empty file is a `SpecError` naming the file."""
    return config_parser.load_yaml(path, empty=EMPTY_SPEC)


def parse_spec(
    raw: Any, *, source: str = "job spec", overrides: Sequence[str] = (), require_data: bool = False
) -> JobSpec:
    """Validate a spec given as plain data (a YAML mapping or `spec_to_dict`'s output). The model preset it names
    fills what the spec and the overrides leave out (`orchestrator.presets`)."""
    raw, problems = apply_preset(raw, overrides)
    bad: set[str] = {p.path for p in problems}
    spec = parse_config(JobSpec, raw, source=source, overrides=overrides, problems=problems, bad=bad)
    if not bad & {"parallel.backend", "parallel.offload_optimizer", "parallel.pp", "model.tie_embeddings",
                  "model.moe.num_experts"}:
        spec.parallel.backend = pick_backend(spec)
    manifest = _read_manifest(spec, problems, bad, require_data)
    problems.extend(cross_field_problems(spec, bad, manifest))
    if problems:
        raise SpecError(source, problems)
    return _resolve(spec, manifest)


def pick_backend(spec: JobSpec) -> str:
    """`parallel.backend: auto` made concrete before any rule reads it, so a resolved spec (and every checkpoint's
    copy of it) names the engine that ran. Native was the faster engine on H100s for one GPU and for data parallelism
    at every ZeRO stage (docs/backends.md); DeepSpeed is kept where only it can run the spec."""
    p = spec.parallel
    if p.backend != "auto":
        return p.backend
    if spec.model.moe.num_experts:
        return "native"  # the only engine with mixture-of-experts layers
    if p.offload_optimizer or (p.pp > 1 and spec.model.tie_embeddings):
        return "deepspeed"
    return "native"


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def field_help(cls: type = JobSpec) -> Iterable[tuple[str, Any, str]]:
    """(dotted path, default, help) of every leaf field: the reference table of the spec."""
    return leaf_fields(cls)


def _read_manifest(spec: JobSpec, problems: list[Problem], bad: set[str], require: bool) -> dict | None:
    if not spec.data.path:
        if require:
            problems.append(Problem("data.path", "not set; point it at a directory written by `pretrain prep`"))
            bad.add("data.path")
        return None
    path = filesystem.join(spec.data.path, "manifest.json")
    try:
        if not filesystem.exists(path):
            if require:
                problems.append(Problem("data.path", f"no manifest.json in {spec.data.path!r}; run `pretrain prep` "
                                        "first"))
                bad.add("data.path")
            return None
        manifest = loads_json(filesystem.read_bytes(path), source=path, bounds=WRITTEN_FILE_BOUNDS)
        if not isinstance(manifest, dict):
            raise SpecError(path, [Problem("", f"expected a JSON object, got {type(manifest).__name__}")])
    except filesystem.StorageError as e:
        problems.append(Problem("data.path", str(e)))
        bad.add("data.path")
        return None
    except SpecError as e:
        problems.append(Problem("data.path", f"cannot read {path}: {e.problems[0].message}"))
        bad.add("data.path")
        return None
    return manifest


def _manifest_vocab(manifest: dict | None) -> int | None:
    """The shards' tokenizer size, where the manifest states one."""
    tokenizer = (manifest or {}).get("tokenizer")
    tokens = tokenizer.get("vocab_size") if isinstance(tokenizer, dict) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0 else None


# ---------------------------------------------------------------------------------------------- cross-field rules

Rule = Callable[[JobSpec, set, "dict | None"], list[Problem]]
RULES: list[Rule] = []


def cross_field_problems(spec: JobSpec, bad: set | None = None, manifest: dict | None = None) -> list[Problem]:
    """What the cross-field rules find in `spec` (skipping rules that read a field in `bad`): every layout rule an
    engine would otherwise refuse at start, so `pretrain validate` and the planner refuse it first."""
    return [problem for check in RULES for problem in check(spec, bad or set(), manifest)]


def rule(*paths: str) -> Callable[[Callable[..., list[Problem]]], Rule]:
    """Register a cross-field rule; it is skipped when a field it reads is already reported bad."""

    def register(check: Callable[..., list[Problem]]) -> Rule:
        def run(spec: JobSpec, bad: set, manifest: dict | None) -> list[Problem]:
            if any(p in bad for p in paths):
                return []
            return check(spec, manifest)

        RULES.append(run)
        return run

    return register


@rule("parallel.dp", "parallel.cp", "parallel.pp", "parallel.tp", "resources.num_nodes", "resources.gpus_per_node")
def _layout_fills_world(spec: JobSpec, _: Any) -> list[Problem]:
    p, r = spec.parallel, spec.resources
    world = spec.world_size
    ranks = f"{world} ranks (resources.num_nodes={r.num_nodes} × resources.gpus_per_node={r.gpus_per_node})"
    model = p.cp * p.pp * p.tp
    factors = (f"cp={p.cp} × " if p.cp > 1 else "") + f"pp={p.pp} × tp={p.tp}"
    if p.dp == 0:
        if world % model:
            return [Problem("parallel", f"{factors} = {model} does not divide {ranks}")]
        return []
    if p.dp * model != world:
        return [Problem("parallel", f"dp={p.dp} × {factors} = {p.dp * model}, but the run has {ranks}")]
    return []


@rule("parallel.cp", "parallel.backend", "parallel.tp", "data.seq_len", "eval.tasks", "resources.num_nodes",
      "resources.gpus_per_node")
def _context_parallel(spec: JobSpec, _: Any) -> list[Problem]:
    """Context parallelism is the native engine's (`parallel.context_parallel`): the sequence cut into 2·cp chunks,
    cp × tp consecutive ranks inside one node (keys and values are gathered every layer), whole sequences for
    downstream tasks."""
    p, r, cp = spec.parallel, spec.resources, spec.parallel.cp
    if cp == 1:
        return []
    out = []
    if p.backend != "native":
        out.append(Problem("parallel.cp", f"{cp} needs parallel.backend=native; the DeepSpeed engine has no context "
                           "parallelism (set parallel.cp=1, or parallel.backend=native)"))
    if spec.data.seq_len % (2 * cp):
        out.append(Problem("data.seq_len", f"{spec.data.seq_len} is not divisible by 2 × parallel.cp={cp}: each of "
                           f"the cp ranks holds two equal chunks of a sequence"))
    if r.num_nodes > 1 and r.gpus_per_node % (cp * p.tp):
        out.append(Problem("parallel.cp", f"cp={cp} × tp={p.tp} ranks would span nodes: each of the "
                           f"resources.num_nodes={r.num_nodes} nodes runs resources.gpus_per_node={r.gpus_per_node} "
                           f"consecutive ranks; make gpus_per_node a multiple of {cp * p.tp} or lower parallel.cp"))
    if spec.eval.tasks:
        out.append(Problem("eval.tasks", f"downstream tasks with parallel.cp={cp} are not supported: their forward "
                           "needs whole sequences on a rank (evaluate the checkpoint with parallel.cp=1)"))
    return out


@rule("parallel.tp", "resources.num_nodes", "resources.gpus_per_node")
def _tensor_groups_inside_a_node(spec: JobSpec, _: Any) -> list[Problem]:
    """Ranks run node by node (rank // gpus_per_node), tp innermost: a group crosses nodes unless a node holds whole
    groups, and its collectives would then leave NVLink for every layer."""
    tp, r = spec.parallel.tp, spec.resources
    if r.num_nodes > 1 and r.gpus_per_node % tp:
        return [Problem("parallel.tp", f"tensor-parallel groups of {tp} ranks would span nodes: each of the "
                        f"resources.num_nodes={r.num_nodes} nodes runs resources.gpus_per_node={r.gpus_per_node} "
                        f"consecutive ranks; make gpus_per_node a multiple of {tp} or lower parallel.tp")]
    return []


@rule("model.n_layers", "parallel.pp")
def _layers_split_over_stages(spec: JobSpec, _: Any) -> list[Problem]:
    if spec.model.n_layers % spec.parallel.pp:
        return [
            Problem("model.n_layers", f"{spec.model.n_layers} layers do not split into parallel.pp={spec.parallel.pp} "
                    "equal pipeline stages")
        ]
    return []


@rule("parallel.activation_checkpointing", "parallel.activation_checkpointing_every", "model.n_layers")
def _checkpointing_every_picks_a_block(spec: JobSpec, _: Any) -> list[Problem]:
    """every_n checkpoints the n-th, 2n-th, … block: past the last layer it checkpoints none, which is `none` under
    another name. Past the layers of one pipeline stage it skips whole stages, which is allowed."""
    p, layers = spec.parallel, spec.model.n_layers
    if p.activation_checkpointing == "every_n" and p.activation_checkpointing_every > layers:
        return [Problem("parallel.activation_checkpointing_every",
                        f"{p.activation_checkpointing_every} with activation_checkpointing=every_n checkpoints no "
                        f"block of model.n_layers={layers}; allowed: 1 to {layers} (or activation_checkpointing=none)")]
    return []


@rule("parallel.activation_offload", "parallel.activation_checkpointing", "parallel.backend", "parallel.pp")
def _offload_what_checkpointing_keeps(spec: JobSpec, _: Any) -> list[Problem]:
    """Offload moves what the blocks keep of the residual stream's shape: the block's input under full
    checkpointing, and under selective the input beside the matmul outputs (with tensor parallelism, the kept
    reductions' outputs too). Without checkpointing a block keeps more tensors of that shape than PCIe carries in its
    forward, and every_n has such blocks; a pipeline schedule interleaves micro-batches' backwards out of the
    forwards' order."""
    p = spec.parallel
    if not p.activation_offload:
        return []
    out = []
    if p.activation_checkpointing not in OFFLOADED_MODES:
        out.append(Problem("parallel.activation_offload", "moves what the blocks keep of the residual stream, "
                           "little under full and selective checkpointing and more than PCIe carries without; set "
                           f"activation_checkpointing=full or selective (it is {p.activation_checkpointing}) or "
                           "activation_offload=false"))
    if p.backend != "native":
        out.append(Problem("parallel.activation_offload", "needs parallel.backend=native"))
    if p.pp > 1:
        out.append(Problem("parallel.activation_offload", f"is not supported with parallel.pp={p.pp}; set pp=1 or "
                           "activation_offload=false"))
    return out


@rule("parallel.loss_chunks", "parallel.backend", "parallel.cp", "parallel.tp", "parallel.sequence_parallel",
      "data.seq_len")
def _loss_chunks_split_a_row(spec: JobSpec, _: Any) -> list[Problem]:
    """The slices are equal parts of what a rank holds of a row, so that the mean of their losses is the row's and
    one compiled loss serves them all."""
    p = spec.parallel
    if p.loss_chunks == 1:
        return []
    out = []
    if p.backend != "native":
        out.append(Problem("parallel.loss_chunks", "needs parallel.backend=native"))
    shards = p.cp * (p.tp if p.sequence_parallel else 1)
    if spec.data.seq_len % (shards * p.loss_chunks):
        held = "data.seq_len / cp" + (" / tp" if p.sequence_parallel and p.tp > 1 else "")
        out.append(Problem("parallel.loss_chunks", f"{p.loss_chunks} slices do not divide a rank's part of a row, "
                           f"{held} = {spec.data.seq_len / shards:g} tokens; pick a divisor of it"))
    return out


@rule("model.dim", "model.n_heads", "model.n_kv_heads", "model.head_dim", "parallel.tp")
def _heads_fit(spec: JobSpec, _: Any) -> list[Problem]:
    """Heads split whole over tp, key/value heads group the query heads evenly, and RoPE rotates pairs of a head's
    dimensions, so a head is even-sized: the resolved head size, head_dim or dim / n_heads."""
    m, tp = spec.model, spec.parallel.tp
    kv = m.n_kv_heads or m.n_heads
    out = []
    if m.head_dim is not None:
        if m.head_dim % 2:
            out.append(Problem("model.head_dim", f"{m.head_dim} must be even for RoPE"))
    elif m.dim % m.n_heads:
        out.append(Problem("model.dim", f"{m.dim} is not divisible by model.n_heads={m.n_heads}"))
    elif spec.head_dim % 2:
        out.append(Problem("model.dim", f"head size {m.dim}/{m.n_heads} = {spec.head_dim} must be even for RoPE"))
    if m.n_heads % tp:
        out.append(Problem("model.n_heads", f"{m.n_heads} heads are not divisible by parallel.tp={tp}"))
    if m.n_kv_heads is not None and m.n_heads % kv:
        out.append(Problem("model.n_kv_heads", f"{kv} does not divide model.n_heads={m.n_heads}"))
    elif kv % tp:
        out.append(Problem("model.n_kv_heads", f"{kv} key/value heads are not divisible by parallel.tp={tp}"))
    return out


@rule("model.vocab_size", "parallel.tp", "data.path")
def _vocab_splits(spec: JobSpec, manifest: dict | None) -> list[Problem]:
    """The vocabulary the model will have (the spec's, or the shards' tokenizer padded) splits over tp; a spec whose
    shards name no tokenizer size must set one, or the model cannot be built."""
    v, tp = spec.model.vocab_size, spec.parallel.tp
    tokens = _manifest_vocab(manifest)
    if v is None and tokens is not None:
        padded = padded_vocab(tokens)
        if padded % tp:
            return [Problem("model.vocab_size", f"the shards' {tokens} tokens padded to {padded} are not divisible "
                            f"by parallel.tp={tp} (vocab-parallel embedding); set model.vocab_size to a multiple of "
                            f"{tp} of at least {tokens}")]
        return []
    if v is None and manifest is not None:
        return [Problem("model.vocab_size", f"not set, and {spec.data.path}/manifest.json names no tokenizer "
                        "vocab_size to take it from; set model.vocab_size")]
    if v is not None and v % tp:
        return [Problem("model.vocab_size", f"{v} is not divisible by parallel.tp={tp} (vocab-parallel embedding)")]
    return []


@rule("model.ffn_dim", "model.dim", "model.multiple_of", "parallel.tp")
def _ffn_splits(spec: JobSpec, _: Any) -> list[Problem]:
    """gate/up are split column-wise and down row-wise over tp, so the SwiGLU width must divide."""
    m, tp = spec.model, spec.parallel.tp
    ffn = m.ffn_dim or default_ffn_dim(m)
    if ffn % tp:
        said = f"{ffn}" if m.ffn_dim else f"the default {ffn} (8/3·dim rounded up to model.multiple_of)"
        return [Problem("model.ffn_dim", f"{said} is not divisible by parallel.tp={tp} (column- and row-parallel "
                        "MLP)")]
    return []


@rule("model.sliding_window", "model.full_attention_every")
def _window_layers(spec: JobSpec, _: Any) -> list[Problem]:
    """full_attention_every picks the layers that skip the window: without a window, or on every layer, it says
    nothing the model would do."""
    window, every = spec.model.sliding_window, spec.model.full_attention_every
    if every and not window:
        return [Problem("model.full_attention_every", f"{every} picks the layers that attend fully instead of through "
                        "a sliding window, but model.sliding_window is 0 (every layer attends fully); set "
                        "model.sliding_window or full_attention_every=0")]
    if every == 1 and window:
        return [Problem("model.full_attention_every", f"1 makes every layer attend fully, so model.sliding_window="
                        f"{window} is never used; use full_attention_every=0 to slide on every layer, 2 or more to "
                        "alternate, or sliding_window=0")]
    return []


@rule("model.attention_mask", "model.rope_positions", "parallel.backend", "parallel.pp")
def _documents_where_they_reach(spec: JobSpec, _: Any) -> list[Problem]:
    """Document ids reach every pipeline stage only through the native schedule's keyword inputs; DeepSpeed's
    pipeline engine passes one tensor from stage to stage. Restarting RoPE per document while attention crosses
    documents would let a token see keys whose positions are not comparable to its own."""
    m, p = spec.model, spec.parallel
    out = []
    if m.rope_positions == "document" and m.attention_mask != "document":
        out.append(Problem("model.rope_positions", "document restarts positions at each document, so it needs "
                           "model.attention_mask=document (attention across documents would compare positions of "
                           "different documents); set both, or rope_positions=sequence"))
    if m.attention_mask == "document" and p.backend == "deepspeed" and p.pp > 1:
        tied = " (native cannot tie embeddings under pp > 1: untie them to use it)" if m.tie_embeddings else ""
        out.append(Problem("model.attention_mask", f"document under parallel.pp={p.pp} needs parallel.backend=native:"
                           f" DeepSpeed's pipeline engine carries one tensor between stages, not the document ids"
                           f"{tied}; use the native backend, pp=1, or attention_mask=causal"))
    return out


@rule("model.rope_scaling.type", "model.rope_scaling.factor", "model.rope_scaling.low_freq_factor",
      "model.rope_scaling.high_freq_factor", "model.rope_scaling.beta_fast", "model.rope_scaling.beta_slow")
def _rope_scaling_consistent(spec: JobSpec, _: Any) -> list[Problem]:
    """Each scaling type reads its own parameters; values that contradict the type would be silently ignored, or
    divide by zero (llama3's ramp runs from low_freq_factor to high_freq_factor)."""
    r = spec.model.rope_scaling
    where = "model.rope_scaling"
    if r.type == "none" and r.factor != 1:
        return [Problem(f"{where}.factor", f"{r.factor} with {where}.type=none stretches nothing; set type to linear, "
                        "llama3 or yarn, or factor to 1")]
    if r.type == "llama3" and not 0 < r.low_freq_factor < r.high_freq_factor:
        return [Problem(f"{where}.high_freq_factor", f"{r.high_freq_factor} with low_freq_factor={r.low_freq_factor}:"
                        " llama3 scaling needs 0 < low_freq_factor < high_freq_factor (Llama 3.1: 1 and 4)")]
    if r.type == "yarn" and r.beta_fast < r.beta_slow:
        return [Problem(f"{where}.beta_fast", f"{r.beta_fast} is below beta_slow={r.beta_slow}: yarn keeps the "
                        "frequencies rotating more than beta_fast times and stretches those below beta_slow "
                        "(defaults 32 and 1)")]
    return []


@rule("data.seq_len", "model.max_positions")
def _sequence_within_context(spec: JobSpec, _: Any) -> list[Problem]:
    """A model said to be meant for max_positions tokens is not trained on longer sequences."""
    seq, context = spec.data.seq_len, spec.model.max_positions
    if context and seq > context:
        return [Problem("data.seq_len", f"{seq} is longer than model.max_positions={context}, the context the model "
                        "is meant for; shorten data.seq_len or raise model.max_positions (0: data.seq_len)")]
    return []


@rule("data.seq_len", "parallel.tp", "parallel.sequence_parallel")
def _sequence_splits(spec: JobSpec, _: Any) -> list[Problem]:
    """Sequence parallelism shards the residual stream along the sequence over the tp ranks."""
    p, seq = spec.parallel, spec.data.seq_len
    if p.sequence_parallel and p.tp > 1 and seq % p.tp:
        return [Problem("data.seq_len", f"{seq} is not divisible by parallel.tp={p.tp}, as parallel.sequence_parallel "
                        "needs to split the sequence")]
    return []


@rule("parallel.zero_stage", "parallel.pp", "parallel.backend")
def _zero_with_pipeline(spec: JobSpec, _: Any) -> list[Problem]:
    p = spec.parallel
    if p.backend == "deepspeed" and p.pp > 1 and p.zero_stage >= 2:
        return [
            Problem("parallel.zero_stage", f"ZeRO stage {p.zero_stage} with parallel.pp={p.pp}: DeepSpeed's pipeline "
                    "engine supports only stage 0 or 1; use zero_stage=1, pp=1, or parallel.backend=native")
        ]
    return []


@rule("parallel.pp_schedule", "parallel.backend", "parallel.pp", "parallel.grad_accum", "parallel.compile",
      "model.n_layers")
def _pipeline_schedule(spec: JobSpec, _: Any) -> list[Problem]:
    p, layers = spec.parallel, spec.model.n_layers
    if p.pp == 1:
        return []
    if p.backend == "deepspeed" and p.pp_schedule != "1f1b":
        return [Problem("parallel.pp_schedule", f"{p.pp_schedule!r}: DeepSpeed's pipeline engine runs only '1f1b'; "
                        "use parallel.backend=native for interleaved_1f1b or zero_bubble")]
    if p.backend != "native":
        return []
    out = []
    if p.pp_schedule == "1f1b" and p.grad_accum < p.pp:
        out.append(Problem("parallel.grad_accum", f"{p.grad_accum} micro-batches are fewer than parallel.pp={p.pp} "
                           "stages; 1F1B needs at least one per stage"))
    if p.pp_schedule != "1f1b":
        if p.grad_accum % p.pp:
            out.append(Problem("parallel.grad_accum", f"{p.grad_accum} is not a multiple of parallel.pp={p.pp}, as "
                               f"the {p.pp_schedule} schedule's rounds need"))
        if layers % (2 * p.pp):
            out.append(Problem("model.n_layers", f"{layers} layers do not split into 2 × parallel.pp={p.pp} "
                               f"stages ({p.pp_schedule} runs two stages per rank)"))
    if p.pp_schedule == "zero_bubble" and p.compile:
        out.append(Problem("parallel.compile", "zero_bubble splits each backward into input and weight gradients, "
                           "which torch.compile'd blocks do not support; use compile=false or another pp_schedule"))
    return out


@rule("parallel.backend", "parallel.pp", "model.tie_embeddings", "parallel.offload_optimizer")
def _native_limits(spec: JobSpec, _: Any) -> list[Problem]:
    p = spec.parallel
    if p.backend != "native":
        return []
    out = []
    if p.pp > 1 and spec.model.tie_embeddings:
        out.append(Problem("model.tie_embeddings", f"with parallel.pp={p.pp} the native backend cannot share one "
                           "weight between the first and the last stage; use tie_embeddings=false or "
                           "parallel.backend=deepspeed"))
    if p.offload_optimizer:
        out.append(Problem("parallel.offload_optimizer", "not available with parallel.backend=native; use "
                           "parallel.backend=deepspeed to keep optimizer states in host memory"))
    return out


@rule("parallel.float8", "parallel.backend", "parallel.tp")
def _float8_where_it_runs(spec: JobSpec, _: Any) -> list[Problem]:
    """FP8 goes through torchao on the native engine, before tensor parallelism would need its float8 plans."""
    p = spec.parallel
    if p.float8 == "none":
        return []
    out = []
    if p.backend != "native":
        out.append(Problem("parallel.float8", f"{p.float8} needs parallel.backend=native (torchao's float8 layers); "
                           "DeepSpeed's engine trains in bf16 or fp32"))
    if p.tp > 1:
        out.append(Problem("parallel.float8", f"{p.float8} with parallel.tp={p.tp} is not supported; shard with "
                           "data parallelism (FSDP, zero_stage 3) or pipeline stages instead, or set float8=none"))
    if importlib.util.find_spec("torchao") is None:
        out.append(Problem("parallel.float8", f"{p.float8} needs the torchao package: pip install 'pretrain[fp8]'"))
    return out


@rule("metrics.loggers", "metrics.enabled")
def _trackers_installed(spec: JobSpec, _: Any) -> list[Problem]:
    missing = spec.metrics.missing_trackers()
    if missing:
        return [Problem("metrics.loggers", f"{', '.join(missing)} named but not installed here: {TRACKERS_INSTALL}, "
                        "or take it out of the list")]
    return []


@rule("model.lora.rank", "model.lora.targets", "model.dim", "parallel.backend", "parallel.float8",
      "model.parametrization")
def _lora_where_it_runs(spec: JobSpec, _: Any) -> list[Problem]:
    """Adapters go on the projections the model has, on the native engine, in plain (bf16/fp32) linear layers of the
    standard parametrization (`parallel.lora`)."""
    lora, m, p = spec.model.lora, spec.model, spec.parallel
    names = [t.strip() for t in lora.targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in LORA_TARGETS]
    out = []
    if unknown:
        out.append(Problem("model.lora.targets", f"{', '.join(map(repr, unknown))} not a projection of the model; "
                           f"allowed: {', '.join(LORA_TARGETS)}"))
    if not lora.rank:
        return out
    if not names:
        out.append(Problem("model.lora.targets", f"empty with model.lora.rank={lora.rank}: name the projections that "
                           f"get adapters, of {', '.join(LORA_TARGETS)}"))
    if lora.rank > m.dim:
        out.append(Problem("model.lora.rank", f"{lora.rank} is above model.dim={m.dim}: an update of that rank is a "
                           "full one; use a rank well below dim, or train every weight (rank 0)"))
    if p.backend != "native":
        out.append(Problem("model.lora.rank", f"{lora.rank} needs parallel.backend=native (the spec runs "
                           f"{p.backend}); DeepSpeed's engine trains every weight"))
    if p.float8 != "none":
        out.append(Problem("parallel.float8", f"{p.float8} with model.lora.rank={lora.rank}: the adapted projections "
                           "are not float8 layers; set float8=none"))
    if m.parametrization != "standard":
        out.append(Problem("model.lora.rank", f"{lora.rank} with model.parametrization={m.parametrization}: adapters "
                           "continue an imported model, which is in the standard parametrization"))
    return out


@rule("model.moe.num_experts", "model.moe.top_k", "model.moe.every_n_layers", "model.moe.first_dense_layers",
      "model.moe.balance", "model.moe.aux_loss_coef", "model.moe.bias_update_rate", "model.n_layers")
def _moe_consistent(spec: JobSpec, _: Any) -> list[Problem]:
    """The router chooses among the experts there are, some layer is an MoE layer, and the balancing method chosen
    has a non-zero strength (`parallel.moe`)."""
    moe, layers = spec.model.moe, spec.model.n_layers
    if not moe.num_experts:
        return []
    out = []
    if moe.num_experts == 1:
        out.append(Problem("model.moe.num_experts", "1: a single expert is a dense MLP; use 0 (dense) or 2 or more"))
    elif moe.top_k > moe.num_experts:
        out.append(Problem("model.moe.top_k", f"{moe.top_k} is more than model.moe.num_experts={moe.num_experts}: a "
                           "token is sent to top_k different experts"))
    if moe.first_dense_layers >= layers:
        out.append(Problem("model.moe.first_dense_layers", f"{moe.first_dense_layers} leaves no MoE layer of "
                           f"model.n_layers={layers}; allowed: 0 to {layers - 1}"))
    elif not any((i + 1) % moe.every_n_layers == 0 for i in range(moe.first_dense_layers, layers)):
        out.append(Problem("model.moe.every_n_layers", f"{moe.every_n_layers} picks no layer of model.n_layers="
                           f"{layers} after the first_dense_layers={moe.first_dense_layers}; allowed: 1 to {layers}"))
    if moe.balance != "aux_free" and not moe.aux_loss_coef:
        out.append(Problem("model.moe.aux_loss_coef", f"0 with model.moe.balance={moe.balance} turns the balancing "
                           "loss off; set a coefficient (Switch: 1e-2, DeepSeek-V3: 1e-4) or balance=aux_free"))
    if moe.balance != "aux_loss" and not moe.bias_update_rate:
        out.append(Problem("model.moe.bias_update_rate", f"0 with model.moe.balance={moe.balance} never moves the "
                           "bias; set a rate (DeepSeek-V3: 1e-3) or balance=aux_loss"))
    return out


@rule("model.moe.num_experts", "parallel.backend", "model.lora.rank", "model.lora.targets")
def _moe_where_it_runs(spec: JobSpec, _: Any) -> list[Problem]:
    """MoE layers run on the native engine (under tp replicated, `parallel.dtensor_tp`), and take no LoRA adapters
    on their experts (an MoE layer's projections are 3-D expert weights, not linear layers)."""
    m, p = spec.model, spec.parallel
    experts = m.moe.num_experts
    if not experts:
        return []
    out = []
    if p.backend != "native":
        out.append(Problem("parallel.backend", f"{p.backend} cannot train model.moe.num_experts={experts}: "
                           "mixture-of-experts layers run on parallel.backend=native (or auto)"))
    mlp = [t.strip() for t in m.lora.targets.split(",") if t.strip() in ("gate_proj", "up_proj", "down_proj")]
    if m.lora.rank and mlp:
        out.append(Problem("model.lora.targets", f"{', '.join(mlp)} with model.moe.num_experts={experts}: adapters "
                           "go on linear layers, not on experts; target the attention projections only "
                           "(q_proj,k_proj,v_proj,o_proj)"))
    return out


@rule("parallel.ep", "model.moe.num_experts", "parallel.backend", "parallel.dp", "parallel.cp", "parallel.pp",
      "parallel.tp", "resources.num_nodes", "resources.gpus_per_node")
def _expert_parallel(spec: JobSpec, _: Any) -> list[Problem]:
    """Expert parallelism is the native engine's (`parallel.expert_parallel`): an MoE layer's experts split evenly
    over ep ranks taken from dp × cp (whole cp groups, so the mesh splits dp), which stay inside a node or take
    whole nodes."""
    p, r, ep, experts = spec.parallel, spec.resources, spec.parallel.ep, spec.model.moe.num_experts
    if ep == 1:
        return []
    if not experts:
        return [Problem("parallel.ep", f"{ep} splits the experts of an MoE model, but model.moe.num_experts is 0 "
                        "(a dense model); set model.moe.num_experts or parallel.ep=1")]
    out = []
    if p.backend != "native":
        out.append(Problem("parallel.ep", f"{ep} needs parallel.backend=native; the DeepSpeed engine has no expert "
                           "parallelism (set parallel.ep=1, or parallel.backend=native)"))
    if experts % ep:
        out.append(Problem("parallel.ep", f"{ep} does not divide model.moe.num_experts={experts}: every ep rank holds "
                           "the same number of experts"))
    data = (p.dp or spec.world_size // (p.cp * p.pp * p.tp) or 1) * p.cp
    if data % ep:
        out.append(Problem("parallel.ep", f"{ep} does not divide dp × cp = {data}, the ranks the experts are split "
                           "over (ep adds no ranks: raise dp or lower parallel.ep)"))
    elif ep % p.cp:
        out.append(Problem("parallel.ep", f"{ep} is not a multiple of parallel.cp={p.cp}: an ep group takes whole "
                           "context-parallel groups"))
    group = ep * p.tp
    if r.num_nodes > 1 and r.gpus_per_node % group and group % r.gpus_per_node:
        out.append(Problem("parallel.ep", f"ep={ep} × tp={p.tp} ranks would straddle nodes: each of the "
                           f"resources.num_nodes={r.num_nodes} nodes runs resources.gpus_per_node={r.gpus_per_node} "
                           f"consecutive ranks; make gpus_per_node a multiple of {group} (or {group} a multiple of "
                           "it) or change parallel.ep"))
    return out


@rule("parallel.global_batch_size", "parallel.micro_batch_size", "parallel.grad_accum", "parallel.dp",
      "parallel.cp", "parallel.pp", "parallel.tp", "resources.num_nodes", "resources.gpus_per_node")
def _global_batch(spec: JobSpec, _: Any) -> list[Problem]:
    p = spec.parallel
    dp = p.dp or spec.world_size // (p.cp * p.pp * p.tp) or 1
    product = p.micro_batch_size * p.grad_accum * dp
    if p.global_batch_size and p.global_batch_size != product:
        return [
            Problem("parallel.global_batch_size", f"{p.global_batch_size} ≠ micro_batch_size={p.micro_batch_size} × "
                    f"grad_accum={p.grad_accum} × dp={dp} = {product}")
        ]
    return []


@rule("eval.tasks", "eval.every", "eval.include_path", "schedule.eval_every", "parallel.pp")
def _downstream_eval_runs(spec: JobSpec, _: Any) -> list[Problem]:
    e = spec.eval
    if not e.tasks.strip(" ,"):
        return []
    out = []
    if not (e.every or spec.schedule.eval_every):
        out.append(Problem("eval.every", f"0 with schedule.eval_every=0: eval.tasks={e.tasks!r} would never run; "
                           "set eval.every"))
    if spec.parallel.pp > 1:
        out.append(Problem("eval.tasks", f"downstream evaluation in the loop needs a plain forward, which "
                           f"parallel.pp={spec.parallel.pp} does not have; evaluate the checkpoints with `pretrain "
                           "eval` instead"))
    if e.include_path and not os.path.isdir(e.include_path):
        out.append(Problem("eval.include_path", f"{e.include_path!r} is not a directory (of lm-eval task YAML files)"))
    return out


@rule("data.seq_len", "model.vocab_size", "data.path")
def _fits_the_data(spec: JobSpec, manifest: dict | None) -> list[Problem]:
    if manifest is None:
        return []
    out = []
    data_len = manifest.get("seq_len")
    if isinstance(data_len, int) and spec.data.seq_len > data_len:
        out.append(Problem("data.seq_len", f"{spec.data.seq_len} is longer than the shards' seq_len {data_len} "
                           f"({spec.data.path}/manifest.json)"))
    tokens = _manifest_vocab(manifest)
    v = spec.model.vocab_size
    if tokens is not None and v is not None and v < tokens:
        preset = "" if spec.model.family == "custom" else (
            f"; model.family={spec.model.family} brings its own vocabulary: set model.vocab_size to null to size it "
            "from the shards' tokenizer instead")
        out.append(Problem("model.vocab_size", f"{v} is smaller than the tokenizer's {tokens} tokens{preset}"))
    return out


@rule("schedule.warmup_steps", "schedule.steps")
def _warmup_within_steps(spec: JobSpec, _: Any) -> list[Problem]:
    s = spec.schedule
    if s.warmup_steps > s.steps:
        return [Problem("schedule.warmup_steps", f"{s.warmup_steps} is more than schedule.steps={s.steps}")]
    return []


@rule("optim.min_lr", "optim.lr")
def _min_lr_below_peak(spec: JobSpec, _: Any) -> list[Problem]:
    if spec.optim.min_lr > spec.optim.lr:
        return [Problem("optim.min_lr", f"{spec.optim.min_lr} is above optim.lr={spec.optim.lr}")]
    return []


@rule("resources.min_nodes", "resources.num_nodes")
def _min_nodes_within_nodes(spec: JobSpec, _: Any) -> list[Problem]:
    r = spec.resources
    if r.min_nodes > r.num_nodes:
        return [Problem("resources.min_nodes", f"{r.min_nodes} is more than resources.num_nodes={r.num_nodes}")]
    return []


@rule("data.skip")
def _skip_windows_readable(spec: JobSpec, _: Any) -> list[Problem]:
    try:
        parse_windows(spec.data.skip)
    except ValueError as e:
        return [Problem("data.skip", f"{e}; write comma-separated EPOCH:START-END windows of sample positions")]
    return []


@rule("spikes.action", "parallel.backend")
def _spike_skip_where_it_runs(spec: JobSpec, _: Any) -> list[Problem]:
    """DeepSpeed's step reduces the gradients and applies the update inside one call (`parallel.spikes`)."""
    if spec.spikes.action == "skip" and spec.parallel.backend == "deepspeed":
        return [Problem("spikes.action", "skip needs parallel.backend=native: DeepSpeed applies an update inside its "
                        "own step, with no point to drop it at; use spikes.action=rewind (back to the last "
                        "checkpoint, skipping the data since) or alert")]
    return []


@rule("profile.at_step", "checkpoint.dir")
def _profiles_beside_local_checkpoints(spec: JobSpec, _: Any) -> list[Problem]:
    if spec.profile.at_step and "://" in spec.checkpoint.dir:
        return [Problem("profile.at_step", f"profiles are written beside the checkpoints, on a local or mounted "
                        f"filesystem; checkpoint.dir={spec.checkpoint.dir!r} is remote: set profile.at_step=0")]
    return []


@rule("model.parametrization", "model.mup_base_dim", "model.tie_embeddings", "model.scale_embeddings",
      "model.attn_scale_dim", "checkpoint.init_from")
def _mup_consistent(spec: JobSpec, _: Any) -> list[Problem]:
    """μP scales the embedding and the lm_head differently and sets the attention scale itself (`parallel.mup`)."""
    m = spec.model
    if m.parametrization != "mup":
        return [Problem("model.mup_base_dim", f"{m.mup_base_dim} is only read with model.parametrization=mup; set "
                        "it to 0 or use mup")] if m.mup_base_dim else []
    why = "with model.parametrization=mup"
    out = []
    if not m.mup_base_dim:
        out.append(Problem("model.mup_base_dim", f"must be set {why}: the width (model.dim) at which optim.lr and "
                           "model.init_std were tuned, e.g. the width of the sweep that chose them"))
    if m.tie_embeddings:
        out.append(Problem("model.tie_embeddings", f"must be false {why}: μP multiplies the logits, not the "
                           "embedding, by mup_base_dim/dim, so one shared weight cannot serve both"))
    if m.scale_embeddings:
        out.append(Problem("model.scale_embeddings", f"must be false {why}: embeddings × sqrt(dim) grow with width, "
                           "what μP keeps constant"))
    if m.attn_scale_dim:
        out.append(Problem("model.attn_scale_dim", f"must be null {why}: μP scales attention scores by 1/head_dim"))
    if spec.checkpoint.init_from:
        out.append(Problem("checkpoint.init_from", f"cannot be used {why}: an imported model is in the standard "
                           "parametrization; continue it with parametrization=standard"))
    return out


# ---------------------------------------------------------------------------------------------- resolution


def _resolve(spec: JobSpec, manifest: dict | None) -> JobSpec:
    """Fill the values left open (dp, vocab size from the shards, kv heads, ffn size) so consumers never guess."""
    spec = parse_config(JobSpec, spec_to_dict(spec), source="resolved spec")
    p, m = spec.parallel, spec.model
    if p.dp == 0:
        p.dp = spec.world_size // (p.cp * p.pp * p.tp)
    if not p.global_batch_size:
        p.global_batch_size = p.micro_batch_size * p.grad_accum * p.dp
    if m.n_kv_heads is None:
        m.n_kv_heads = m.n_heads
    if m.ffn_dim is None:
        m.ffn_dim = default_ffn_dim(m)
    tokens = _manifest_vocab(manifest)
    if m.vocab_size is None and tokens is not None:
        m.vocab_size = padded_vocab(tokens)
    return spec


def default_ffn_dim(model: ModelConfig) -> int:
    """Llama's SwiGLU width: 2/3 of 4·dim (three matrices instead of two), rounded up to multiple_of."""
    return model.multiple_of * math.ceil(int(8 * model.dim / 3) / model.multiple_of)


def padded_vocab(tokens: int) -> int:
    return VOCAB_PAD * math.ceil(tokens / VOCAB_PAD)
