"""Turn a model built on the meta device into real tensors: only the parts this rank owns, only its shards.

Each parameter gets `init_parameter`'s value for its full shape, then this rank's slice, so a layout never
changes the starting point. Sharded parameters are marked `tensor_model_parallel` (DeepSpeed's gradient-norm
code counts them on every tensor-parallel rank, and replicated ones once).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from parallel.lora import initial_value
from parallel.model import Transformer
from parallel.moe import materialize_buffers


@torch.no_grad()
def materialize_model(model: Transformer, seed: int, device: torch.device, parts: Iterable[str] | None = None) -> None:
    """Allocate and initialise the parameters under the named top-level parts (`embed_tokens`, `layers.3`, `norm`,
    `lm_head`; all when None) on `device`; the rest stays on meta."""
    wanted = None if parts is None else set(parts)
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own or (wanted is not None and not _is_under(prefix, wanted)):
            continue
        shard_dim = getattr(module, "shard_dim", None)
        size = getattr(module, "tp_size", 1)
        for name, param in own:
            full_name = f"{prefix}.{name}" if prefix else name
            if full_name == "lm_head.weight" and model.dims.tie_embeddings:
                continue  # the embedding's; re-tied below
            shape = list(param.shape)
            if shard_dim is not None:
                shape[shard_dim] *= size
            value = initial_value(full_name, tuple(shape), model.dims, seed, device)
            if shard_dim is not None:
                value = value.chunk(size, dim=shard_dim)[module.tp_rank].contiguous()
            new = nn.Parameter(value, requires_grad=param.requires_grad)
            if shard_dim is not None and size > 1:
                new.tensor_model_parallel = True
                new.partition_dim = shard_dim
            setattr(module, name, new)
    materialize_buffers(model, device)
    if model.dims.tie_embeddings and not model.embed_tokens.weight.is_meta:
        model.lm_head.weight = model.embed_tokens.weight


def _is_under(prefix: str, parts: set[str]) -> bool:
    return any(prefix == p or prefix.startswith(p + ".") for p in parts)
