"""Gopher repetition rules (Rae et al. 2021, table A1): repeated lines, paragraphs and word n-grams.

The n-gram statistics are computed on integer word ids with numpy, not on Python tuples: a document's words are
hashed once, every n-gram becomes one combined 64-bit id, and `np.unique` finds the repeats.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from dataprep.config import GopherRepetitionConfig
from dataprep.filters.base import BaseFilter, Verdict

_PARAGRAPHS = re.compile(r"\n{2,}")
_MIX = np.uint64(0x9E3779B97F4A7C15)


def _duplicate_fraction(elements: list[str]) -> tuple[float, float]:
    """(fraction of elements that repeat an earlier one, fraction of characters in them)."""
    counts = Counter(elements)
    dup_elems = sum(c - 1 for c in counts.values())
    dup_chars = sum(len(e) * (c - 1) for e, c in counts.items())
    total = sum(map(len, elements))
    return dup_elems / max(len(elements), 1), dup_chars / max(total, 1)


class GopherRepetitionFilter(BaseFilter):
    name = "gopher_repetition"

    def __init__(self, config: GopherRepetitionConfig):
        self.c = config
        self.top = {2: config.top_2gram_frac, 3: config.top_3gram_frac, 4: config.top_4gram_frac}
        self.dup = {5: config.dup_5gram_frac, 6: config.dup_6gram_frac, 7: config.dup_7gram_frac,
                    8: config.dup_8gram_frac, 9: config.dup_9gram_frac, 10: config.dup_10gram_frac}

    def check(self, text: str) -> Verdict:
        c = self.c
        lines = [x for x in text.split("\n") if x.strip()]
        frac, chars = _duplicate_fraction(lines)
        if frac > c.dup_line_frac:
            return "gopher_repetition_dup_lines"
        if chars > c.dup_line_char_frac:
            return "gopher_repetition_dup_line_chars"
        frac, chars = _duplicate_fraction([p for p in _PARAGRAPHS.split(text) if p.strip()])
        if frac > c.dup_para_frac:
            return "gopher_repetition_dup_paragraphs"
        if chars > c.dup_para_char_frac:
            return "gopher_repetition_dup_paragraph_chars"
        words = text.split()
        if len(words) < 2:
            return None
        ids = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        total = float(lengths.sum())
        grams = ids.copy()
        for n in range(2, 11):
            if len(words) < n:
                break
            grams = grams[:-1] * _MIX + ids[n - 1:]
            if n in self.top and self._top_fraction(grams, lengths, n, total) > self.top[n]:
                return f"gopher_repetition_top_{n}gram"
            if n in self.dup and self._dup_fraction(grams, lengths, n, total) > self.dup[n]:
                return f"gopher_repetition_dup_{n}gram"
        return None

    @staticmethod
    def _top_fraction(grams: np.ndarray, lengths: np.ndarray, n: int, total: float) -> float:
        values, first, counts = np.unique(grams, return_index=True, return_counts=True)
        best = int(np.argmax(counts))
        if counts[best] < 2:
            return 0.0
        start = int(first[best])
        return float(lengths[start:start + n].sum()) * int(counts[best]) / total

    @staticmethod
    def _dup_fraction(grams: np.ndarray, lengths: np.ndarray, n: int, total: float) -> float:
        _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
        starts = np.flatnonzero(counts[inverse] > 1)
        if not len(starts):
            return 0.0
        covered = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.add.at(covered, starts, 1)
        np.add.at(covered, starts + n, -1)
        mask = np.cumsum(covered[:-1]) > 0
        return float(lengths[mask].sum()) / total
