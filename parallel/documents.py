"""Document boundaries inside packed rows, and the attention masks and RoPE positions that respect them.

`pretrain prep` packs documents into rows with an EOS token after each one (`dataprep.tokenize.pack`), so the
boundaries are in the tokens themselves: the loader derives them (`document_ids`) instead of the shards storing
them, which keeps every shard written before valid and leaves the loader's state unchanged.

Where a token belongs: an EOS ends its document and belongs to it; the token after an EOS starts the next document.
A row that starts in the middle of a document (the packer split it) counts that stretch as its first document: the
model cannot see the part in the previous row anyway. Under document masking an EOS still predicts the next
document's first token, but from its own document alone, as a first token would be predicted after a BOS.

Masks (`DocumentContext.mask`): a query sees keys of its own document, not after itself, and within the layer's
sliding window if it has one. How the mask is applied is decided in one place, `use_flex_attention`: on CUDA a
FlexAttention block mask (compiled: FlexAttention is meant to be, and the block mask skips whole tiles across
documents); elsewhere a boolean [batch, 1, seq, seq] mask for scaled_dot_product_attention — on CPU FlexAttention
runs only as an unfused reference that warns its backward may be wrong, and the boolean mask gives the same numbers.
A process that computes only some chunks of each row's queries (a context-parallel rank, `QueryChunks`) gets one mask
per chunk, its queries against the keys up to the chunk's end, and the positions of its chunks' tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[..., seq] int64: each token's document index within its row, 0 for the row's first document; a token
    after an EOS starts the next one."""
    after_eos = torch.zeros_like(tokens, dtype=torch.int64)
    after_eos[..., 1:] = (tokens[..., :-1] == eos_id).long()
    return after_eos.cumsum(-1)


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """[..., seq] int64: each token's position within its document (0 at a document's first token)."""
    index = torch.arange(documents.shape[-1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[..., 1:] = documents[..., 1:] != documents[..., :-1]
    return index - torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values


def use_flex_attention(device: torch.device) -> bool:
    """FlexAttention block masks on CUDA, a boolean mask for SDPA elsewhere (the module docstring says why)."""
    return device.type == "cuda"


def dense_mask(documents: torch.Tensor, window: int, span: tuple[int, int] | None = None) -> torch.Tensor:
    """[batch, 1, queries, keys] True where a query may attend: same document, not later, within `window` if set.
    The queries are the row's positions in `span` (start, stop), all of them by default; the keys are those up to
    the span's stop."""
    start, stop = span or (0, documents.shape[-1])
    q = torch.arange(start, stop, device=documents.device)[:, None]
    k = torch.arange(stop, device=documents.device)
    allowed = (k <= q) & (q - k < window) if window else k <= q
    return (documents[:, None, start:stop, None] == documents[:, None, None, :stop]) & allowed


def block_mask(documents: torch.Tensor, window: int, span: tuple[int, int] | None = None) -> Any:
    """The same mask as `dense_mask`, as a FlexAttention BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask

    start, stop = span or (0, documents.shape[-1])

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = q + start
        allowed = (documents[b, q] == documents[b, k]) & (k <= q)
        return allowed & (q - k < window) if window else allowed

    return create_block_mask(mask_mod, documents.shape[0], None, stop - start, stop, device=documents.device,
                             _compile=True)


@cache
def compiled_flex_attention() -> Any:
    """flex_attention compiled once per process (eager FlexAttention is an unfused reference)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@cache
def softcap_score_mod(cap: float) -> Any:
    """FlexAttention's score_mod for soft-capped scores, cap·tanh(s/cap) (`parallel.model.softcap`); one function
    per cap, so a compiled flex_attention sees the same object every call and does not recompile."""

    def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor,
                  k: torch.Tensor) -> torch.Tensor:
        return torch.tanh(score / cap) * cap

    return score_mod


@dataclass(frozen=True)
class QueryChunks:
    """The part of each row whose queries this process computes when the row is cut into `count` equal chunks and
    it holds those numbered `held`, in that order (context parallelism's load-balanced split,
    `parallel.context_parallel`); its keys stay the whole row's."""

    count: int
    held: tuple[int, ...]

    def spans(self, seq: int) -> list[tuple[int, int]]:
        """(start, stop) positions of the held chunks of a row of `seq` tokens."""
        c = seq // self.count
        return [(i * c, (i + 1) * c) for i in self.held]


@dataclass(frozen=True)
class DocumentContext:
    """What one forward needs of the rows' documents: a mask per sliding window (None when attention stays causal
    over the row) and RoPE positions (None: positions count from the row's start). Over `QueryChunks` a window's
    mask is a tuple, one per held chunk, and the positions are the held chunks' only."""

    masks: dict[int, Any] | None
    positions: torch.Tensor | None

    def mask(self, window: int) -> Any:
        return None if self.masks is None else self.masks[window]


def document_context(documents: torch.Tensor | None, attention_mask: str, rope_positions: str,
                     windows: set[int], chunks: QueryChunks | None = None) -> DocumentContext | None:
    """The context of rows with document ids `documents` [batch, seq] for a model with these settings and layer
    windows, computing the queries of `chunks` (all of the row by default); None when the model treats every row as
    one stream (or no ids came), which is plain causal attention.

    Masks are built here, once per forward and distinct window, not in each layer (a block mask costs a pass over
    the tiles; a compiled block then only reads it).
    """
    if documents is None or (attention_mask == "causal" and rope_positions == "sequence"):
        return None
    spans = chunks.spans(documents.shape[-1]) if chunks is not None else None
    masks = None
    if attention_mask == "document":
        build = block_mask if use_flex_attention(documents.device) else dense_mask
        masks = {w: build(documents, w) if spans is None else tuple(build(documents, w, span) for span in spans)
                 for w in windows}
    positions = document_positions(documents) if rope_positions == "document" else None
    if positions is not None and spans is not None:
        positions = torch.cat([positions[..., start:stop] for start, stop in spans], dim=-1)
    return DocumentContext(masks, positions)
