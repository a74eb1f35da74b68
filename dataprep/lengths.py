"""Document-length distributions that merge across files: a sparse histogram over fine bins, counted per packing
task and summed per source for the report.

Lengths below `EXACT` tokens have a bin each; above, a bin is an eighth of an octave (lengths within 9% of each
other). Quantiles are read off the merged histogram as the upper edge of the bin holding them, so they are exact
below `EXACT` and at most 9% high above it; the maximum is kept exactly.
"""

from __future__ import annotations

import math

import numpy as np

EXACT = 64
PER_OCTAVE = 8
QUANTILES = (0.1, 0.5, 0.9, 0.99)


def length_bins(lengths: np.ndarray) -> np.ndarray:
    """The bin of each length (tokens of a document, EOS not counted)."""
    n = np.asarray(lengths, dtype=np.int64)
    above = EXACT + np.floor(PER_OCTAVE * np.log2(np.maximum(n, EXACT) / EXACT)).astype(np.int64)
    return np.where(n < EXACT, n, above)


def bin_upper(b: int) -> int:
    """The largest length counted in bin `b`."""
    return b if b < EXACT else math.ceil(EXACT * 2 ** ((b - EXACT + 1) / PER_OCTAVE)) - 1


def histogram(lengths: np.ndarray) -> dict[str, int]:
    """{bin: documents} of the nonzero bins (string keys: it travels as JSON in the stage results)."""
    bins, counts = np.unique(length_bins(lengths), return_counts=True)
    return {str(int(b)): int(c) for b, c in zip(bins, counts, strict=True)}


def merge(into: dict[str, int], other: dict[str, int]) -> None:
    for b, c in other.items():
        into[b] = into.get(b, 0) + c


def summary(hist: dict[str, int], longest: int, seq_len: int) -> dict:
    """What the report shows of one source: documents, quantiles, the share longer than seq_len (documents no row
    holds whole; counted by bin, so as approximate as the quantiles), and a histogram over powers of two
    ("64-127": documents)."""
    total = sum(hist.values())
    if not total:
        return {"documents": 0}
    ordered = sorted((int(b), c) for b, c in hist.items())
    cumulative, quantiles, pending = 0, {}, list(QUANTILES)
    for b, c in ordered:
        cumulative += c
        while pending and cumulative >= pending[0] * total:
            quantiles[f"p{round(pending.pop(0) * 100)}"] = min(bin_upper(b), longest)
    coarse: dict[str, int] = {}
    for b, c in ordered:
        low = 1 << max(0, bin_upper(b).bit_length() - 1) if bin_upper(b) else 0
        key = f"{low}-{2 * low - 1}" if low > 1 else str(low)
        coarse[key] = coarse.get(key, 0) + c
    longer = sum(c for b, c in ordered if bin_upper(b) > seq_len)
    return {"documents": total, "quantiles": {**quantiles, "max": longest},
            "share_over_seq_len": round(longer / total, 4), "histogram": coarse}
