"""Gopher repetition rules (Rae et al. 2021, table A1): repeated lines, paragraphs and word n-grams.

The keyword defaults are the thresholds of table A1.

The n-gram statistics are computed on integer word ids with numpy, not on Python tuples: a document's words are
hashed once, every n-gram becomes one combined 64-bit id, and sorting finds the repeats. `check` states the rules
for one document; `apply` gives the same verdicts for a whole batch with one sort per n-gram length over all its
documents (an id is salted with its document's number), sorting only candidates for n > 5: an (n+1)-gram can
repeat only where its leading n-gram does. Words are hashed with Python's per-process salted `hash`, so nothing
may depend on the order of the ids: of equally frequent top n-grams, the one seen first counts.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from dataprep.filters.base import BaseFilter, Verdict
from dataprep.hashing import GOLDEN_GAMMA, splitmix64

_PARAGRAPHS = re.compile(r"\n{2,}")
_MIX = GOLDEN_GAMMA  # combines word ids into n-gram ids


def _duplicate_fraction(elements: list[str]) -> tuple[float, float]:
    """(fraction of elements that repeat an earlier one, fraction of characters in them)."""
    counts = Counter(elements)
    dup_elems = sum(c - 1 for c in counts.values())
    dup_chars = sum(len(e) * (c - 1) for e, c in counts.items())
    total = sum(map(len, elements))
    return dup_elems / max(len(elements), 1), dup_chars / max(total, 1)


class GopherRepetitionFilter(BaseFilter):
    name = "gopher_repetition"

    def __init__(self, *, dup_line_frac: float = 0.3, dup_para_frac: float = 0.3, dup_line_char_frac: float = 0.2,
                 dup_para_char_frac: float = 0.2, top_2gram_frac: float = 0.2, top_3gram_frac: float = 0.18,
                 top_4gram_frac: float = 0.16, dup_5gram_frac: float = 0.15, dup_6gram_frac: float = 0.14,
                 dup_7gram_frac: float = 0.13, dup_8gram_frac: float = 0.12, dup_9gram_frac: float = 0.11,
                 dup_10gram_frac: float = 0.10):
        self.dup_line_frac, self.dup_para_frac = dup_line_frac, dup_para_frac
        self.dup_line_char_frac, self.dup_para_char_frac = dup_line_char_frac, dup_para_char_frac
        self.top = {2: top_2gram_frac, 3: top_3gram_frac, 4: top_4gram_frac}
        self.dup = {5: dup_5gram_frac, 6: dup_6gram_frac, 7: dup_7gram_frac, 8: dup_8gram_frac, 9: dup_9gram_frac,
                    10: dup_10gram_frac}

    def apply(self, texts: Sequence[str]) -> list[Verdict]:
        verdicts = [self._line_verdict(t) for t in texts]
        alive = [i for i, v in enumerate(verdicts) if v is None]
        for i, verdict in zip(alive, self._ngram_verdicts([texts[i] for i in alive]), strict=True):
            verdicts[i] = verdict
        return verdicts

    def _line_verdict(self, text: str) -> Verdict:
        lines = [x for x in text.split("\n") if x.strip()]
        frac, chars = _duplicate_fraction(lines)
        if frac > self.dup_line_frac:
            return "gopher_repetition_dup_lines"
        if chars > self.dup_line_char_frac:
            return "gopher_repetition_dup_line_chars"
        frac, chars = _duplicate_fraction([p for p in _PARAGRAPHS.split(text) if p.strip()])
        if frac > self.dup_para_frac:
            return "gopher_repetition_dup_paragraphs"
        if chars > self.dup_para_char_frac:
            return "gopher_repetition_dup_paragraph_chars"
        return None

    def check(self, text: str) -> Verdict:
        verdict = self._line_verdict(text)
        if verdict:
            return verdict
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

    def _ngram_verdicts(self, texts: Sequence[str]) -> list[Verdict]:
        split = [t.split() for t in texts]
        counts = np.fromiter(map(len, split), np.int64, len(split))
        words = list(itertools.chain.from_iterable(split))
        ids = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        doc = np.repeat(np.arange(len(texts)), counts)
        totals = np.bincount(doc, weights=lengths, minlength=len(texts))
        cumulative = np.concatenate([[0], np.cumsum(lengths)])
        salted = ids ^ splitmix64(doc.astype(np.uint64))  # an n-gram id salted once through its first word
        verdicts: list[Verdict] = [None] * len(texts)
        undecided = counts >= 2
        grams, keys, candidates = ids.copy(), salted, None
        for n in range(2, 11):
            grams = grams[:-1] * _MIX + ids[n - 1:]
            keys = keys[:-1] * _MIX + ids[n - 1:]
            valid = doc[: len(grams)] == doc[n - 1:]
            if n in self.top:
                fraction = _top_fractions(keys, np.flatnonzero(valid), doc, cumulative, n, totals)
                _decide(verdicts, undecided, fraction > self.top[n], f"gopher_repetition_top_{n}gram")
            if n in self.dup:
                if candidates is None:
                    where = np.flatnonzero(valid)
                else:
                    where = candidates[candidates < len(valid)]
                    where = where[valid[where]]
                candidates = _repeated(keys[where], where)
                covered = np.zeros(len(ids) + 1, dtype=np.int64)
                np.add.at(covered, candidates, 1)
                np.add.at(covered, candidates + n, -1)
                dup_chars = np.bincount(doc, weights=np.where(np.cumsum(covered[:-1]) > 0, lengths, 0),
                                        minlength=len(texts))
                _decide(verdicts, undecided, dup_chars / np.maximum(totals, 1) > self.dup[n],
                        f"gopher_repetition_dup_{n}gram")
            undecided &= counts > n
        return verdicts

    @staticmethod
    def _top_fraction(grams: np.ndarray, lengths: np.ndarray, n: int, total: float) -> float:
        values, first, counts = np.unique(grams, return_index=True, return_counts=True)
        best = int(np.lexsort((first, -counts))[0])  # ties: the one seen first, whatever the word hashes
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


def _decide(verdicts: list[Verdict], undecided: np.ndarray, failed: np.ndarray, reason: str) -> None:
    for i in np.flatnonzero(undecided & failed):
        verdicts[i] = reason
    undecided &= ~failed


def _runs(keys: np.ndarray, where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first position, count) of every run of equal keys."""
    order = np.argsort(keys)
    ordered = keys[order]
    start = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]])) if len(keys) else order
    first = np.minimum.reduceat(where[order], start) if len(keys) else where
    return first, np.diff(np.concatenate([start, [len(keys)]]))


def _repeated(keys: np.ndarray, where: np.ndarray) -> np.ndarray:
    """The positions in `where` whose key occurs more than once, in order."""
    order = np.argsort(keys)
    ordered = keys[order]
    same = ordered[1:] == ordered[:-1]
    repeated = np.zeros(len(keys), dtype=bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    return np.sort(where[order[repeated]])


def _top_fractions(keys: np.ndarray, where: np.ndarray, doc: np.ndarray, cumulative: np.ndarray, n: int,
                   totals: np.ndarray) -> np.ndarray:
    """Per document: characters of its most frequent n-gram (ties: the one seen first)
    times its count over all characters; 0 when no n-gram repeats."""
    first, count = _runs(keys[where], where)
    repeats = count >= 2
    first, count = first[repeats], count[repeats]
    fraction = np.zeros(len(totals))
    if not len(first):
        return fraction
    best = np.lexsort((first, -count, doc[first]))
    head = best[np.concatenate([[True], doc[first][best][1:] != doc[first][best][:-1]])]
    chars = (cumulative[first[head] + n] - cumulative[first[head]]).astype(np.float64)
    fraction[doc[first[head]]] = chars * count[head] / totals[doc[first[head]]]
    return fraction
