"""Slicing a list of texts into batches of bounded size: what one vectorized step holds at once follows the batch,
not the file or the part it came from."""

from __future__ import annotations

from collections.abc import Iterator, Sequence


def text_batches(texts: Sequence[str], max_chars: int, max_texts: int | None = None) -> Iterator[tuple[int, int]]:
    """[lo, hi) ranges of at most `max_chars` characters and `max_texts` texts (a longer text alone)."""
    lo = 0
    while lo < len(texts):
        hi, size = lo + 1, len(texts[lo])
        while (hi < len(texts) and (max_texts is None or hi - lo < max_texts)
               and size + len(texts[hi]) <= max_chars):
            size += len(texts[hi])
            hi += 1
        yield lo, hi
        lo = hi
