"""Pipeline parallelism through DeepSpeed's PipelineModule (1F1B schedule), built from the same model's parts.

The model becomes a sequence of pieces, [embedding, block 0, ..., block L-1, final norm + lm_head], split into
stages balanced by parameter count (`partition_balanced`, as DeepSpeed's 'parameters' method). Each rank
materialises only its stage's pieces. With tied embeddings the embedding is a `TiedLayerSpec` on the first and the
last stage, and DeepSpeed all-reduces its gradient between the two.

Pieces pass one tensor (the hidden states) between stages; every block computes RoPE for itself, so nothing else
has to travel. The first piece runs the model's `embed` and the last its `head`, so a family's embedding scale and
logit soft-cap apply as in one process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from deepspeed.runtime.utils import partition_balanced
from torch import nn

from parallel.materialize import materialize_model
from parallel.model import Transformer, softcap
from parallel.parallel_dims import ParallelDims

if TYPE_CHECKING:
    from orchestrator.spec import JobSpec
    from parallel.parallelize import Parallelized


class EmbeddingPiece(nn.Module):
    """The embedding; on the first stage it runs the model's own `embed` (the lookup and the family's scale)."""

    def __init__(self, model: Transformer, tied: bool = False):
        super().__init__()
        self.embed_tokens = model.embed_tokens
        self.lm_head = model.lm_head if tied else None  # the last stage projects with the same weight
        self.embed = model.embed  # a bound method: the model's parts are this piece's
        self.logit_softcap = model.dims.logit_softcap

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)


def project_tied(piece: EmbeddingPiece, h: torch.Tensor) -> torch.Tensor:
    """The tied last piece: the second half of the model's `head` (the norm ran in the piece before)."""
    logits = piece.lm_head(h)
    return softcap(logits, piece.logit_softcap) if piece.logit_softcap else logits


class BlockPiece(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block(h)


class HeadPiece(nn.Module):
    """The final norm, and unless the lm_head is tied to the embedding, the model's whole `head`."""

    def __init__(self, model: Transformer, tied: bool):
        super().__init__()
        self.norm = model.norm
        self.lm_head = None if tied else model.lm_head
        self.head = model.head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h) if self.lm_head is None else self.head(h)


def _pieces(model: Transformer) -> list[tuple[list[str], object]]:
    """(model parts it holds, piece or spec) in pipeline order."""
    tied = model.dims.tie_embeddings
    if tied:
        embed = [(["embed_tokens"], TiedLayerSpec("embed", EmbeddingPiece, model, True,
                                                  tied_weight_attr=["embed_tokens.weight"]))]
    else:
        embed = [(["embed_tokens"], EmbeddingPiece(model))]
    blocks = [([f"layers.{i}"], BlockPiece(block)) for i, block in enumerate(model.layers)]
    head = [(["norm"] if tied else ["norm", "lm_head"], HeadPiece(model, tied))]
    if tied:
        head.append((["embed_tokens"], TiedLayerSpec("embed", EmbeddingPiece, model, True, forward_fn=project_tied,
                                                     tied_weight_attr=["embed_tokens.weight"])))
    return embed + blocks + head


def _param_count(model: Transformer, parts: list[str]) -> int:
    counted = {id(p): p.numel() for part in parts for p in model.get_submodule(part).parameters()}
    return sum(counted.values())


def apply_pipeline_parallel(model: Transformer, dims: ParallelDims, loss_fn, seed: int,
                            device: torch.device) -> PipelineModule:
    """This rank's stage of `model` (on meta, already tensor-parallel if tp > 1) as a DeepSpeed PipelineModule,
    with its pieces materialised on `device` from `seed`."""
    materialize_model(model, seed, device, parts=stage_parts(model, dims))
    topology = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
    # 'parameters' recomputes the same balanced bounds inside DeepSpeed, from the same counts.
    return PipelineModule(layers=[piece for _, piece in _pieces(model)], topology=topology, loss_fn=loss_fn,
                          partition_method="parameters", activation_checkpoint_interval=0)


def stage_parts(model: Transformer, dims: ParallelDims) -> list[str]:
    """The model parts on this rank's pipeline stage (what `full_state_dict` gathers from it)."""
    pieces = _pieces(model)
    bounds = partition_balanced(weights=[_param_count(model, parts) for parts, _ in pieces], num_parts=dims.pp)
    return [part for parts, _ in pieces[bounds[dims.pp_rank]:bounds[dims.pp_rank + 1]] for part in parts]


def apply_deepspeed_pipeline(state: Parallelized, dims: ParallelDims, spec: JobSpec) -> None:
    """`parallelize_llama`'s pipeline step for the DeepSpeed engine: the PipelineModule of this rank's stage, which
    the engine then runs; the model's other parts stay on the meta device."""
    state.module = apply_pipeline_parallel(state.model, dims, state.loss_fn, spec.schedule.seed, state.device)
