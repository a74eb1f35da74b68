"""Activation checkpointing: keep only each block's input in the forward pass and recompute the rest in backward.

The block's `forward` is swapped on the instance rather than wrapped in another module, so parameter names (and
with them checkpoints and the Hugging Face mapping) are the same with and without it.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(blocks: nn.ModuleList) -> None:
    for block in blocks:
        block.forward = functools.partial(checkpoint, type(block).forward, block, use_reentrant=False)
