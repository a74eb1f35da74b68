"""Pipeline parallelism with `torch.distributed.pipelining`: the model cut into stages, run by a 1F1B, interleaved
1F1B or zero-bubble schedule.

Stages: `parallel.pp_schedule` 1f1b gives each pp rank one stage; interleaved_1f1b and zero_bubble give it two
(virtual stages, looped: rank r runs stages r and r + pp), which shrinks the bubble by the number of stages per rank
(Narayanan et al. 2021); zero_bubble also splits each backward into input and weight gradients and fills the bubble
with the latter (Qi et al. 2023, ZB1P). Layers are split evenly; the embedding goes with the first stage, the final
norm and lm_head with the last.

A stage is a `StageModule` holding the parts of one `Transformer` under their original names (`layers.5.mlp...`), so a
rank's parameters, checkpoints and full state dicts use the same names in every layout. `prune_to_stages` drops the
parts of other ranks' stages from the model, which then still owns everything this rank trains.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from parallel.model import Transformer
from parallel.moe import uncounted

SCHEDULES = {"1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
             "zero_bubble": ScheduleInterleavedZeroBubble}


def stages_per_rank(schedule: str) -> int:
    return 1 if schedule == "1f1b" else 2


def stage_ids(pp_rank: int, pp: int, schedule: str) -> list[int]:
    return [pp_rank + v * pp for v in range(stages_per_rank(schedule))]


class StageModule(nn.Module):
    """Consecutive layers of a Transformer, with its embedding on the first stage and its norm + lm_head on the last.

    The forward takes tokens (first stage) or hidden states, and the rows' document ids on every stage (a keyword
    input of the schedule, `parallel.documents`), and returns hidden states or logits (last stage). The
    first stage runs the model's own `embed` and the last its `head` (bound methods over the same parts), so a
    family's embedding scale and logit soft-cap are applied exactly as in one process. Under `parallel.loss_chunks`
    the last stage also takes the targets and returns the loss of its slices (`slice_loss`, shape [1]), computed
    inside its forward, where FSDP has its parameters gathered; the schedule's loss then passes it through.
    """

    def __init__(self, model: Transformer, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.embed_tokens = model.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in layer_ids})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.embed = model.embed if first else None
        self.head = model.head if last else None
        self.documents = model.documents
        self.slice_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (h, targets) → loss

    def forward(self, h: torch.Tensor, documents: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            h = self.embed(h)
        docs = self.documents(documents)
        for layer in self.layers.values():
            h = layer(h, None, docs)
        if self.head is None:
            return h
        if self.slice_loss is None:
            return self.head(h)
        return self.slice_loss(h, targets).reshape(1)  # the schedule concatenates the micro-batches' outputs


def prune_to_stages(model: Transformer, pp_rank: int, pp: int, schedule: str) -> list[StageModule]:
    """This rank's stage modules; `model` keeps only their parts (layers become a ModuleDict keyed by index)."""
    ids = stage_ids(pp_rank, pp, schedule)
    n_stages = pp * stages_per_rank(schedule)
    per_stage = model.dims.n_layers // n_stages
    layers = {s: list(range(s * per_stage, (s + 1) * per_stage)) for s in ids}
    model.layers = nn.ModuleDict({str(i): model.layers[i] for s in ids for i in layers[s]})
    first, last = 0 in ids, n_stages - 1 in ids
    stages = [StageModule(model, layers[s], s == 0, s == n_stages - 1) for s in ids]
    if not first:
        model.embed_tokens = None
    if not last:
        model.norm = model.lm_head = None
    return stages


def build_schedule(stages: list[StageModule], pp_rank: int, pp: int, schedule: str, n_microbatches: int,
                   loss_fn: Callable, device: torch.device, group) -> tuple[object, bool, bool]:
    """The schedule running this rank's stages, and whether this rank holds the first and the last stage.

    Gradients are averaged over micro-batches (`scale_grads`), matching a loss that is a mean per micro-batch.
    """
    ids = stage_ids(pp_rank, pp, schedule)
    n_stages = pp * stages_per_rank(schedule)
    pipeline_stages = [PipelineStage(module, s, n_stages, device, group=group)
                       for module, s in zip(stages, ids, strict=True)]
    for stage in pipeline_stages:
        _infer_uncounted(stage)
    cls = SCHEDULES[schedule]
    runner = cls(pipeline_stages[0] if schedule == "1f1b" else pipeline_stages, n_microbatches=n_microbatches,
                 loss_fn=loss_fn, scale_grads=True)
    return runner, 0 in ids, n_stages - 1 in ids


def _infer_uncounted(stage: PipelineStage) -> None:
    """The stage's shape inference (torch runs it at the first step, through the stage module, on the first
    micro-batch or on empty tensors) left out of MoE routing statistics, which must count each training token
    once (`parallel.moe.uncounted`)."""
    infer = getattr(stage, "_forward_metadata_inference", None)
    if infer is None:
        return

    def run(*args, **kwargs):
        with uncounted(stage.submod):
            return infer(*args, **kwargs)

    stage._forward_metadata_inference = run


def bubble_fraction(pp: int, n_microbatches: int, schedule: str) -> float:
    """The idle share of a step on each rank in theory: (p − 1) / (v·m + p − 1) for p ranks, m micro-batches and v
    stages per rank (1F1B: v = 1, so (p − 1) / (m + p − 1)); zero_bubble's is taken as interleaved 1F1B's, an upper
    bound, since it fills part of that idle time with weight gradients."""
    v = stages_per_rank(schedule)
    return (pp - 1) / (v * n_microbatches + pp - 1)
