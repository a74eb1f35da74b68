"""torch.compile per transformer block: small graphs that compile once (every block has the same shapes) and
leave the collectives between them to the engine."""

from __future__ import annotations

from torch import nn


def apply_compile(blocks: nn.ModuleList) -> None:
    for block in blocks:
        block.compile()
