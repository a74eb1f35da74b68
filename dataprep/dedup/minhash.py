"""MinHash signatures over word n-gram shingles, and their LSH band keys, computed with numpy for a whole batch.

Python's `hash` is salted per process, so words are hashed here from their UTF-8 bytes with a polynomial hash
evaluated by prefix sums (all 64-bit wrapping arithmetic): the same text gets the same signature on any worker.
Words are lower-cased and punctuation separates them, so "Foo," and "foo" are the same word.
A batch of texts is handled as one byte array, so the per-document Python cost is a few numpy calls, not a loop
over words.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_WORD_BYTE = np.ones(256, dtype=bool)
_WORD_BYTE[[ord(c) for c in " \t\n\r\x0b\x0c!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"]] = False
_P = np.uint64(1099511628211)
_MAX_SHINGLES_PER_BLOCK = 1 << 15
U64 = np.uint64


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer: turns weak polynomial hashes into well-spread ones."""
    with np.errstate(over="ignore"):
        x = x + U64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> U64(30))) * U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> U64(27))) * U64(0x94D049BB133111EB)
        return x ^ (x >> U64(31))


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
        data = "\n".join(texts).lower().encode("utf-8", "surrogatepass")
        b = np.frombuffer(data, dtype=np.uint8)
        lengths = np.fromiter((len(t.lower().encode("utf-8", "surrogatepass")) for t in texts), np.int64, len(texts))
        doc_starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
        word = _WORD_BYTE[b]
        edges = np.diff(np.concatenate([[False], word, [False]]).astype(np.int8))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if not len(starts):
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        with np.errstate(over="ignore"):
            powers = np.cumprod(np.full(len(b) + 1, _P, dtype=np.uint64))
            powers = np.concatenate([[U64(1)], powers[:-1]])
            prefix = np.concatenate([[U64(0)], np.cumsum(b.astype(np.uint64) * powers[:-1], dtype=np.uint64)])
            # H(word) · P^start; scaling every word of a text by its own start is undone by comparing only
            # within-document n-grams after multiplying back by the inverse power, which for odd P exists mod 2^64.
            raw = prefix[ends] - prefix[starts]
            words = splitmix64(raw * _inverse_powers(starts))
        owner = np.searchsorted(doc_starts, starts, side="right") - 1
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
        """(uint32 [n, bands·rows] MinHash signatures, bool [n] whether the document had any shingle)."""
        grams, owner = self.shingles(texts)
        sig = np.full((len(texts), len(self.a)), np.iinfo(np.uint32).max, dtype=np.uint32)
        has = np.zeros(len(texts), dtype=bool)
        has[owner] = True
        with np.errstate(over="ignore"):
            for lo in range(0, len(grams), _MAX_SHINGLES_PER_BLOCK):
                g, o = grams[lo: lo + _MAX_SHINGLES_PER_BLOCK], owner[lo: lo + _MAX_SHINGLES_PER_BLOCK]
                values = ((g[:, None] * self.a[None, :] + self.b[None, :]) >> U64(32)).astype(np.uint32)
                seg = np.flatnonzero(np.concatenate([[True], o[1:] != o[:-1]]))
                mins = np.minimum.reduceat(values, seg, axis=0)
                docs = o[seg]
                sig[docs] = np.minimum(sig[docs], mins)
        return sig, has

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


def _inverse_powers(starts: np.ndarray) -> np.ndarray:
    """P^-s mod 2^64 for each s, by square-and-multiply on the whole array."""
    inv = U64(pow(int(_P), -1, 2**64))
    result = np.ones(len(starts), dtype=np.uint64)
    base = np.full(len(starts), inv, dtype=np.uint64)
    e = starts.astype(np.uint64)
    with np.errstate(over="ignore"):
        while e.any():
            odd = (e & U64(1)).astype(bool)
            result[odd] *= base[odd]
            base = base * base
            e >>= U64(1)
    return result


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
