"""A decoder-only transformer, readable top to bottom; by default Llama's (pre-norm RMSNorm, SwiGLU, RoPE,
grouped-query attention, no biases), with the switches other families need (`ModelDims`): q/k/v biases (Qwen2),
query/key norms (Qwen3 per head, OLMo 2 over all heads), post-norm and sandwich-norm blocks (OLMo 2, Gemma 2), scaled
RoPE, sliding-window attention (Mistral, Gemma 2), soft-capped scores and logits, scaled embeddings and GeGLU (Gemma),
and mixture-of-experts MLPs on chosen layers (`parallel.moe`: Mixtral, Qwen3-MoE, DeepSeek-V3's routing).

Parameter names are Hugging Face's without the leading `model.` (`embed_tokens.weight`,
`layers.3.self_attn.q_proj.weight`, `layers.3.mlp.gate_proj.weight`, `norm.weight`; `lm_head.weight` as is), each
block's norms named as the family names them, and RoPE uses the same rotate-half layout, so converting to and from
transformers' classes is a rename with no permutation (`parallel.hf`).

The model knows nothing about parallelism: `parallel.megatron_tp` swaps its linears for sharded ones and lowers
`n_heads` / `n_kv_heads` to the local counts, `parallel.deepspeed_pipeline` regroups its parts into stages. Weights are
initialised per parameter name (`init_parameter`), so every layout starts from exactly the same numbers.

`forward` returns logits; the loss lives outside (`cross_entropy` here, a vocab-parallel one under tensor parallelism)
so that a sharded lm_head never has to gather full-vocab logits. A `KVCache` is the seam for incremental decoding.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.spec import ModelConfig
from parallel.documents import (
    DocumentContext,
    QuerySplit,
    compiled_flex_attention,
    document_context,
    softcap_score_mod,
)
from parallel.moe import MoE, MoEDims, gated
from parallel.mup import attention_scale_dim, init_std_scale, logit_scale
from parallel.rope import RopeScaling, RotaryEmbedding, apply_rope

# Each block's norms by where they sit: before attention, after it, before the MLP, after it (None: no norm there),
# under the names the families' checkpoints use.
BLOCK_NORMS: dict[str, tuple[str | None, str | None, str | None, str | None]] = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
}


@dataclass(frozen=True)
class ModelDims:
    """The sizes and switches the model is built from, with the spec's defaults resolved."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    norm_eps: float
    rope_theta: float
    tie_embeddings: bool
    init_std: float
    head_dim: int = 0  # 0: dim // n_heads
    activation: str = "silu"
    norm_placement: str = "pre"
    qkv_bias: bool = False
    qk_norm: str = "none"
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    sliding_window: int = 0
    full_attention_every: int = 0
    attn_softcap: float = 0.0
    logit_softcap: float = 0.0
    attn_scale_dim: int = 0  # 0: head_dim
    scale_embeddings: bool = False
    mup_base_dim: int = 0  # 0: the standard parametrization; else μP's base width (`parallel.mup`)
    attention_mask: str = "causal"  # document: a token sees only its own document (`parallel.documents`)
    rope_positions: str = "sequence"  # document: RoPE positions restart at each document
    moe: MoEDims | None = None  # mixture of experts on the layers `is_moe` picks (`parallel.moe`); None: dense

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.mup_base_dim and not self.attn_scale_dim:
            object.__setattr__(self, "attn_scale_dim", attention_scale_dim(self))

    @classmethod
    def from_config(cls, config: ModelConfig) -> ModelDims:
        if config.vocab_size is None:
            raise ValueError("model.vocab_size must be resolved (from the shards' tokenizer) before building the model")
        ffn = config.ffn_dim
        if ffn is None:
            # Llama's rule: 2/3 of 4·dim (SwiGLU has three matrices), rounded up to multiple_of.
            ffn = config.multiple_of * math.ceil(int(8 * config.dim / 3) / config.multiple_of)
        r = config.rope_scaling
        return cls(
            vocab_size=config.vocab_size, dim=config.dim, n_layers=config.n_layers, n_heads=config.n_heads,
            n_kv_heads=config.n_kv_heads or config.n_heads, ffn_dim=ffn, norm_eps=config.norm_eps,
            rope_theta=config.rope_theta, tie_embeddings=config.tie_embeddings, init_std=config.init_std,
            head_dim=config.head_dim or 0, activation=config.activation, norm_placement=config.norm_placement,
            qkv_bias=config.qkv_bias, qk_norm=config.qk_norm,
            rope_scaling=RopeScaling(r.type, r.factor, r.original_max_positions, r.low_freq_factor,
                                     r.high_freq_factor, r.beta_fast, r.beta_slow, r.attention_factor),
            sliding_window=config.sliding_window, full_attention_every=config.full_attention_every,
            attn_softcap=config.attn_softcap, logit_softcap=config.logit_softcap,
            attn_scale_dim=config.attn_scale_dim or 0, scale_embeddings=config.scale_embeddings,
            mup_base_dim=config.mup_base_dim if config.parametrization == "mup" else 0,
            attention_mask=config.attention_mask, rope_positions=config.rope_positions,
            moe=MoEDims.from_config(config.moe, ffn),
        )

    def window(self, layer: int) -> int:
        """Tokens layer `layer`'s queries see (themselves included), 0 for full causal attention."""
        full = self.full_attention_every and (layer + 1) % self.full_attention_every == 0
        return 0 if full else self.sliding_window

    def is_moe(self, layer: int) -> bool:
        """Whether layer `layer` (from 0) has experts instead of a dense MLP."""
        return self.moe is not None and self.moe.is_moe(layer)

    def num_params(self, with_embeddings: bool = True, active: bool = False) -> int:
        """Every parameter (an MoE layer's experts all counted); `active`: those a token passes through (its top_k
        routed experts and the shared ones: what `flops_per_token` counts)."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = self.dim * (2 * q + 2 * kv) + (q + 2 * kv if self.qkv_bias else 0)
        attn += {"none": 0, "head": 2 * self.head_dim, "full": q + kv}[self.qk_norm]
        norms = sum(name is not None for name in BLOCK_NORMS[self.norm_placement]) * self.dim
        mlps = sum(self._mlp_params(i, active) for i in range(self.n_layers))
        embed = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + norms) + mlps + self.dim + (embed if with_embeddings else 0)

    def active_params(self, with_embeddings: bool = True) -> int:
        """The parameters one token passes through: `num_params` with an MoE layer's unchosen experts left out."""
        return self.num_params(with_embeddings, active=True)

    def _mlp_params(self, layer: int, active: bool) -> int:
        if not self.is_moe(layer):
            return 3 * self.dim * self.ffn_dim
        moe = self.moe
        experts = moe.top_k if active else moe.num_experts
        return self.dim * moe.num_experts + 3 * self.dim * moe.ffn_dim * (experts + moe.num_shared_experts)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N + 12·L·seq·dim (PaLM, appendix B; what nanoGPT's MFU uses).

        N counts the weights that take part in matmuls: every block and the lm_head (forward 2·N, backward 4·N);
        the input embedding is a lookup and is left out. In MoE layers a token's matmuls are the router's and its
        top_k and shared experts' (`active_params`). 12·L·seq·dim is attention's QK^T and AV, forward and
        backward, counted without the causal halving, as the reference figures in PERF-BASELINES.md are; with heads
        narrower or wider than dim / n_heads, dim is n_heads·head_dim, and a sliding-window layer's queries see at
        most its window.
        """
        matmul_params = self.active_params(with_embeddings=False) + self.vocab_size * self.dim
        attended = sum(min(seq_len, self.window(i) or seq_len) for i in range(self.n_layers))
        return 6 * matmul_params + 12 * attended * self.n_heads * self.head_dim


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16 activations don't lose the small variances.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap·tanh(x/cap): x squashed smoothly into (-cap, cap), nearly unchanged where |x| ≪ cap."""
    return torch.tanh(x / cap) * cap


class KVCache:
    """Keys and values of the positions seen so far, one layer's worth; `update` appends and returns everything.

    Preallocated to `max_len` so decoding does no reallocation; `pos` is where the next token goes. A batch of
    prompts of different lengths is left-padded: `valid` [batch, max_len] marks the real positions, and padding is
    hidden from every query but itself (a row of padding then attends to something, so no NaNs). RoPE needs no
    per-row positions for that: a row's scores depend only on distances between its tokens.
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, valid: torch.Tensor | None = None):
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = 0
        self.valid = valid

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        self.k[:, :, self.pos:end] = k
        self.v[:, :, self.pos:end] = v
        self.pos = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def attention_mask(self, new: int, window: int = 0) -> torch.Tensor | None:
        """Which keys the `new` latest queries may see (True: attend); None when plain causal attention is right."""
        end = self.pos
        if self.valid is None and new == end and not window:
            return None
        mask = causal_mask(new, end, window, self.k.device)
        if self.valid is None:
            return mask
        own = torch.arange(end, device=mask.device) == torch.arange(end - new, end, device=mask.device)[:, None]
        return (mask & self.valid[:, None, None, :end]) | own


def causal_mask(queries: int, keys: int, window: int, device: torch.device | str) -> torch.Tensor:
    """[queries, keys] True where the query (the last `queries` of `keys` positions) may attend: earlier keys and
    itself, and with a `window`, only the `window` latest of those."""
    q = torch.arange(keys - queries, keys, device=device)[:, None]
    k = torch.arange(keys, device=device)[None, :]
    mask = k <= q
    return mask & (q - k < window) if window else mask


class Attention(nn.Module):
    def __init__(self, dims: ModelDims, rotary: RotaryEmbedding, window: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = dims.n_heads, dims.n_kv_heads, dims.head_dim
        q, kv = dims.n_heads * dims.head_dim, dims.n_kv_heads * dims.head_dim
        self.q_proj = nn.Linear(dims.dim, q, bias=dims.qkv_bias)
        self.k_proj = nn.Linear(dims.dim, kv, bias=dims.qkv_bias)
        self.v_proj = nn.Linear(dims.dim, kv, bias=dims.qkv_bias)
        self.o_proj = nn.Linear(q, dims.dim, bias=False)
        self.qk_norm = dims.qk_norm
        if dims.qk_norm != "none":
            per_head = dims.qk_norm == "head"
            self.q_norm = RMSNorm(dims.head_dim if per_head else q, dims.norm_eps)
            self.k_norm = RMSNorm(dims.head_dim if per_head else kv, dims.norm_eps)
        self.rotary = rotary
        self.window, self.softcap = window, dims.attn_softcap
        self.scale = dims.attn_scale_dim ** -0.5 if dims.attn_scale_dim else None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                docs: DocumentContext | None = None) -> torch.Tensor:
        # Shapes are read from the projections, not from x: under tensor parallelism they hold this rank's heads,
        # and under sequence parallelism the whole sequence while x holds a slice of it.
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        b, s, _ = q.shape
        q = q.view(b, s, -1, self.head_dim)
        k = k.view(b, s, -1, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)
        start = cache.pos if cache is not None else 0
        if docs is not None and docs.positions is not None:
            cos, sin = self.rotary.at(docs.positions, start + s, x.device)
        else:
            cos, sin = self.rotary(start + s, x.device)
            cos, sin = cos[start:], sin[start:]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
            mask = cache.attention_mask(s, self.window)
        elif docs is not None and docs.masks is not None:
            mask = docs.mask(self.window)
        else:
            mask = causal_mask(s, s, self.window, x.device) if self.window and self.window < s else None
        out = self._attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        """`mask`: None (causal), a boolean tensor (True: attend), or a FlexAttention BlockMask, which also carries
        the soft cap as a score_mod."""
        if mask is not None and not isinstance(mask, torch.Tensor):
            score_mod = softcap_score_mod(self.softcap) if self.softcap else None
            return compiled_flex_attention()(q, k, v, score_mod=score_mod, block_mask=mask, scale=self.scale,
                                             enable_gqa=True)
        if not self.softcap:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                                  enable_gqa=True)
        # Soft-capped scores have no fused kernel here: the scores are materialised, capped, masked, normalised.
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = softcap(q @ k.transpose(-1, -2) * (self.scale or self.head_dim ** -0.5), self.softcap)
        if mask is None:
            mask = causal_mask(q.shape[2], k.shape[2], 0, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v


class MLP(nn.Module):
    def __init__(self, dims: ModelDims, ffn_dim: int | None = None):
        super().__init__()
        ffn = ffn_dim or dims.ffn_dim
        self.gate_proj = nn.Linear(dims.dim, ffn, bias=False)
        self.up_proj = nn.Linear(dims.dim, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, dims.dim, bias=False)
        self.activation = dims.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated(self.gate_proj(x), self.up_proj(x), self.activation))


def build_mlp(dims: ModelDims, layer: int) -> nn.Module:
    """Layer `layer`'s MLP: dense, or an MoE (router and experts, its shared experts one MLP of their summed
    width)."""
    if not dims.is_moe(layer):
        return MLP(dims)
    moe = dims.moe
    shared = MLP(dims, moe.num_shared_experts * moe.ffn_dim) if moe.num_shared_experts else None
    return MoE(dims.dim, moe, dims.activation, shared)


class Block(nn.Module):
    def __init__(self, dims: ModelDims, rotary: RotaryEmbedding, layer: int = 0):
        super().__init__()
        self.norm_names = BLOCK_NORMS[dims.norm_placement]
        for name in self.norm_names:
            if name is not None:
                setattr(self, name, RMSNorm(dims.dim, dims.norm_eps))
        self.self_attn = Attention(dims, rotary, dims.window(layer))
        self.mlp = build_mlp(dims, layer)

    def norm(self, where: int, x: torch.Tensor) -> torch.Tensor:
        """The norm at `where` (0 before attention, 1 after it, 2 before the MLP, 3 after it), if the block has one."""
        name = self.norm_names[where]
        return x if name is None else getattr(self, name)(x)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                docs: DocumentContext | None = None) -> torch.Tensor:
        x = x + self.norm(1, self.self_attn(self.norm(0, x), cache, docs=docs))
        return x + self.norm(3, self.mlp(self.norm(2, x)))


class Transformer(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        self.dims = dims
        self.rotary = RotaryEmbedding(dims.head_dim, dims.rope_theta, dims.rope_scaling)
        self.embed_tokens = nn.Embedding(dims.vocab_size, dims.dim)
        self.layers = nn.ModuleList(Block(dims, self.rotary, i) for i in range(dims.n_layers))
        self.norm = RMSNorm(dims.dim, dims.norm_eps)
        self.lm_head = nn.Linear(dims.dim, dims.vocab_size, bias=False)
        if dims.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Whose queries a forward computes of each row: all of it, unless context parallelism gives this rank some
        # (`parallel.context_parallel`), for which per-document masks and positions are then built.
        self.query_split: QuerySplit | None = None

    def forward(self, tokens: torch.Tensor, caches: list[KVCache] | None = None,
                documents: torch.Tensor | None = None, head: bool = True) -> torch.Tensor:
        """Logits of `tokens` [batch, seq]; `documents` [batch, seq]: each token's document id within its row
        (`parallel.documents`), used when model.attention_mask or rope_positions is `document`. head=False: the
        last block's output instead, for a loss that runs `head` itself (`parallel.loss_chunks`)."""
        h = self.embed(tokens)
        docs = self.documents(documents)
        for i, layer in enumerate(self.layers):
            h = layer(h, caches[i] if caches is not None else None, docs)
        return self.head(h) if head else h

    def documents(self, documents: torch.Tensor | None) -> DocumentContext | None:
        """The masks and positions of one forward over rows with these document ids (every pipeline stage calls
        this for its own layers)."""
        d = self.dims
        return document_context(documents, d.attention_mask, d.rope_positions, {d.window(i) for i in range(d.n_layers)},
                                self.query_split)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings entering the first block (a pipeline's first stage calls this)."""
        h = self.embed_tokens(tokens)
        return h * torch.tensor(self.dims.dim ** 0.5, dtype=h.dtype) if self.dims.scale_embeddings else h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's output (a pipeline's last stage calls this)."""
        logits = self.lm_head(self.norm(h))
        if self.dims.mup_base_dim:
            logits = logits * logit_scale(self.dims)
        return softcap(logits, self.dims.logit_softcap) if self.dims.logit_softcap else logits

    def new_caches(self, batch: int, max_len: int, valid: torch.Tensor | None = None) -> list[KVCache]:
        """One cache per layer; `valid` [batch, max_len] marks real tokens when prompts are left-padded."""
        p = self.lm_head.weight
        d = self.dims
        return [KVCache(batch, d.n_kv_heads, d.head_dim, max_len, p.dtype, p.device, valid)
                for _ in range(d.n_layers)]

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        for name, param in self.named_parameters():
            param.copy_(init_parameter(name, tuple(param.shape), self.dims, seed, param.device))


def build_model(config: ModelConfig | ModelDims, device: torch.device | str = "meta") -> Transformer:
    """The model with unset weights on `device` (meta by default: parallelise first, materialise what is local)."""
    dims = config if isinstance(config, ModelDims) else ModelDims.from_config(config)
    with torch.device(device):
        return Transformer(dims)


def init_parameter(name: str, shape: tuple[int, ...], dims: ModelDims, seed: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The initial value of the full (unsharded) parameter `name`, the same in every layout and on every rank.

    Norms start at one, biases at zero; other weights are N(0, init_std), with the residual-stream outputs (o_proj,
    down_proj, the experts' down_proj) scaled by 1/sqrt(2·n_layers) as in GPT-2 so the residual variance does not
    grow with depth (and under μP the hidden matrices by sqrt(mup_base_dim/dim), `parallel.mup`). Each
    parameter draws from its own generator seeded by (seed, name): a rank that owns only some layers or shards still
    gets identical numbers, and one holding experts [a, b) of a 3-D expert parameter slices the same draw.
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, device=device)
    std = dims.init_std * init_std_scale(name, len(shape), dims)
    if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
        std /= math.sqrt(2 * dims.n_layers)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, device=device).normal_(0.0, std, generator=generator)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over every position, computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten())
