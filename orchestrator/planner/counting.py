"""Parameters and training FLOPs of the model, whole and per pipeline stage / tensor-parallel shard.

The counts follow `parallel.model`'s transformer exactly, for every switch: q/k/v biases, query/key norms (one
head's width, or all heads'), two or four norms a block by norm placement, heads wider or narrower than
dim / n_heads, and tied embeddings counted once. The planner's memory and step-time estimates are only as good as
these numbers.

FLOPs per token are the model's own (`parallel.model.ModelDims.flops_per_token`, PaLM's 6·N + 12·L·dim·seq): the
planner's step times and the MFU the ranks export use one formula.

A mixture of experts (`model.moe`) has two sizes: its total parameters, which memory holds, and its active ones, a
token's share (the router, its top_k routed experts, the shared experts), which its FLOPs are counted from. Under
expert parallelism (`parallel.ep`) a rank holds num_experts / ep experts of each MoE layer; its router and shared
experts stay whole on every tensor-parallel rank, as `parallel.dtensor_tp` leaves a MoE layer's MLP replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import Problem, SpecError
from orchestrator.spec import ModelConfig

# RMSNorms a block has by `model.norm_placement` (parallel.model.BLOCK_NORMS names them).
BLOCK_NORMS = {"pre": 2, "post": 2, "sandwich": 4}


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a model by where they live."""

    embedding: int
    attention: int  # per layer, split over tp: q, k, v, o projections, q/k/v biases, query/key norms over all heads
    ffn: int  # per layer: the gated MLP's gate, up and down projections
    norms: int  # per layer, whole on every tp rank: the block's RMSNorms, per-head query/key norms
    n_layers: int
    final_norm: int
    output: int  # the output projection; 0 when tied to the embedding
    moe_layers: int = 0  # layers whose MLP is a mixture of experts (the others have `ffn`)
    router: int = 0  # per MoE layer: the router's weight
    experts: int = 0  # per MoE layer: every routed expert's gate, up and down projections
    active_experts: int = 0  # per MoE layer: the top_k experts a token goes through
    shared: int = 0  # per MoE layer: the shared experts

    @property
    def moe_mlp(self) -> int:
        """A MoE layer's MLP: router, routed and shared experts."""
        return self.router + self.experts + self.shared

    @property
    def per_layer(self) -> int:
        """A block, averaged over the layers when some are mixtures of experts."""
        return (self.total - self.embedding - self.final_norm - self.output) // self.n_layers

    @property
    def total(self) -> int:
        blocks = self.n_layers * (self.attention + self.norms) + (self.n_layers - self.moe_layers) * self.ffn
        return self.embedding + blocks + self.moe_layers * self.moe_mlp + self.final_norm + self.output

    @property
    def active(self) -> int:
        """Parameters a token goes through: the total less the routed experts it is not sent to."""
        return self.total - self.moe_layers * (self.experts - self.active_experts)

    @property
    def non_embedding(self) -> int:
        """Kaplan et al.'s N: everything but the embedding and output matrices."""
        return self.total - self.embedding - self.output


def check_resolved(model: ModelConfig) -> None:
    """The planner counts a resolved model; vocab_size is the one value a spec may leave open for lack of shards."""
    if model.vocab_size is None:
        raise SpecError("model", [Problem("model.vocab_size", "not set, and no shards at data.path to read the "
                                          "tokenizer's size from; set model.vocab_size (e.g. 50304)")])
    if model.n_kv_heads is None or model.ffn_dim is None:
        raise ValueError("count a resolved spec (orchestrator.validate.parse_spec fills n_kv_heads and ffn_dim)")


def attention_widths(model: ModelConfig) -> tuple[int, int]:
    """Widths of the queries (n_heads·head_dim) and of the keys, or values (n_kv_heads·head_dim), with head_dim
    resolved: what the projections, the saved activations and the query/key norms are sized by."""
    head_dim = model.head_dim or model.dim // model.n_heads
    return model.n_heads * head_dim, (model.n_kv_heads or model.n_heads) * head_dim


def count_params(model: ModelConfig) -> ParamCount:
    check_resolved(model)
    d = model.dim
    q, kv = attention_widths(model)
    vocab = model.vocab_size
    biases = q + 2 * kv if model.qkv_bias else 0
    qk_norms = q + kv if model.qk_norm == "full" else 0
    head_norms = 2 * q // model.n_heads if model.qk_norm == "head" else 0  # a q_norm and a k_norm of head_dim
    moe = model.moe
    expert = 3 * d * (moe.expert_ffn_dim or model.ffn_dim)
    return ParamCount(
        embedding=vocab * d,
        attention=2 * d * q + 2 * d * kv + biases + qk_norms,
        ffn=3 * d * model.ffn_dim,
        norms=BLOCK_NORMS[model.norm_placement] * d + head_norms,
        n_layers=model.n_layers,
        final_norm=d,
        output=0 if model.tie_embeddings else vocab * d,
        moe_layers=sum(moe_layers(model)),
        router=moe.num_experts * d,
        experts=moe.num_experts * expert,
        active_experts=moe.top_k * expert if moe.num_experts else 0,
        shared=moe.num_shared_experts * expert,
    )


