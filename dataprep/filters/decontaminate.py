"""Decontamination: a document sharing a word n-gram with an evaluation item is removed, or the shared spans cut.

The test of GPT-3 (Brown et al. 2020, appendix C) and its successors: 13-grams of lower-cased words, punctuation
ignored. A word is a run of `\\w` characters, lower-cased, in items and documents alike. An item of at least `ngram`
words contributes each of its n-grams; an item shorter than that but of at least `min_item_words` words is matched
whole (a short question or answer is contamination only if it appears entire); shorter items are ignored, since a
three-word item would match half the corpus. Twelve shared words of a 13-gram are a near miss and keep the document.

Matching runs over a whole batch at once: words are hashed (Python's `hash`, salted per process, so the index is
built in the process that uses it), word n-grams combined into 64-bit ids by the rolling product of
`gopher_repetition` and looked up in the items' sorted ids. Every hit is then confirmed on the words themselves, so
a hash collision never removes a document and no verdict depends on the salt.

A document holding n-grams of several sets is removed for the first set listed (`decontamination_<set>`); with
`action: mask` each maximal span of overlapping n-grams is cut (replaced by `mask_replacement`) and the document
counts once per set it touched (`decontamination_masked_<set>`).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dataprep.filters.base import BaseFilter, Edit, Verdict
from dataprep.filters.eval_sets import read_eval_sets
from dataprep.hashing import GOLDEN_GAMMA

_WORD = re.compile(r"\w+")
_MIX = GOLDEN_GAMMA


def words_of(text: str) -> list[str]:
    """The normalized word tokens that n-grams are made of: each `\\w` run, lower-cased (one word per run even
    where lower-casing changes a character's length, so word i is the i-th run of the text)."""
    return list(map(str.lower, _WORD.findall(text)))


def _ids(words: list[str]) -> np.ndarray:
    return np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)


def _grams(ids: np.ndarray, length: int) -> np.ndarray:
    """The id of every run of `length` consecutive words."""
    grams = ids.copy()
    for k in range(1, length):
        grams = grams[:-1] * _MIX + ids[k:]
    return grams


@dataclass
class EvalIndex:
    """The items' n-grams: per length, sorted ids and, for confirming hits, each word tuple's first set."""

    names: list[str]
    ids: dict[int, np.ndarray] = field(default_factory=dict)
    owner: dict[tuple[str, ...], int] = field(default_factory=dict)
    summary: dict[str, dict] = field(default_factory=dict)  # per set: items matched by n-grams, whole, ignored


@functools.lru_cache(maxsize=4)
def build_index(files: tuple[str, ...], fields: tuple[str, ...], ngram: int, min_item_words: int) -> EvalIndex:
    sets = read_eval_sets(files, fields)
    index = EvalIndex([s.name for s in sets])
    by_length: dict[int, list[np.ndarray]] = {}
    for number, eval_set in enumerate(sets):
        counts = {"file": eval_set.path, "items": len(eval_set.items), "by_ngrams": 0, "whole": 0, "ignored": 0}
        for item in eval_set.items:
            words = words_of(item)
            length = min(len(words), ngram)
            if length < min_item_words:
                counts["ignored"] += 1
                continue
            counts["by_ngrams" if length == ngram else "whole"] += 1
            by_length.setdefault(length, []).append(_grams(_ids(words), length))
            for start in range(len(words) - length + 1):
                index.owner.setdefault(tuple(words[start:start + length]), number)
        index.summary[eval_set.name] = counts
    index.ids = {length: np.unique(np.concatenate(parts)) for length, parts in by_length.items()}
    return index


@dataclass(frozen=True, kw_only=True)
class DecontaminationFilter(BaseFilter):
    name = "decontamination"

    eval_files: tuple[str, ...] = ()
    text_fields: tuple[str, ...] = ("text",)
    ngram: int = 13
    min_item_words: int = 8
    action: str = "remove"
    mask_replacement: str = ""

    @property
    def index(self) -> EvalIndex:
        return build_index(self.eval_files, self.text_fields, self.ngram, self.min_item_words)

    def apply(self, texts: Sequence[str]) -> list[Verdict]:
        index = self.index
        words = [words_of(t) for t in texts]
        hits = _confirmed_hits(index, words)
        verdicts: list[Verdict] = [None] * len(texts)
        for doc, found in hits.items():
            if self.action == "remove":
                verdicts[doc] = f"decontamination_{index.names[min(s for _, _, s in found)]}"
            else:
                touched = sorted({s for _, _, s in found})
                verdicts[doc] = Edit(self._masked(texts[doc], found),
                                     {f"decontamination_masked_{index.names[s]}": 1 for s in touched})
        return verdicts

    def check(self, text: str) -> Verdict:
        return self.apply([text])[0]

    def _masked(self, text: str, found: list[tuple[int, int, int]]) -> str:
        """The text with each maximal run of overlapping shared n-grams, first to last character, replaced."""
        words = [m.span() for m in _WORD.finditer(text)]
        cuts: list[list[int]] = []
        for start, length, _ in sorted(found):
            first, last = words[start][0], words[start + length - 1][1]
            if cuts and first <= cuts[-1][1]:
                cuts[-1][1] = max(cuts[-1][1], last)
            else:
                cuts.append([first, last])
        pieces, at = [], 0
        for first, last in cuts:
            pieces += [text[at:first], self.mask_replacement]
            at = last
        pieces.append(text[at:])
        return "".join(pieces)


def _confirmed_hits(index: EvalIndex, words: list[list[str]]) -> dict[int, list[tuple[int, int, int]]]:
    """Per document with a hit: (first word, length, set) of each n-gram it shares with an item."""
    counts = np.fromiter(map(len, words), np.int64, len(words))
    flat = list(itertools.chain.from_iterable(words))
    if not flat or not index.ids:
        return {}
    ids = _ids(flat)
    doc = np.repeat(np.arange(len(words)), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    hits: dict[int, list[tuple[int, int, int]]] = {}
    grams = ids.copy()
    for length in range(1, max(index.ids) + 1):
        if length > 1:
            grams = grams[:-1] * _MIX + ids[length - 1:]
        if length not in index.ids:
            continue
        table = index.ids[length]
        where = np.minimum(np.searchsorted(table, grams), len(table) - 1)
        for at in np.flatnonzero((table[where] == grams) & (doc[: len(grams)] == doc[length - 1:])):
            owner = index.owner.get(tuple(flat[at: at + length]))
            if owner is not None:
                d = int(doc[at])
                hits.setdefault(d, []).append((int(at - starts[d]), length, owner))
    return hits
