"""Parameters and training FLOPs of the Llama-style model, whole and per pipeline stage / tensor-parallel shard.

The counts follow the model of `parallel/` exactly (RMSNorm, SwiGLU, grouped-query attention, no biases, optional
tied embeddings): the planner's memory and step-time estimates are only as good as these numbers.

FLOPs per token are the model's own (`parallel.model.ModelDims.flops_per_token`, PaLM's 6·N + 12·L·dim·seq): the
planner's step times and the MFU the ranks export use one formula.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import Problem, SpecError
from orchestrator.spec import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a model by where they live."""

    embedding: int
    attention: int  # per layer: q, k, v, o projections
    ffn: int  # per layer: SwiGLU w1, w2, w3
    norms: int  # per layer: two RMSNorm weights
    n_layers: int
    final_norm: int
    output: int  # the output projection; 0 when tied to the embedding

    @property
    def per_layer(self) -> int:
        return self.attention + self.ffn + self.norms

    @property
    def total(self) -> int:
        return self.embedding + self.n_layers * self.per_layer + self.final_norm + self.output

    @property
    def non_embedding(self) -> int:
        """Kaplan et al.'s N: everything but the embedding and output matrices."""
        return self.n_layers * self.per_layer + self.final_norm


def check_resolved(model: ModelConfig) -> None:
    """The planner counts a resolved model; vocab_size is the one value a spec may leave open for lack of shards."""
    if model.vocab_size is None:
        raise SpecError("model", [Problem("model.vocab_size", "not set, and no shards at data.path to read the "
                                          "tokenizer's size from; set model.vocab_size (e.g. 50304)")])
    if model.n_kv_heads is None or model.ffn_dim is None:
        raise ValueError("count a resolved spec (orchestrator.validate.parse_spec fills n_kv_heads and ffn_dim)")


def count_params(model: ModelConfig) -> ParamCount:
    check_resolved(model)
    d, head_dim = model.dim, model.dim // model.n_heads
    kv_dim = model.n_kv_heads * head_dim
    vocab = model.vocab_size
    return ParamCount(
        embedding=vocab * d,
        attention=2 * d * d + 2 * d * kv_dim,
        ffn=3 * d * model.ffn_dim,
        norms=2 * d,
        n_layers=model.n_layers,
        final_norm=d,
        output=0 if model.tie_embeddings else vocab * d,
    )


def stage_params(model: ModelConfig, pp: int = 1, tp: int = 1) -> list[int]:
    """Parameters held by one rank of each pipeline stage.

    Layers split evenly over stages (the validator requires it); the first stage holds the embedding, the last the
    final norm and output projection, and with tied embeddings and pp > 1 the last stage keeps its own copy of the
    embedding matrix (the tied weight is synchronised between the two stages). Linears and the vocab-parallel
    embedding/output split over tp; norms are replicated on every tp rank.
    """
    count = count_params(model)
    layer = (count.attention + count.ffn) // tp + count.norms
    per_stage = [model.n_layers // pp * layer for _ in range(pp)]
    per_stage[0] += count.embedding // tp
    head = count.output or (count.embedding if pp > 1 else 0)
    per_stage[-1] += count.final_norm + head // tp
    return per_stage


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward and backward) per token, without activation recomputation."""
    from parallel.model import ModelDims

    check_resolved(model)
    return float(ModelDims.from_config(model).flops_per_token(seq_len))
