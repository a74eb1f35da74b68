"""MinHash signatures over word n-gram shingles, and their LSH band keys, computed with numpy for a whole batch.

Python's `hash` is salted per process, so words are hashed here from their UTF-8 bytes with a polynomial hash
evaluated as one segmented sum over all words (64-bit wrapping arithmetic): the same text gets the same signature
on any worker.
Words are lower-cased and punctuation separates them, so "Foo," and "foo" are the same word.
A batch of texts is handled as one byte array, so the per-document Python cost is a few numpy calls, not a loop
over words.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dataprep.batches import text_batches
from dataprep.hashing import splitmix64

_WORD_BYTE = np.ones(256, dtype=bool)
_WORD_BYTE[[ord(c) for c in " \t\n\r\x0b\x0c!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"]] = False
_P = np.uint64(1099511628211)
_SHINGLES_PER_BLOCK = 2048
_TEXT_CHARS_PER_CHUNK = 1 << 20  # word hashing holds ~40 bytes per character of its chunk
U64 = np.uint64


class MinHasher:
    """`signatures(texts)` → uint32 [n, bands·rows]; `band_keys(signatures)` → uint64 [n, bands]."""

    def __init__(self, ngram: int, bands: int, rows: int, seed: int):
        self.ngram, self.bands, self.rows = ngram, bands, rows
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, bands * rows, dtype=np.uint64) | U64(1)
        self.b = rng.integers(0, 2**63, bands * rows, dtype=np.uint64)

    def shingles(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(shingle hashes uint64, owning document index), grouped by document in order.

        A document shorter than `ngram` words contributes one shingle of all its words; one with no word gives none.
        """
        words, owner = word_hashes(texts)
        if not len(words):
            return words, owner
        return self._ngrams(words, owner)

    def _ngrams(self, words: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.ngram
        counts = np.bincount(owner, minlength=owner.max() + 1)
        with np.errstate(over="ignore"):
            if len(words) >= n:
                acc = words[: len(words) - n + 1].copy()
                for k in range(1, n):
                    acc = acc * U64(0x100000001B3) + words[k: len(words) - n + 1 + k]
                same_doc = owner[: len(words) - n + 1] == owner[n - 1:]
                grams, gram_owner = splitmix64(acc[same_doc]), owner[: len(words) - n + 1][same_doc]
            else:
                grams, gram_owner = np.zeros(0, np.uint64), np.zeros(0, np.int64)
            short = np.flatnonzero((counts > 0) & (counts < n))
            if len(short):
                first = np.searchsorted(owner, short)
                extra = np.array([_combine(words[f:f + c]) for f, c in zip(first, counts[short], strict=True)],
                                 dtype=np.uint64)
                grams = np.concatenate([grams, extra])
                gram_owner = np.concatenate([gram_owner, short])
                order = np.argsort(gram_owner, kind="stable")
                grams, gram_owner = grams[order], gram_owner[order]
        return grams, gram_owner

    def signatures(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(uint32 [n, bands·rows] MinHash signatures, bool [n] whether the document had any shingle).

        Texts are taken about a million characters at a time, and shingles a block at a time through one
        preallocated buffer: the permutations are computed in place in cache-sized memory rather than in fresh large
        temporaries.
        """
        sig = np.full((len(texts), len(self.a)), np.iinfo(np.uint32).max, dtype=np.uint32)
        has = np.zeros(len(texts), dtype=bool)
        buf = np.empty((_SHINGLES_PER_BLOCK, len(self.a)), dtype=np.uint64)
        for lo, hi in text_batches(texts, _TEXT_CHARS_PER_CHUNK):
            grams, owner = self.shingles(texts[lo:hi])
            has[lo + owner] = True
            self._fold_minima(grams, owner + lo, sig, buf)
        return sig, has

    def _fold_minima(self, grams: np.ndarray, owner: np.ndarray, sig: np.ndarray, buf: np.ndarray) -> None:
        """sig[d] = min(sig[d], min over shingles g of d of ((g·a + b) mod 2^64) >> 32), a block at a time."""
        a, b, shift = self.a, self.b, U64(32)
        for lo in range(0, len(grams), len(buf)):
            g, o = grams[lo: lo + len(buf)], owner[lo: lo + len(buf)]
            values = buf[: len(g)]
            np.multiply(g[:, None], a, out=values)
            values += b
            values >>= shift
            seg = np.flatnonzero(np.concatenate([[True], o[1:] != o[:-1]]))
            mins = np.minimum.reduceat(values, seg, axis=0)
            docs = o[seg]
            sig[docs] = np.minimum(sig[docs], mins)

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """One 64-bit bucket key per band; the band number is mixed in so equal rows in different bands differ."""
        keys = np.empty((len(sig), self.bands), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for band in range(self.bands):
                h = np.full(len(sig), U64(band + 1) * U64(0xD6E8FEB86659FD93), dtype=np.uint64)
                for value in sig[:, band * self.rows: (band + 1) * self.rows].T:
                    h = splitmix64(h ^ value.astype(np.uint64))
                keys[:, band] = h
        return keys


def word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(hash uint64, owning document index) of every word of the texts, in order: the words of the module
    docstring, hashed from their bytes, so equal on every worker."""
    encoded = [t.lower().encode("utf-8", "surrogatepass") for t in texts]
    b = np.frombuffer(b"\n".join(encoded), dtype=np.uint8)
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    doc_starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    word = _WORD_BYTE[b]
    edges = np.diff(np.concatenate([[False], word, [False]]).astype(np.int8))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if not len(starts):
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    return splitmix64(_word_hashes(b, word, starts, ends)), np.searchsorted(doc_starts, starts, side="right") - 1


def _word_hashes(b: np.ndarray, word: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """H(w) = Σ_k w[k]·P^k (mod 2^64) for every word [start, end) of the byte array, as one segmented sum."""
    lengths = ends - starts
    offsets = np.arange(int(lengths.sum()), dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    offsets -= np.repeat(first, lengths)
    powers = np.cumprod(np.full(int(lengths.max()), _P, dtype=np.uint64))
    powers = np.concatenate([[U64(1)], powers[:-1]])
    terms = b[word].astype(np.uint64)
    terms *= powers[offsets]
    return np.add.reduceat(terms, first)


def _combine(words: np.ndarray) -> np.uint64:
    acc = U64(0)
    with np.errstate(over="ignore"):
        for w in words:
            acc = acc * U64(0x100000001B3) + w
    return splitmix64(np.array([acc], dtype=np.uint64))[0]


def shingle_set(text: str, ngram: int) -> set[int]:
    """The exact shingle set of one text, for measuring true Jaccard similarity."""
    grams, _ = MinHasher(ngram, 1, 1, 0).shingles([text])
    return set(grams.tolist())
