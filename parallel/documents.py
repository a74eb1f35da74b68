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
A process that computes only some of each row's queries (a context-parallel rank, `QuerySplit`) holds the tokens at
`split_positions`; its mask is its queries against every rank's keys (`SplitMask`), and its RoPE positions are its
tokens' own. Under per-document masks the split weighs each chunk's attention work (`balanced_positions`).
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


def dense_mask(documents: torch.Tensor, window: int, queries: torch.Tensor | None = None,
               keys: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, 1, queries, keys] True where a query may attend: same document, not later, within `window` if set.
    `queries` and `keys` [batch, n]: the row positions of the query and key tokens, in the order the attention holds
    them (a context-parallel rank's, `split_positions`); every position in order by default."""
    q, k = _row_positions(documents, queries), _row_positions(documents, keys)
    later = k[:, None, :] <= q[:, :, None]
    allowed = later & (q[:, :, None] - k[:, None, :] < window) if window else later
    same = documents.gather(1, q)[:, :, None] == documents.gather(1, k)[:, None, :]
    return (same & allowed)[:, None]


def _row_positions(documents: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    if positions is None:
        positions = torch.arange(documents.shape[-1], device=documents.device)[None]
    return positions.expand(documents.shape[0], -1)


def block_mask(documents: torch.Tensor, window: int, queries: torch.Tensor | None = None,
               keys: torch.Tensor | None = None) -> Any:
    """The same mask as `dense_mask`, as a FlexAttention BlockMask."""
    q_at, k_at = _row_positions(documents, queries), _row_positions(documents, keys)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = q_at[b, q], k_at[b, k]
        allowed = (documents[b, q] == documents[b, k]) & (k <= q)
        return allowed & (q - k < window) if window else allowed

    return compiled_create_block_mask()(mask_mod, documents.shape[0], None, q_at.shape[-1], k_at.shape[-1],
                                        device=documents.device)


@cache
def compiled_create_block_mask() -> Any:
    """create_block_mask compiled once per process: eager, it materialises the whole [queries, keys] mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


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
class QuerySplit:
    """Which of each row's queries this process computes: those of rank `rank` of `ranks` context-parallel ranks
    (`split_positions`); its keys are every rank's."""

    ranks: int
    rank: int


def chunk_ids(ranks: int, rank: int) -> tuple[int, int]:
    """The two of a row's 2·ranks chunks that rank `rank` holds under the head-tail split, head and tail."""
    return rank, 2 * ranks - 1 - rank


def head_tail_positions(seq: int, ranks: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[ranks, seq / ranks]: the row cut into 2·ranks chunks, rank r holding chunks r and 2·ranks−1−r
    (`chunk_ids`), head first. Under causal attention every rank's queries then see the same number of keys in
    total."""
    chunks = torch.arange(seq, device=device).view(2 * ranks, -1)
    return torch.stack([chunks[list(chunk_ids(ranks, r))].flatten() for r in range(ranks)])


def balanced_positions(documents: torch.Tensor, ranks: int) -> torch.Tensor:
    """[batch, ranks, seq / ranks]: each row cut into equal chunks, dealt to the ranks so that their queries attend
    about as many keys under per-document masks, a rank's chunks in row order.

    Head-tail balances one causal stream only: with documents, a chunk's work is the sum of its tokens' positions within
    their documents, and where the long documents lie decides it (at seq 128k with exponentially distributed lengths of
    mean 32k, the busiest of 4 ranks attends 1.36× the mean). Here each row is cut into 2·m chunks per rank and dealt
    heaviest first, back and forth over the ranks (0 … r−1, r−1 … 0, …), each rank taking as many: with m = 4 or 8 the
    busiest rank attends within a few percent of the mean, and one document over the row gives every rank exactly the
    same work, as head-tail does. Computed on the device from the document ids every rank holds, so every rank deals the
    same without a word between them; sliding windows are not weighed (a layer's window caps its work)."""
    batch, seq = documents.shape
    per_rank = chunks_per_rank(seq, ranks, documents.device)
    count = ranks * per_rank
    work = (document_positions(documents) + 1).view(batch, count, -1).sum(-1)
    heaviest = work.argsort(dim=-1, descending=True, stable=True)
    turn = torch.arange(count, device=documents.device)
    owner = torch.where(turn // ranks % 2 == 0, turn % ranks, ranks - 1 - turn % ranks)
    dealt = heaviest[:, owner.argsort(stable=True)].view(batch, ranks, per_rank).sort(-1).values
    size = seq // count
    return (dealt[..., None] * size + torch.arange(size, device=documents.device)).view(batch, ranks, -1)


def chunks_per_rank(seq: int, ranks: int, device: torch.device) -> int:
    """2·m chunks a rank holds of a row split by `balanced_positions`: m the largest of 8, 4, 2, 1 that cuts the row
    evenly, into chunks no shorter than a FlexAttention tile on CUDA (so a tile of queries lies in one chunk)."""
    tile = 128 if use_flex_attention(device) else 1
    return next((2 * m for m in (8, 4, 2) if seq % (2 * ranks * m) == 0 and seq // (2 * ranks * m) >= tile), 2)


def split_positions(documents: torch.Tensor | None, seq: int, ranks: int, attention_mask: str,
                    device: torch.device | str) -> torch.Tensor:
    """[batch or 1, ranks, seq / ranks]: the row positions of each context-parallel rank's tokens. Per-document
    masks deal chunks by their work (`balanced_positions`); plain causal rows split head-tail, which the fused
    bottom-right causal kernels need (`parallel.context_parallel`)."""
    if documents is not None and attention_mask == "document":
        return balanced_positions(documents, ranks)
    return head_tail_positions(seq, ranks, device)[None]


@dataclass(frozen=True)
class SplitMask:
    """A per-document mask of a context-parallel rank: its queries (at `split_positions`) against every rank's keys,
    gathered in rank order."""

    mask: Any


@dataclass(frozen=True)
class DocumentContext:
    """What one forward needs of the rows' documents: a mask per sliding window (None when attention stays causal
    over the row) and RoPE positions (None: positions count from the row's start). Over a `QuerySplit` a window's
    mask is a `SplitMask` and the positions are the split's tokens' own."""

    masks: dict[int, Any] | None
    positions: torch.Tensor | None

    def mask(self, window: int) -> Any:
        return None if self.masks is None else self.masks[window]


def document_context(documents: torch.Tensor | None, attention_mask: str, rope_positions: str,
                     windows: set[int], split: QuerySplit | None = None) -> DocumentContext | None:
    """The context of rows with document ids `documents` [batch, seq] for a model with these settings and layer
    windows, computing the queries of `split` (all of the row by default); None when the model treats every row as
    one stream (or no ids came), which is plain causal attention.

    Masks are built here, once per forward and distinct window, not in each layer (a block mask costs a pass over
    the tiles; a compiled block then only reads it).
    """
    if documents is None or (attention_mask == "causal" and rope_positions == "sequence"):
        return None
    build = block_mask if use_flex_attention(documents.device) else dense_mask
    positions = document_positions(documents) if rope_positions == "document" else None
    if split is None:
        masks = {w: build(documents, w) for w in windows} if attention_mask == "document" else None
        return DocumentContext(masks, positions)
    every = split_positions(documents, documents.shape[-1], split.ranks, attention_mask, documents.device)
    queries = every[:, split.rank].expand(documents.shape[0], -1)
    masks = None
    if attention_mask == "document":
        keys = every.flatten(1)
        masks = {w: SplitMask(build(documents, w, queries, keys)) for w in windows}
    return DocumentContext(masks, queries if positions is None else positions.gather(1, queries))
