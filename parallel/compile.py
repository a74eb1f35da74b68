"""torch.compile per transformer block: small graphs that compile once (every block has the same shapes) and
leave the collectives between them to the engine.

Apply after `parallel.activation_checkpoint` (torchtitan's order): a checkpointed block then compiles as one region
whose recomputation inductor fuses into the backward, instead of an eager checkpoint around a compiled block.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def apply_compile(blocks: nn.ModuleList | list[nn.Module], backend: str | Any = "inductor") -> None:
    """Compile each block's call in place (parameter names unchanged); `backend` is torch.compile's."""
    for block in blocks:
        block.compile(backend=backend)