def moe_layers(model: ModelConfig) -> list[bool]:
    """Which layers are mixtures of experts (`parallel.model.ModelDims.is_moe`); all False for a dense model."""
    if not model.moe.num_experts:
        return [False] * model.n_layers
    from parallel.model import ModelDims

    dims = ModelDims.from_config(model)
    return [dims.is_moe(i) for i in range(model.n_layers)]


def layer_params(model: ModelConfig, tp: int = 1, ep: int = 1) -> list[tuple[int, int]]:
    """(all, of which routed experts) parameters one rank holds of each block: linears split over tp, norms whole;
    a MoE layer's num_experts / ep experts, its router and shared experts whole."""
    count = count_params(model)
    dense = (count.attention + count.ffn) // tp + count.norms
    sparse = count.attention // tp + count.norms + count.router + count.shared + count.experts // ep
    return [(sparse, count.experts // ep) if moe else (dense, 0) for moe in moe_layers(model)]


def stage_params(model: ModelConfig, pp: int = 1, tp: int = 1, ep: int = 1) -> list[int]:
    """Parameters held by one rank of each pipeline stage (`stage_expert_params` of them routed experts).

    Layers split evenly over stages (the validator requires it); the first stage holds the embedding, the last the
    final norm and output projection, and with tied embeddings and pp > 1 the last stage keeps its own copy of the
    embedding matrix (the tied weight is synchronised between the two stages). Linears and the vocab-parallel
    embedding/output split over tp, and with them the q/k/v biases and the
    query/key norms taken over all heads (each rank holds its heads' part); the block norms and per-head query/key
    norms are whole on every tp rank.
    """
    count = count_params(model)
    layers = [held for held, _ in layer_params(model, tp, ep)]
    size = model.n_layers // pp
    per_stage = [sum(layers[s * size:(s + 1) * size]) for s in range(pp)]
    per_stage[0] += count.embedding // tp
    head = count.output or (count.embedding if pp > 1 else 0)
    per_stage[-1] += count.final_norm + head // tp
    return per_stage


def stage_expert_params(model: ModelConfig, pp: int = 1, tp: int = 1, ep: int = 1) -> list[int]:
    """Routed-expert parameters held by one rank of each pipeline stage (num_experts / ep of each MoE layer's):
    what FSDP shards over the dp × cp / ep ranks holding the same experts, where the rest shards over dp × cp."""
    experts = [held for _, held in layer_params(model, tp, ep)]
    size = model.n_layers // pp
    return [sum(experts[s * size:(s + 1) * size]) for s in range(pp)]


def lora_params(model: ModelConfig, pp: int = 1, tp: int = 1) -> list[int]:
    """Adapter parameters (`model.lora`) held by one rank of each pipeline stage: what a LoRA run trains, and all
    it keeps gradients and Adam moments for.

    Each targeted projection (in → out features) gets A (rank × in) and B (out × rank). Split as
    `parallel.lora` splits them over tp: a column-parallel projection (q/k/v, gate/up) keeps A whole and splits B,
    a row-parallel one (o_proj, down_proj) splits A and keeps B whole.
    """
    check_resolved(model)
    rank = model.lora.rank
    if not rank:
        return [0] * pp
    q, kv = attention_widths(model)
    d, f = model.dim, model.ffn_dim
    # name → (in, out, column-parallel)
    shapes = {"q_proj": (d, q, True), "k_proj": (d, kv, True), "v_proj": (d, kv, True), "o_proj": (q, d, False),
              "gate_proj": (d, f, True), "up_proj": (d, f, True), "down_proj": (f, d, False)}
    targets = {t.strip() for t in model.lora.targets.split(",")}
    layer = sum(rank * n_in + rank * n_out // tp if column else rank * n_in // tp + rank * n_out
                for name, (n_in, n_out, column) in shapes.items() if name in targets)
    return [model.n_layers // pp * layer] * pp


def trainable_params(model: ModelConfig, pp: int = 1, tp: int = 1, ep: int = 1) -> list[int]:
    """Parameters one rank of each stage trains: the adapters under LoRA, else every one it holds."""
    return lora_params(model, pp, tp) if model.lora.rank else stage_params(model, pp, tp, ep)


def routed_flops_share(model: ModelConfig, seq_len: int) -> float:
    """The share of a token's training FLOPs in its routed experts' matmuls (0 for a dense model)."""
    count = count_params(model)
    return 6 * count.moe_layers * count.active_experts / flops_per_token(model, seq_len)


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward and backward) per token, without activation recomputation: of the active parameters
    under a mixture of experts."""
    from parallel.model import ModelDims

    check_resolved(model)
    return float(ModelDims.from_config(model).flops_per_token(seq_len))
