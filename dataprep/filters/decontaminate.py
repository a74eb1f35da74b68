"""Decontamination: a document sharing a word n-gram with an evaluation item is removed, or the shared spans cut.

The test of GPT-3 (Brown et al. 2020, appendix C) and its successors: 13-grams of lower-cased words, punctuation
ignored. Words are those of near-duplicate detection (`dataprep.dedup.minhash`): the text lower-cased, split at
ASCII whitespace and punctuation, in items and documents alike. An item of at least `ngram`
words contributes each of its n-grams; an item shorter than that but of at least `min_item_words` words is matched
whole (a short question or answer is contamination only if it appears entire); shorter items are ignored, since a
three-word item would match half the corpus. Twelve shared words of a 13-gram are a near miss and keep the document.

Matching runs over a whole batch at once: words are hashed from their bytes as one numpy array (MinHash's word
hashes), word n-grams combined into 64-bit ids by a rolling product and looked up in the items' ids. Every hit is
then confirmed on the words themselves, so a hash collision never removes a document.

A document holding n-grams of several sets is removed for the first set listed (`decontamination_<set>`); with
`action: mask` each maximal span of overlapping n-grams is cut (replaced by `mask_replacement`) and the document
counts once per set it touched (`decontamination_masked_<set>`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from dataprep.dedup.minhash import word_hashes
from dataprep.filters.base import BaseFilter, Edit, Verdict
from dataprep.filters.eval_sets import file_stamps, read_eval_sets
from dataprep.hashing import GOLDEN_GAMMA

_WORD = re.compile(r"[^ \t\n\r\x0b\x0c!-/:-@\[-`{-~]+")  # a run of what `minhash._WORD_BYTE` calls word bytes
_MIX = GOLDEN_GAMMA
_BITMAP_BITS = 23  # 8 MB: with 10^5 item n-grams, about 1% of a document's n-grams reach the binary search


def words_of(text: str) -> list[str]:
    """The words of the text as `word_hashes` sees them. Lower-casing keeps a word a word and punctuation
    punctuation, so word i is also the i-th run of `_WORD` in the text as written (where masks are cut)."""
    return _WORD.findall(text.lower())


@dataclass
class EvalIndex:
    """The items' n-grams: per length, sorted ids; a bitmap of their top bits, so that a document's n-gram costs
    one lookup unless its bit is set (binary search in the sorted ids takes ~17 scattered reads); and, for
    confirming hits, each word tuple's first set."""

    names: list[str]
    ids: dict[int, np.ndarray] = field(default_factory=dict)
    bitmap: np.ndarray = field(default_factory=lambda: np.zeros(1 << _BITMAP_BITS, bool))
    owner: dict[tuple[str, ...], int] = field(default_factory=dict)
    summary: dict[str, dict] = field(default_factory=dict)  # per set: items matched by n-grams, whole, ignored


def build_index(files: tuple[str, ...], fields: tuple[str, ...], ngram: int, min_item_words: int) -> EvalIndex:
    """The index of the sets; built once per process while the files are unchanged (a Ray worker outlives a run)."""
    return _build_index(files, fields, ngram, min_item_words, file_stamps(files))


@functools.lru_cache(maxsize=4)
def _build_index(files: tuple[str, ...], fields: tuple[str, ...], ngram: int, min_item_words: int,
                 stamps: tuple) -> EvalIndex:
    sets = read_eval_sets(files, fields)
    index = EvalIndex([s.name for s in sets])
    by_length: dict[int, list[np.ndarray]] = {}
    for number, eval_set in enumerate(sets):
        counts = {"file": eval_set.path, "items": len(eval_set.items), "by_ngrams": 0, "whole": 0, "ignored": 0}
        ids, owner = word_hashes(eval_set.items)
        starts = np.searchsorted(owner, np.arange(len(eval_set.items) + 1))
        for item, text in enumerate(eval_set.items):
            words = words_of(text)
            length = min(len(words), ngram)
            if length < min_item_words:
                counts["ignored"] += 1
                continue
            counts["by_ngrams" if length == ngram else "whole"] += 1
            for _, grams in _rolled(ids[starts[item]:starts[item + 1]], (length,)):
                by_length.setdefault(length, []).append(grams)
            for start in range(len(words) - length + 1):
                index.owner.setdefault(tuple(words[start:start + length]), number)
        index.summary[eval_set.name] = counts
    index.ids = {length: np.unique(np.concatenate(parts)) for length, parts in by_length.items()}
    for ids in index.ids.values():
        index.bitmap[ids >> np.uint64(64 - _BITMAP_BITS)] = True
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
        hits = _confirmed_hits(index, texts)
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


def _rolled(ids: np.ndarray, lengths: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(length, id of every run of `length` consecutive words) for each of the lengths, shortest first; the
    n-grams of one more word are computed in place from those of one fewer."""
    grams = ids.copy()
    for length in range(1, max(lengths) + 1):
        if length > 1:
            grams = grams[:-1]
            np.multiply(grams, _MIX, out=grams)
            np.add(grams, ids[length - 1:], out=grams)
        if length in lengths:
            yield length, grams


def _confirmed_hits(index: EvalIndex, texts: Sequence[str]) -> dict[int, list[tuple[int, int, int]]]:
    """Per document with a hit: (first word, length, set) of each n-gram it shares with an item."""
    ids, doc = word_hashes(texts)
    if not len(ids) or not index.ids:
        return {}
    starts = np.searchsorted(doc, np.arange(len(texts)))
    candidates: dict[int, list[tuple[int, int]]] = {}
    for length, grams in _rolled(ids, tuple(index.ids)):
        table = index.ids[length]
        at = np.flatnonzero(index.bitmap[grams >> np.uint64(64 - _BITMAP_BITS)])
        at = at[doc[at] == doc[at + length - 1]]
        found = at[table[np.minimum(np.searchsorted(table, grams[at]), len(table) - 1)] == grams[at]]
        for position in found:
            d = int(doc[position])
            candidates.setdefault(d, []).append((int(position - starts[d]), length))
    hits: dict[int, list[tuple[int, int, int]]] = {}
    for d, found_in_doc in candidates.items():
        words = words_of(texts[d])
        for start, length in found_in_doc:
            owner = index.owner.get(tuple(words[start:start + length]))
            if owner is not None:
                hits.setdefault(d, []).append((start, length, owner))
    return hits
