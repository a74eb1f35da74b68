"""The job spec: one YAML file (plus `section.key=value` overrides) describes a whole pretraining run.

Sections are dataclasses so that OmegaConf, the validator and every consumer agree on one schema. A field's
allowed range lives beside it in `metadata` (`min`, `max`, `choices`), so the validator, the docs and the error
messages read from the same place. Loading and checking live in `orchestrator.validate`.

Like `orchestrator.errors`, this module is a contract leaf: `parallel`, `cluster` and the CLI import it; it imports
nothing of the project.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str, **limits: Any) -> Any:
    """A field with its help text and limits (min, max, choices) kept where the field is declared."""
    return field(default=default, metadata={"help": help, **limits})


@dataclass
class ModelConfig:
    """A decoder-only Llama-style transformer (RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases)."""

    vocab_size: int | None = _f(None, "vocabulary size; null takes the shards' tokenizer size, padded to 128", min=2)
    dim: int = _f(256, "hidden size", min=8)
    n_layers: int = _f(4, "transformer blocks", min=1)
    n_heads: int = _f(4, "attention heads", min=1)
    n_kv_heads: int | None = _f(None, "key/value heads (grouped-query attention); null means n_heads", min=1)
    ffn_dim: int | None = _f(None, "SwiGLU hidden size; null means 8/3·dim rounded up to multiple_of", min=1)
    multiple_of: int = _f(64, "rounding of the default ffn_dim", min=1)
    norm_eps: float = _f(1e-5, "RMSNorm epsilon", min=0.0)
    rope_theta: float = _f(10000.0, "RoPE base frequency", min=1.0)
    tie_embeddings: bool = _f(False, "share the input embedding with the output projection")
    init_std: float = _f(0.02, "std of the normal initialisation", min=0.0)


@dataclass
class DataConfig:
    """Training data: a shard directory written by `pretrain prep`."""

    path: str = _f("", "directory holding manifest.json and the Arrow shards")
    seq_len: int = _f(256, "tokens per training sequence; at most the shards' seq_len", min=8)
    seed: int = _f(1234, "seed of the global sample order")
    prefetch: int = _f(2, "batches read ahead by the loader thread", min=0)


@dataclass
class ParallelConfig:
    """How the model is split over ranks: dp × pp × tp must equal the number of ranks."""

    backend: str = _f("deepspeed", "parallel engine", choices=("deepspeed", "native"))
    dp: int = _f(0, "data-parallel size; 0 means ranks / (pp·tp)", min=0)
    pp: int = _f(1, "pipeline stages", min=1)
    tp: int = _f(1, "tensor-parallel size", min=1)
    zero_stage: int = _f(1, "ZeRO optimizer sharding stage", choices=(0, 1, 2, 3))
    sequence_parallel: bool = _f(False, "shard activations along the sequence between tensor-parallel regions")
    activation_checkpointing: bool = _f(False, "recompute block activations in the backward pass")
    micro_batch_size: int = _f(4, "sequences per rank per micro-batch", min=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step (pipeline micro-batches when pp > 1)", min=1)
    global_batch_size: int = _f(0, "sequences per optimizer step; 0 means micro_batch_size·grad_accum·dp", min=0)
    precision: str = _f("bf16", "training precision", choices=("bf16", "fp32"))
    offload_optimizer: bool = _f(False, "keep optimizer states in host memory (ZeRO 1-3)")
    compile: bool = _f(False, "torch.compile each transformer block")


@dataclass
class OptimConfig:
    """AdamW; norms and embeddings get no weight decay."""

    lr: float = _f(3e-4, "peak learning rate", min=0.0)
    min_lr: float = _f(3e-5, "learning rate at the end of the decay", min=0.0)
    weight_decay: float = _f(0.1, "decoupled weight decay", min=0.0)
    beta1: float = _f(0.9, "Adam beta1", min=0.0, max=1.0)
    beta2: float = _f(0.95, "Adam beta2", min=0.0, max=1.0)
    eps: float = _f(1e-8, "Adam epsilon", min=0.0)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 disables", min=0.0)


@dataclass
class ScheduleConfig:
    """Steps, learning-rate schedule, evaluation and logging cadence."""

    steps: int = _f(1000, "optimizer steps", min=1)
    warmup_steps: int = _f(100, "linear warmup steps", min=0)
    lr_schedule: str = _f("cosine", "shape after warmup", choices=("cosine", "wsd", "constant"))
    decay_fraction: float = _f(0.2, "wsd: fraction of steps spent decaying at the end", min=0.0, max=1.0)
    eval_every: int = _f(100, "steps between validation passes; 0 disables", min=0)
    eval_batches: int = _f(10, "batches per validation pass", min=1)
    log_every: int = _f(10, "steps between log lines", min=1)
    seed: int = _f(0, "seed of initialisation and every other random choice")


@dataclass
class CheckpointConfig:
    """Where and how often to checkpoint, and what to keep."""

    dir: str = _f("runs/${name}/checkpoints", "checkpoint directory: a local path or a pyarrow.fs URI (s3://, gs://)")
    every: int = _f(100, "steps between checkpoints; 0 saves only at the end", min=0)
    keep_last: int = _f(3, "newest checkpoints kept", min=1)
    keep_every: int = _f(0, "also keep every checkpoint whose step is a multiple of this; 0 keeps none extra", min=0)
    resume: bool = _f(True, "resume from the newest good checkpoint in dir")
    async_save: bool = _f(True, "write checkpoint files in the background after copying state to host memory")
    init_from: str = _f("", "initialise weights from this checkpoint or Hugging Face directory (continued pretraining)")


@dataclass
class MetricsConfig:
    """Prometheus exporters of the ranks and the controller."""

    enabled: bool = _f(True, "serve Prometheus metrics")
    host: str = _f("0.0.0.0", "address the exporters bind")
    port: int = _f(0, "first exporter port; 0 picks free ports", min=0, max=65535)
    targets_file: str = _f("", "file_sd targets file for Prometheus; empty means <checkpoint.dir>/../targets.json")
    peak_flops: float = _f(989e12, "dense bf16 FLOP/s of one device, the MFU denominator (H100 SXM: 989e12)", min=1.0)


@dataclass
class ResourcesConfig:
    """What the run asks of the cluster, and how it survives failures."""

    device: str = _f("auto", "accelerator; auto means cuda when present, else cpu", choices=("auto", "cuda", "cpu"))
    num_nodes: int = _f(1, "nodes", min=1)
    gpus_per_node: int = _f(1, "ranks per node: GPUs, or processes on CPU", min=1)
    min_nodes: int = _f(0, "fewest nodes to continue on after a node is lost; 0 means num_nodes", min=0)
    cpus_per_rank: float = _f(1.0, "CPUs reserved per rank", min=0.0)
    max_restarts: int = _f(3, "gang restarts before the job fails", min=0)
    restart_backoff_s: float = _f(5.0, "first wait before a restart; doubles each time", min=0.0)
    hang_timeout_s: float = _f(600.0, "restart when no rank advances for this long", min=1.0)
    straggler_factor: float = _f(1.5, "a rank slower than factor × the median step time is a straggler", min=1.0)


@dataclass
class JobSpec:
    """A pretraining run."""

    name: str = _f("pretrain", "run name; the `run` label of every metric")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    @property
    def world_size(self) -> int:
        return self.resources.num_nodes * self.resources.gpus_per_node

    @property
    def head_dim(self) -> int:
        return self.model.dim // self.model.n_heads
