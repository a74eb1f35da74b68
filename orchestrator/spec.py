"""The job spec: one YAML file (plus `section.key=value` overrides) describes a whole pretraining run.

Sections are dataclasses so that OmegaConf, the validator and every consumer agree on one schema. A field's
allowed range lives beside it in `metadata` (`min`, `max`, `choices`), so the validator, the help text and the error
messages read from the same place; every number has both bounds. Loading and checking live in
`orchestrator.validate`.

`parallel`, `cluster` and the CLI import this module; it imports only `orchestrator.config_parser` (for `setting`),
which imports nothing of the project but `orchestrator.errors`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field

from omegaconf import OmegaConf

from orchestrator.config_parser import SEED_MAX, setting

STEPS_MAX = 10**9


@dataclass
class RopeScalingConfig:
    """RoPE frequencies stretched past the context the model was trained on (Llama 3.1's, YaRN, linear)."""

    type: str = setting("none", "none: plain RoPE; linear: every frequency / factor; llama3: long wavelengths / "
                        "factor, short ones kept; yarn: per-rotation ramp and an attention temperature",
                        choices=("none", "linear", "llama3", "yarn"))
    factor: float = setting(1.0, "context extension factor", min=1.0, max=1024.0)
    original_max_positions: int = setting(8192, "llama3, yarn: the context the unscaled model was trained for",
                                          min=1, max=2**24)
    low_freq_factor: float = setting(1.0, "llama3: wavelengths above original/this are divided by factor",
                                     min=0.0, max=1024.0)
    high_freq_factor: float = setting(4.0, "llama3: wavelengths below original/this are kept", min=0.0,
                                      max=1024.0)
    beta_fast: float = setting(32.0, "yarn: rotations above which frequencies are kept", min=0.0, max=1e6)
    beta_slow: float = setting(1.0, "yarn: rotations below which frequencies are divided by factor", min=0.0,
                               max=1e6)
    attention_factor: float = setting(0.0, "yarn: scale of cos/sin; 0: 0.1·ln(factor) + 1", min=0.0, max=100.0)


# The checkpointing modes under which a block keeps few tensors of the residual stream's shape (its input; under tp
# with selective also the kept reductions' outputs), which `parallel.activation_offload` moves to host memory.
OFFLOADED_MODES = ("full", "selective")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """Low-rank adapters (Hu et al., LoRA) on the blocks' linear layers: the model's weights frozen, W·x + (alpha/rank)
    ·B·A·dropout(x) trained through A (rank × in) and B (out × rank, zero at the start); for continued pretraining of
    an imported model (checkpoint.init_from), native backend (docs/models.md)."""

    rank: int = setting(0, "adapter rank; 0: no adapters, every weight trained", min=0, max=4096)
    alpha: float = setting(16.0, "the adapters' output is scaled by alpha / rank", min=0.0, max=1e6)
    dropout: float = setting(0.0, "dropout on the adapters' input", min=0.0, max=0.9)
    targets: str = setting(",".join(LORA_TARGETS), "comma-separated projections that get adapters, of "
                           + ", ".join(LORA_TARGETS))


@dataclass
class MoEConfig:
    """Mixture of experts (Shazeer et al.; Switch, Mixtral, DeepSeek-V3, Qwen3-MoE): the MLP of the chosen layers
    replaced by a router and `num_experts` SwiGLU experts, each token sent to its `top_k` experts and their outputs
    added by the router's weights; native backend (docs/models.md)."""

    num_experts: int = setting(0, "routed experts per MoE layer; 0: a dense model", min=0, max=4096)
    top_k: int = setting(2, "experts each token is sent to, at most num_experts", min=1, max=64)
    num_shared_experts: int = setting(0, "experts every token passes through besides the routed ones (DeepSeek), "
                                      "one MLP of num_shared_experts·expert_ffn_dim", min=0, max=64)
    every_n_layers: int = setting(1, "layer i is an MoE layer when (i+1) % every_n_layers == 0; 1: every layer",
                                  min=1, max=1024)
    first_dense_layers: int = setting(0, "the first layers keep a dense MLP (DeepSeek-V3: 3)", min=0, max=1024)
    expert_ffn_dim: int | None = setting(None, "hidden size of one expert; null: model.ffn_dim", min=1, max=2**20)
    score: str = setting("softmax", "router scores: softmax over the experts (Mixtral, Qwen3-MoE) or a sigmoid per "
                         "expert (DeepSeek-V3)", choices=("softmax", "sigmoid"))
    norm_topk: bool = setting(True, "renormalise the chosen experts' weights to sum to one (Mixtral, Qwen3-MoE, "
                              "DeepSeek-V3); false: the raw scores")
    balance: str = setting("aux_free", "load balancing: aux_free: a per-expert bias added to the scores for the "
                           "choice only, moved after each step toward the less loaded experts (DeepSeek-V3); "
                           "aux_loss: the Switch balancing loss; both", choices=("aux_free", "aux_loss", "both"))
    aux_loss_coef: float = setting(1e-3, "weight of the balancing loss (read with balance aux_loss or both)",
                                   min=0.0, max=10.0)
    aux_loss_per: str = setting("sequence", "what the balancing loss balances: each sequence (DeepSeek-V3's "
                                "sequence-wise loss; the same in every layout) or each micro-batch (Switch)",
                                choices=("sequence", "batch"))
    bias_update_rate: float = setting(1e-3, "aux_free: the bias step per optimizer step, toward balance", min=0.0,
                                      max=1.0)
    capacity_factor: float = setting(0.0, "tokens an expert takes per micro-batch, as a multiple of the even share "
                                     "(tokens·top_k/num_experts); the rest are dropped (their expert output is "
                                     "zero) and counted; 0: dropless", min=0.0, max=64.0)
    router_z_loss_coef: float = setting(0.0, "weight of the router z-loss, mean of logsumexp(logits)² (ST-MoE); "
                                        "0: off", min=0.0, max=10.0)


@dataclass
class ModelConfig:
    """A decoder-only transformer: by default Llama's (pre-norm RMSNorm, SwiGLU, RoPE, grouped-query attention, no
    biases); the switches below give the other families' variants, and `family` fills them in one word."""

    family: str = setting("custom", "preset filling every model field the spec and its overrides leave unset with "
                          "the family's published values (docs/models.md); custom: the defaults shown",
                          choices=("custom", "llama2", "llama3", "qwen2", "qwen3", "mistral", "olmo2", "gemma2"))
    size: str = setting("", "with family: the published checkpoint whose dimensions to fill (e.g. qwen3 1.7b, "
                        "llama3 8b; docs/models.md lists them); empty: the spec's own dimensions")
    vocab_size: int | None = setting(None, "vocab size; null: the shards' tokenizer size, padded to 1024", min=2,
                                      max=2**22)
    dim: int = setting(256, "hidden size", min=8, max=65536)
    n_layers: int = setting(4, "transformer blocks", min=1, max=1024)
    n_heads: int = setting(4, "attention heads", min=1, max=1024)
    n_kv_heads: int | None = setting(None, "key/value heads (grouped-query attention); null means n_heads", min=1,
                                      max=1024)
    head_dim: int | None = setting(None, "size of one attention head, even (RoPE); null means dim / n_heads", min=2,
                                   max=4096)
    ffn_dim: int | None = setting(None, "MLP hidden size; null means 8/3·dim rounded up to multiple_of",
                                  min=1, max=2**20)
    multiple_of: int = setting(64, "rounding of the default ffn_dim", min=1, max=4096)
    activation: str = setting("silu", "gated MLP activation: silu (SwiGLU) or gelu_tanh (GeGLU, Gemma)",
                              choices=("silu", "gelu_tanh"))
    norm_eps: float = setting(1e-5, "RMSNorm epsilon", min=0.0, max=1.0)
    norm_placement: str = setting("pre", "pre: norm before attention and MLP (Llama); post: norm on their outputs "
                                  "(OLMo 2); sandwich: both (Gemma 2)", choices=("pre", "post", "sandwich"))
    qkv_bias: bool = setting(False, "biases on the query, key and value projections (Qwen2)")
    qk_norm: str = setting("none", "RMSNorm of queries and keys before RoPE: none; head: over each head (Qwen3); "
                           "full: over all heads together (OLMo 2)", choices=("none", "head", "full"))
    rope_theta: float = setting(10000.0, "RoPE base frequency", min=1.0, max=1e10)
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    sliding_window: int = setting(0, "tokens each query sees, itself included, in sliding-window layers; 0: full "
                                  "attention everywhere", min=0, max=2**24)
    full_attention_every: int = setting(0, "with sliding_window: every n-th layer attends fully (Gemma 2: 2); 0: "
                                        "every layer slides (Mistral)", min=0, max=1024)
    attn_softcap: float = setting(0.0, "attention scores squashed to ±cap by cap·tanh(s/cap); 0: off", min=0.0,
                                  max=1e6)
    logit_softcap: float = setting(0.0, "output logits squashed to ±cap the same way; 0: off", min=0.0, max=1e6)
    attn_scale_dim: int | None = setting(None, "attention scores scaled by 1/sqrt(this); null: head_dim", min=1,
                                         max=2**16)
    scale_embeddings: bool = setting(False, "multiply the input embeddings by sqrt(dim) (Gemma)")
    tie_embeddings: bool = setting(False, "share the input embedding with the output projection")
    max_positions: int = setting(0, "context length the model is meant for (written to exported configs); 0: "
                                 "data.seq_len", min=0, max=2**24)
    attention_mask: str = setting("causal", "causal: a token attends to every earlier token of its packed row; "
                                  "document: only to earlier tokens of its own document (the EOS tokens the packer "
                                  "writes end documents; docs/models.md)", choices=("causal", "document"))
    rope_positions: str = setting("sequence", "sequence: RoPE positions count from the row's start; document: they "
                                  "restart at each document's first token (needs attention_mask=document)",
                                  choices=("sequence", "document"))
    init_std: float = setting(0.02, "std of the normal initialisation (under mup: at mup_base_dim)", min=0.0,
                              max=1.0)
    parametrization: str = setting(
        "standard", "standard: one init std and learning rate for every weight; mup: maximal update "
        "parametrization (Tensor Programs V) for Adam, so a learning rate and init_std tuned at mup_base_dim hold "
        "at other widths: hidden matrices' init std × sqrt(mup_base_dim/dim) and learning rate × mup_base_dim/dim, "
        "embedding, norms and lm_head unscaled, logits × mup_base_dim/dim, attention scores × 1/head_dim instead "
        "of 1/sqrt(head_dim) (docs/planner.md)", choices=("standard", "mup"))
    mup_base_dim: int = setting(0, "with parametrization=mup: the width (model.dim) init_std and optim.lr were tuned "
                                "at, required; at dim = mup_base_dim μP and standard differ only in the attention "
                                "scale", min=0, max=65536)


@dataclass
class DataConfig:
    """Training data: a shard directory written by `pretrain prep`."""

    path: str = setting("", "directory holding manifest.json and the Arrow shards: a local path or an object-store "
                        "URI (s3://, gs://, abfs://, az://)")
    seq_len: int = setting(256, "tokens per training sequence; at most the shards' seq_len", min=8,
                           max=2**20)
    seed: int = setting(1234, "seed of the global sample order", min=0, max=SEED_MAX)
    prefetch: int = setting(2, "batches read ahead by the loader thread", min=0, max=64)
    cache_dir: str = setting("", "shards in an object store: a local directory the loader copies each shard into "
                             "(sha256-checked) while it streams rows, then reads from; empty: rows stream only")
    skip: str = setting("", "sample windows the loader skips, comma-separated EPOCH:START-END (positions START to "
                        "END-1 of that epoch's order; a step touching one goes past it): what a rewind after a loss "
                        "spike logs, to skip the same data by hand")


def parse_windows(text: str) -> list[tuple[int, int, int]]:
    """`data.skip` as (epoch, start, end) windows; a ValueError says what is wrong with which one."""
    windows = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        epoch, _, span = item.partition(":")
        start, _, end = span.partition("-")
        try:
            window = int(epoch), int(start), int(end)
        except ValueError:
            raise ValueError(f"{item!r} is not EPOCH:START-END (whole numbers, e.g. 0:4096-8192)") from None
        if min(window) < 0 or window[1] >= window[2]:
            raise ValueError(f"{item!r}: needs 0 ≤ START < END and EPOCH ≥ 0")
        windows.append(window)
    return windows


@dataclass
class ParallelConfig:
    """How the model is split over ranks: dp × cp × pp × tp must equal the number of ranks."""

    backend: str = setting("auto", "parallel engine; auto: native (the faster on GPUs for every layout measured), or "
                           "deepspeed where the spec needs it (offload_optimizer; tie_embeddings with pp > 1)",
                           choices=("auto", "deepspeed", "native"))
    dp: int = setting(0, "data-parallel size; 0 means ranks / (cp·pp·tp)", min=0, max=65536)
    cp: int = setting(1, "context-parallel size (native backend): each sequence split over cp ranks, two chunks "
                      "each (head and tail, so causal work is even), keys and values all-gathered for attention; "
                      "seq_len must divide by 2·cp", min=1, max=1024)
    ep: int = setting(1, "expert-parallel size (native backend, MoE models): each MoE layer's experts split over ep "
                      "ranks taken from dp × cp (ep adds no ranks; it divides dp·cp and is a multiple of cp), tokens "
                      "sent to their experts' rank and back by all-to-all", min=1, max=1024)
    pp: int = setting(1, "pipeline stages", min=1, max=1024)
    pp_schedule: str = setting("1f1b", "pipeline schedule; interleaved_1f1b and zero_bubble (native only) run two "
                               "stages per rank", choices=("1f1b", "interleaved_1f1b", "zero_bubble"))
    tp: int = setting(1, "tensor-parallel size", min=1, max=1024)
    zero_stage: int = setting(1, "ZeRO optimizer sharding stage", choices=(0, 1, 2, 3))
    sequence_parallel: bool = setting(False, "shard activations along the sequence between tensor-parallel regions")
    activation_checkpointing: str = setting(
        "none", "recompute activations in the backward pass instead of keeping them: none; full (keep each block's "
        "input, recompute the whole block); selective (keep attention's and every other matmul's outputs, recompute "
        "the rest); every_n (full on every n-th block, activation_checkpointing_every, none on the others). true "
        "and false, from older specs, mean full and none",
        choices=("none", "full", "selective", "every_n"), aliases={"true": "full", "false": "none"})
    activation_checkpointing_every: int = setting(
        2, "with activation_checkpointing=every_n: checkpoint the n-th, 2n-th, … block (layers n-1, 2n-1, … from 0, "
        "as torchtitan's selective_ac_option: n); 1 is the same as full", min=1, max=1024)
    activation_offload: bool = setting(
        False, "with activation_checkpointing=full or selective (native backend, no pp): keep the blocks' inputs in "
        "pinned host memory between forward and backward, copied out and back on side streams behind the compute; "
        "for long sequences or large micro-batches, where those inputs are a large part of the activations")
    loss_chunks: int = setting(
        1, "native backend: run the final norm, the lm_head and the loss over this many equal slices of each "
        "row, each recomputed in the backward, so that one slice's logits are alive at a time instead of all of "
        "them (at long contexts the largest thing a step holds); it divides a rank's part of a row, data.seq_len / "
        "cp (/ tp under sequence_parallel)", min=1, max=4096)
    micro_batch_size: int = setting(4, "sequences per rank per micro-batch", min=1, max=65536)
    grad_accum: int = setting(1, "micro-batches per optimizer step (pipeline micro-batches when pp > 1)", min=1,
                                 max=65536)
    global_batch_size: int = setting(0, "sequences per optimizer step; 0 means micro_batch_size·grad_accum·dp",
                                        min=0, max=2**30)
    precision: str = setting("bf16", "training precision", choices=("bf16", "fp32"))
    float8: str = setting("none", "FP8 matmuls in the transformer blocks' linear layers (native engine, torchao): "
                          "none; tensorwise (one scale per tensor, float8 all-gather under FSDP: the fastest); "
                          "rowwise (one scale per row: more robust to outliers)",
                          choices=("none", "tensorwise", "rowwise"))
    offload_optimizer: bool = setting(False, "keep optimizer states in host memory (ZeRO 1-3)")
    compile: bool = setting(False, "torch.compile each transformer block")


@dataclass
class OptimConfig:
    """AdamW; norms and embeddings get no weight decay."""

    lr: float = setting(3e-4, "peak learning rate", min=0.0, max=10.0)
    min_lr: float = setting(3e-5, "learning rate at the end of the decay", min=0.0, max=10.0)
    weight_decay: float = setting(0.1, "decoupled weight decay", min=0.0, max=10.0)
    beta1: float = setting(0.9, "Adam beta1", min=0.0, max=1.0)
    beta2: float = setting(0.95, "Adam beta2", min=0.0, max=1.0)
    eps: float = setting(1e-8, "Adam epsilon", min=0.0, max=1.0)
    grad_clip: float = setting(1.0, "clip the global gradient norm to this; 0 disables", min=0.0,
                                max=1e6)


@dataclass
class ScheduleConfig:
    """Steps, learning-rate schedule, evaluation and logging cadence."""

    steps: int = setting(1000, "optimizer steps", min=1, max=STEPS_MAX)
    warmup_steps: int = setting(100, "linear warmup steps", min=0, max=STEPS_MAX)
    lr_schedule: str = setting("cosine", "shape after warmup", choices=("cosine", "wsd", "constant"))
    decay_fraction: float = setting(0.2, "wsd: fraction of steps spent decaying at the end", min=0.0, max=1.0)
    eval_every: int = setting(100, "steps between validation passes; 0 disables", min=0, max=STEPS_MAX)
    eval_batches: int = setting(10, "batches per validation pass", min=1, max=1_000_000)
    log_every: int = setting(10, "steps between log lines", min=1, max=STEPS_MAX)
    seed: int = setting(0, "seed of initialisation and every other random choice", min=0, max=SEED_MAX)


@dataclass
class CheckpointConfig:
    """Where and how often to checkpoint, and what to keep."""

    dir: str = setting("runs/${name}/checkpoints", "checkpoint directory: a local path or a pyarrow.fs URI (s3://, gs://)")
    every: int = setting(100, "steps between checkpoints; 0 saves only at the end", min=0, max=STEPS_MAX)
    keep_last: int = setting(3, "newest checkpoints kept", min=1, max=10_000)
    keep_every: int = setting(0, "also keep each checkpoint whose step is a multiple of this; 0: none", min=0,
                             max=STEPS_MAX)
    resume: bool = setting(True, "resume from the newest good checkpoint in dir")
    async_save: bool = setting(True, "write checkpoint files in the background after copying state to host memory")
    init_from: str = setting("", "start from this checkpoint or Hugging Face directory's weights")


LOGGERS = ("prometheus", "tensorboard", "wandb", "mlflow")
TRACKERS_INSTALL = "pip install 'pretrain[trackers]'"


@dataclass
class TensorBoardConfig:
    """TensorBoard event files, with `metrics.loggers: [..., tensorboard]`."""

    dir: str = setting("", "directory of the event files; empty: <checkpoint.dir>/tensorboard (runs/<name>/"
                       "tensorboard for a remote checkpoint.dir)")


@dataclass
class WandbConfig:
    """A Weights & Biases run, with `metrics.loggers: [..., wandb]`."""

    project: str = setting("pretrain", "W&B project the run belongs to")
    entity: str = setting("", "W&B user or team; empty: the account's default (online mode)")
    mode: str = setting("offline", "offline: the run is written under dir and uploaded later with `wandb sync` (no "
                        "network needed); online: streamed to the W&B server (needs WANDB_API_KEY)",
                        choices=("offline", "online"))
    dir: str = setting("", "directory W&B writes its wandb/ folder in; empty: <checkpoint.dir> (runs/<name> for a "
                       "remote checkpoint.dir)")


@dataclass
class MlflowConfig:
    """An MLflow run, with `metrics.loggers: [..., mlflow]`."""

    uri: str = setting("", "tracking URI: sqlite:///path/mlflow.db or an MLflow server's http(s):// address; empty: "
                       "sqlite:///<checkpoint.dir>/mlflow.db (runs/<name>/mlflow.db for a remote checkpoint.dir)")
    experiment: str = setting("pretrain", "MLflow experiment the run belongs to (created when missing)")


@dataclass
class MetricsConfig:
    """Where the run's scalars go: Prometheus exporters of the ranks and the controller, and experiment trackers
    written by rank 0 (docs/trackers.md)."""

    enabled: bool = setting(True, "export metrics at all; false: none of metrics.loggers runs (the switch older specs "
                            "turned the Prometheus exporters off with)")
    loggers: tuple[str, ...] = setting(("prometheus",), "where the scalars go, a list of: " + ", ".join(LOGGERS)
                                       + "; [] for none", choices=LOGGERS)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    host: str = setting("", "address the exporters bind; empty: the node's IP (Ray's), 0.0.0.0: every interface")
    port: int = setting(0, "first exporter port; 0 picks free ports", min=0, max=65535)
    targets_file: str = setting("", "file_sd targets file for Prometheus; empty means <checkpoint.dir>/../targets.json")
    peak_flops: float = setting(989e12, "dense bf16 FLOP/s of one device: the MFU denominator (H100 SXM)",
                                 min=1.0, max=1e18)
    peak_flops_fp8: float = setting(1979e12, "dense FP8 FLOP/s of one device: the MFU denominator of the float8 "
                                    "matmuls with parallel.float8 (H100 SXM)", min=1.0, max=1e18)

    def uses(self, logger: str) -> bool:
        """Whether `logger` (one of `LOGGERS`) runs: named in `loggers`, and metrics not switched off."""
        return self.enabled and logger in self.loggers

    def missing_trackers(self) -> list[str]:
        """The trackers this spec uses whose package is not installed here (each imports under its own name)."""
        return [name for name in LOGGERS[1:] if self.uses(name) and importlib.util.find_spec(name) is None]


@dataclass
class EvalConfig:
    """Downstream evaluation in the loop: lm-evaluation-harness tasks scored with the live model on the training
    ranks (docs/evaluation.md); `pretrain eval` takes the same settings as flags for a checkpoint."""

    tasks: str = setting("", "comma-separated lm-eval task names (the harness's own or those in include_path); "
                         "empty: none")
    every: int = setting(1000, "steps between downstream evaluations (and at the last step); 0: schedule.eval_every. "
                         "Scoring stalls every rank for seconds: at 1000 a 1B run loses under 1% (docs/evaluation.md)",
                         min=0, max=STEPS_MAX)
    limit: int = setting(100, "documents per task at most; 0: all of them", min=0, max=10**9)
    num_fewshot: int | None = setting(None, "few-shot examples per prompt; null: each task's own", min=0, max=1000)
    include_path: str = setting("", "directory of local task files (YAML + data) the harness also reads; empty: none")
    batch_size: int = setting(16, "requests scored per forward on each data-parallel rank", min=1, max=65536)


@dataclass
class ResourcesConfig:
    """What the run asks of the cluster, and how it survives failures."""

    device: str = setting("auto", "auto: cuda when present, else cpu", choices=("auto", "cuda", "cpu"))
    num_nodes: int = setting(1, "nodes", min=1, max=4096)
    gpus_per_node: int = setting(1, "ranks per node: GPUs, or processes on CPU", min=1, max=256)
    min_nodes: int = setting(0, "fewest nodes to continue on after a node is lost; 0 means num_nodes", min=0,
                             max=4096)
    cpus_per_rank: float = setting(1.0, "CPUs reserved per rank", min=0.0, max=1024.0)
    max_restarts: int = setting(3, "gang restarts before the job fails", min=0, max=10_000)
    restart_backoff_s: float = setting(5.0, "first wait before a restart; doubles each time", min=0.0,
                                      max=86400.0)
    hang_timeout_s: float = setting(600.0, "restart when no rank advances for this long", min=1.0,
                                   max=604800.0)
    straggler_factor: float = setting(1.5, "a rank busier than factor × the others' median is a straggler",
                                     min=1.0, max=1000.0)


@dataclass
class SpikesConfig:
    """Loss spikes: a step whose loss or gradient norm lies `threshold` MADs above the median of the last `window`
    steps (or is not finite) is a spike, and `action` says what the run does about it (docs/research-loop.md)."""

    action: str = setting("alert", "none: no detection; alert: log it, record it in history.jsonl and count it in "
                          "pretrain_loss_spikes_total; skip: also drop the step's update (native engine; the step is "
                          "trained again on the next batch); rewind: also go back to the last checkpoint and skip "
                          "the data read since it", choices=("none", "alert", "skip", "rewind"))
    window: int = setting(100, "steps whose losses and gradient norms make the baseline", min=3, max=10_000)
    threshold: float = setting(6.0, "distance above the median that makes a spike, in median absolute deviations",
                               min=1.0, max=1e6)
    min_steps_before_active: int = setting(100, "steps trained before detection starts (the early loss falls too "
                                           "fast for a baseline)", min=0, max=STEPS_MAX)
    max_rewinds: int = setting(3, "rewinds per attempt; past them a spike is only alerted", min=0, max=10_000)


@dataclass
class ProfileConfig:
    """torch.profiler traces (and CUDA memory snapshots) of every rank, written to <checkpoint.dir>/profiles;
    `pretrain profile` takes one from a running job as well."""

    at_step: int = setting(0, "first step profiled; 0: none (only on request)", min=0, max=STEPS_MAX)
    steps: int = setting(2, "steps profiled from at_step", min=1, max=1000)


@dataclass
class JobSpec:
    """A pretraining run."""

    name: str = setting("pretrain", "run name; the `run` label of every metric")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    spikes: SpikesConfig = field(default_factory=SpikesConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    @property
    def world_size(self) -> int:
        return self.resources.num_nodes * self.resources.gpus_per_node

    @property
    def head_dim(self) -> int:
        return self.model.head_dim or self.model.dim // self.model.n_heads


def spec_to_yaml(spec: JobSpec) -> str:
    """The spec as YAML that `orchestrator.validate.parse_spec` reads back to the same spec: what `pretrain submit`
    hands the controller and `pretrain validate` prints. Here rather than in the validator, so `cluster` can send a
    spec without importing the rules."""
    return OmegaConf.to_yaml(OmegaConf.create(asdict(spec)))
