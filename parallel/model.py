"""A Llama-style decoder, readable top to bottom: pre-norm RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases.

Parameter names are Hugging Face Llama's without the leading `model.` (`embed_tokens.weight`,
`layers.3.self_attn.q_proj.weight`, `layers.3.mlp.gate_proj.weight`, `norm.weight`; `lm_head.weight` as is), and RoPE
uses the same rotate-half layout, so converting to and from `LlamaForCausalLM` is a rename with no permutation.

The model knows nothing about parallelism: `parallel.megatron_tp` swaps its linears for sharded ones and lowers
`n_heads` / `n_kv_heads` to the local counts, `parallel.deepspeed_pipeline` regroups its parts into stages. Weights are
initialised per parameter name (`init_parameter`), so every layout starts from exactly the same numbers.

`forward` returns logits; the loss lives outside (`cross_entropy` here, a vocab-parallel one under tensor parallelism)
so that a sharded lm_head never has to gather full-vocab logits. A `KVCache` is the seam for incremental decoding.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.spec import ModelConfig


@dataclass(frozen=True)
class ModelDims:
    """The sizes the model is built from, with the spec's defaults resolved."""

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

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_config(cls, config: ModelConfig) -> ModelDims:
        if config.vocab_size is None:
            raise ValueError("model.vocab_size must be resolved (from the shards' tokenizer) before building the model")
        ffn = config.ffn_dim
        if ffn is None:
            # Llama's rule: 2/3 of 4·dim (SwiGLU has three matrices), rounded up to multiple_of.
            ffn = config.multiple_of * math.ceil(int(8 * config.dim / 3) / config.multiple_of)
        return cls(
            vocab_size=config.vocab_size, dim=config.dim, n_layers=config.n_layers, n_heads=config.n_heads,
            n_kv_heads=config.n_kv_heads or config.n_heads, ffn_dim=ffn, norm_eps=config.norm_eps,
            rope_theta=config.rope_theta, tie_embeddings=config.tie_embeddings, init_std=config.init_std,
        )

    def num_params(self, with_embeddings: bool = True) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        block = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim
        embed = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * block + self.dim + (embed if with_embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N + 12·L·seq·dim (PaLM, appendix B; what nanoGPT's MFU uses).

        N counts the weights that take part in matmuls: every block and the lm_head (forward 2·N, backward 4·N);
        the input embedding is a lookup and is left out. 12·L·seq·dim is attention's QK^T and AV, forward and
        backward, counted without the causal halving, as the reference figures in PERF-BASELINES.md are.
        """
        matmul_params = self.num_params(with_embeddings=False) + self.vocab_size * self.dim
        return 6 * matmul_params + 12 * self.n_layers * seq_len * self.dim


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


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE, computed on first use per (length, device) and kept; no parameters, no state."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (length, str(device))
        if key not in self._cache:
            inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
            angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
            angles = torch.cat([angles, angles], dim=-1).to(device)
            self._cache[key] = (angles.cos(), angles.sin())
        return self._cache[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [batch, heads, seq, head_dim] by position, in Hugging Face's rotate-half layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


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

    def attention_mask(self, new: int) -> torch.Tensor | None:
        """Which keys the `new` latest queries may see (True: attend); None when plain causal attention is right."""
        end = self.pos
        if self.valid is None and new == end:
            return None
        # Each new query sees every earlier key and the new ones up to itself.
        mask = torch.ones(new, end, dtype=torch.bool, device=self.k.device).tril(end - new)
        if self.valid is None:
            return mask
        own = torch.arange(end, device=mask.device) == torch.arange(end - new, end, device=mask.device)[:, None]
        return (mask & self.valid[:, None, None, :end]) | own


class Attention(nn.Module):
    def __init__(self, dims: ModelDims, rotary: RotaryEmbedding):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = dims.n_heads, dims.n_kv_heads, dims.head_dim
        self.q_proj = nn.Linear(dims.dim, dims.n_heads * dims.head_dim, bias=False)
        self.k_proj = nn.Linear(dims.dim, dims.n_kv_heads * dims.head_dim, bias=False)
        self.v_proj = nn.Linear(dims.dim, dims.n_kv_heads * dims.head_dim, bias=False)
        self.o_proj = nn.Linear(dims.n_heads * dims.head_dim, dims.dim, bias=False)
        self.rotary = rotary

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        # Shapes are read from the projections, not from x: under tensor parallelism they hold this rank's heads,
        # and under sequence parallelism the whole sequence while x holds a slice of it.
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        b, s, _ = q.shape
        q = q.view(b, s, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, s, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)
        start = cache.pos if cache is not None else 0
        cos, sin = self.rotary(start + s, x.device)
        q, k = apply_rope(q, cos[start:], sin[start:]), apply_rope(k, cos[start:], sin[start:])
        mask = None
        if cache is not None:
            k, v = cache.update(k, v)
            mask = cache.attention_mask(s)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        self.gate_proj = nn.Linear(dims.dim, dims.ffn_dim, bias=False)
        self.up_proj = nn.Linear(dims.dim, dims.ffn_dim, bias=False)
        self.down_proj = nn.Linear(dims.ffn_dim, dims.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, dims: ModelDims, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(dims.dim, dims.norm_eps)
        self.self_attn = Attention(dims, rotary)
        self.post_attention_layernorm = RMSNorm(dims.dim, dims.norm_eps)
        self.mlp = MLP(dims)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        self.dims = dims
        self.rotary = RotaryEmbedding(dims.head_dim, dims.rope_theta)
        self.embed_tokens = nn.Embedding(dims.vocab_size, dims.dim)
        self.layers = nn.ModuleList(Block(dims, self.rotary) for _ in range(dims.n_layers))
        self.norm = RMSNorm(dims.dim, dims.norm_eps)
        self.lm_head = nn.Linear(dims.dim, dims.vocab_size, bias=False)
        if dims.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        h = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, caches[i] if caches is not None else None)
        return self.lm_head(self.norm(h))

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

    Norms start at one; other weights are N(0, init_std), with the residual-stream outputs (o_proj, down_proj) scaled
    by 1/sqrt(2·n_layers) as in GPT-2 so the residual variance does not grow with depth. Each parameter draws from its
    own generator seeded by (seed, name): a rank that owns only some layers or shards still gets identical numbers.
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    std = dims.init_std
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2 * dims.n_layers)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, device=device).normal_(0.0, std, generator=generator)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over every position, computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten())
