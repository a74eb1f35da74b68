"""The maximal update parametrization (μP) for Adam: which weights scale with width, and by how much.

Under `model.parametrization: mup` a model of width `dim` is trained as Tensor Programs V (Yang et al., 2022)
prescribes for Adam, relative to the base width `mup_base_dim` at which init_std and the learning rate were tuned
(width_mult = dim / mup_base_dim, the `mup` package's name):

- hidden matrices (every 2-D weight inside the blocks): init std × sqrt(1/width_mult) (variance ∝ 1/fan_in) and
  Adam learning rate × 1/width_mult, so each update moves a hidden activation by the same amount at every width;
- the embedding, the norms, biases and the lm_head keep init_std and the learning rate: each entry of an embedding
  row (or of a logit's weights) is a coordinate of its own;
- logits × 1/width_mult (the `mup` package's MuReadout): a readout summing dim coordinates of a Θ(1) update would
  otherwise grow with width;
- attention scores × 1/head_dim instead of 1/sqrt(head_dim): queries and keys become correlated in training, and
  their dot product then grows like head_dim, not its square root (`attn_scale_dim` = head_dim²).

At dim = mup_base_dim the first three are identities, so a run tuned under μP at the base width is the standard run
but for the attention scale. `to_standard` folds the multipliers into the weights for export, so other frameworks
load an ordinary model computing the same logits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from parallel.model import ModelDims


def width_mult(dims: ModelDims) -> float:
    """dim / mup_base_dim under μP, 1 under the standard parametrization."""
    return dims.dim / dims.mup_base_dim if dims.mup_base_dim else 1.0


def is_hidden_matrix(name: str, ndim: int) -> bool:
    """A weight whose both sides grow with width: every matrix but the embedding and the lm_head (whichever
    wrappers, activation checkpointing's or compile's, prefix the name)."""
    return ndim >= 2 and "embed_tokens" not in name and "lm_head" not in name


def init_std_scale(name: str, ndim: int, dims: ModelDims) -> float:
    """What init_std is multiplied by for parameter `name` (1 under the standard parametrization)."""
    if dims.mup_base_dim and is_hidden_matrix(name, ndim):
        return 1 / math.sqrt(width_mult(dims))
    return 1.0


def hidden_lr_scale(dims: ModelDims) -> float | None:
    """The hidden matrices' learning-rate multiplier under μP; None under the standard parametrization (one group
    per decay rate, as before μP existed)."""
    return 1 / width_mult(dims) if dims.mup_base_dim else None


def logit_scale(dims: ModelDims) -> float:
    """What the lm_head's output is multiplied by: mup_base_dim / dim under μP."""
    return 1 / width_mult(dims)


def attention_scale_dim(dims: ModelDims) -> int:
    """The `attn_scale_dim` μP implies: scores × 1/sqrt(head_dim²) = 1/head_dim."""
    return dims.head_dim ** 2


def to_standard(state: Mapping[str, torch.Tensor],
                dims: ModelDims) -> tuple[dict[str, torch.Tensor], ModelDims]:
    """The same model in the standard parametrization: logits' multiplier folded into lm_head, the attention scale's
    ratio to 1/sqrt(head_dim) into the queries (their projection, or their norm's weight when a query norm would
    undo a scaled projection). A standard model is returned as it is; `state` is left unchanged."""
    if not dims.mup_base_dim:
        return dict(state), dims
    out = dict(state)
    out["lm_head.weight"] = state["lm_head.weight"] * logit_scale(dims)
    query = dims.head_dim ** 0.5 / dims.head_dim  # (1/head_dim) / (1/sqrt(head_dim))
    for layer in range(dims.n_layers):
        prefix = f"layers.{layer}.self_attn."
        names = [f"{prefix}q_norm.weight"] if dims.qk_norm != "none" else \
            [f"{prefix}q_proj.weight", *([f"{prefix}q_proj.bias"] if dims.qkv_bias else [])]
        for name in names:
            out[name] = state[name] * query
    return out, dataclasses.replace(dims, mup_base_dim=0, attn_scale_dim=0)
