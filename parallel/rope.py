"""Rotary position embeddings: the frequency table, plain or stretched for longer contexts.

Three published ways to stretch a model past the context it was trained on, each a change of the inverse
frequencies only (and, for YaRN, one scale on cos/sin):
- linear (position interpolation): every frequency divided by `factor`;
- llama3 (Llama 3.1/3.2): long wavelengths divided by `factor`, short ones kept, a smooth ramp between;
- yarn: the same idea per rotation count (`beta_fast`/`beta_slow` bound the ramp), plus an attention temperature.
The formulas are the papers' as Hugging Face's `modeling_rope_utils` implements them, so imported checkpoints give
the same logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RopeScaling:
    """How the frequencies are stretched; `kind="none"` is plain RoPE."""

    kind: str = "none"  # none | linear | llama3 | yarn
    factor: float = 1.0
    original_max_positions: int = 8192
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 0.0  # yarn's cos/sin scale; 0: 0.1·ln(factor) + 1


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[torch.Tensor, float]:
    """[head_dim / 2] inverse frequencies and the factor cos/sin are multiplied by (1 but for YaRN).

    Computed on the CPU whatever the default device (models are built on meta) and moved with the tables."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim)
    if scaling.kind == "linear":
        return inv_freq / scaling.factor, 1.0
    if scaling.kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if scaling.kind == "yarn":
        return _yarn(head_dim, theta, scaling)
    return inv_freq, 1.0


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_freq_wavelen = s.original_max_positions / s.low_freq_factor
    high_freq_wavelen = s.original_max_positions / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_positions / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(head_dim: int, theta: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(s.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (s.factor * pos_freqs)
    keep = 1 - ramp
    inv_freq = interpolated * (1 - keep) + extrapolated * keep
    attention = s.attention_factor or (0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0)
    return inv_freq, attention


class RotaryEmbedding(nn.Module):
    """cos/sin tables, computed on first use per (length, device) and kept; no parameters, no state."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()):
        super().__init__()
        self.inv_freq, self.attention_factor = inverse_frequencies(head_dim, theta, scaling)
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (length, str(device))
        if key not in self._cache:
            angles = torch.outer(torch.arange(length, dtype=torch.float32, device="cpu"), self.inv_freq)
            angles = torch.cat([angles, angles], dim=-1).to(device)
            self._cache[key] = (angles.cos() * self.attention_factor, angles.sin() * self.attention_factor)
        return self._cache[key]

    def at(self, positions: torch.Tensor, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables at each row's own `positions` [batch, seq] (RoPE restarting per document), all below `length`,
        as [batch, 1, seq, head_dim] to broadcast over heads."""
        cos, sin = self(length, device)
        return cos[positions][:, None], sin[positions][:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [batch, heads, seq, head_dim] by position, in Hugging Face's rotate-half layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
