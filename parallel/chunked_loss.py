"""The head and the loss over slices of a micro-batch's tokens (`parallel.loss_chunks`): one slice's logits alive
at a time instead of all of them.

At long contexts the logits are the largest thing a step holds: [tokens, vocab] in bf16 with the loss's buffer of
the same size beside them in the backward (the 1B model at seq 128k on one GPU: 25 GiB of a 42 GiB peak under full
checkpointing with activation offload). Each slice runs the final norm, the lm_head and the loss under
checkpointing, so the forward keeps only the last block's output; the slice's backward recomputes its logits (one
more lm_head forward, 2·dim·vocab FLOPs a token: 1B on an H200 ran 3.8% slower at seq 4k, 0.7% at 128k) and
lets them go before the next slice's.

Under sequence parallelism each tp rank holds its own part of the row, and the lm_head all-gathers its input over
tp: slice i of every rank's part makes one global slice, whose targets are those parts' targets in rank order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def chunked_loss(head: Callable[[torch.Tensor], torch.Tensor], loss_fn: Loss, h: torch.Tensor,
                 targets: torch.Tensor, chunks: int, sequence_shards: int = 1) -> torch.Tensor:
    """The mean of `loss_fn(head(h), targets)` over every token, computed `chunks` slices of the sequence at a time.

    `h` [batch, seq / sequence_shards, dim] is the last block's output on this rank and `targets` [batch, seq];
    `sequence_shards` is tp under sequence parallelism (the lm_head gathers `h` over the tp ranks in rank order),
    else 1. The slices are equal, so the mean of their means is the mean over the tokens."""
    rows, seq = targets.shape
    local = h.shape[1]
    if local * sequence_shards != seq or local % chunks:
        raise ValueError(f"chunked_loss: {local} tokens a row on this rank (of {seq}, over {sequence_shards} "
                         f"sequence shards) do not split into {chunks} equal slices")
    per_slice = local // chunks
    target_slices = targets.view(rows, sequence_shards, chunks, per_slice).unbind(2)
    recompute = torch.is_grad_enabled()
    losses = []
    for part, target in zip(h.split(per_slice, dim=1), target_slices, strict=True):
        target = target.reshape(rows, sequence_shards * per_slice)
        if recompute:
            # Recomputed to the end: stopping early raises out of a compiled loss's autograd.Function, which
            # torch 2.11 turns into a SystemError (pytorch/pytorch#179536). The head draws no random numbers.
            losses.append(checkpoint(_slice_loss, head, loss_fn, part, target, use_reentrant=False,
                                     early_stop=False, preserve_rng_state=False))
        else:
            losses.append(_slice_loss(head, loss_fn, part, target))
    return torch.stack(losses).mean()


def _slice_loss(head: Callable[[torch.Tensor], torch.Tensor], loss_fn: Loss, h: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
    return loss_fn(head(h), targets)
