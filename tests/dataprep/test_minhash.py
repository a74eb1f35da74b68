"""MinHash signatures against a plain-Python computation of the same definition, on real multilingual text and code."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from dataprep.dedup.minhash import MinHasher

MASK = (1 << 64) - 1
P, GRAM = 1099511628211, 0x100000001B3
SEPARATORS = frozenset(b" \t\n\r\x0b\x0c!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _mix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def _reference_signature(text: str, ngram: int, a: list[int], b: list[int]) -> list[int] | None:
    """The definition, one word and one shingle at a time; None for a text without words."""
    data = text.lower().encode("utf-8", "surrogatepass")
    words = [w for w in bytes(c if c not in SEPARATORS else 32 for c in data).split(b" ") if w]
    if not words:
        return None
    hashed = [_mix(sum(c * pow(P, k, 1 << 64) for k, c in enumerate(w)) & MASK) for w in words]
    runs = [hashed[i: i + ngram] for i in range(len(hashed) - ngram + 1)] or [hashed]
    shingles = []
    for run in runs:
        acc = 0
        for h in run:
            acc = (acc * GRAM + h) & MASK
        shingles.append(_mix(acc))
    return [min((((g * ai) + bi) & MASK) >> 32 for g in shingles) for ai, bi in zip(a, b, strict=True)]


def _docs(path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"][:3000] for line in f]


def _non_ascii(text: str) -> int:
    return sum(ord(c) > 127 for c in text)


@pytest.fixture(scope="module")
def texts(sample_corpora):
    out = [doc for name in ("django_docs", "fortunes") for doc in _docs(sample_corpora[name])[:12]]
    for name in ("wiki_vital_fr", "wiki_vital_es", "django_code"):
        # The documents richest in multi-byte text: accents, and Django's locale files in a dozen scripts.
        out += sorted(_docs(sample_corpora[name]), key=_non_ascii, reverse=True)[:12]
    return out + ["", "...", "one", "two words", "Ünïcode ΣΑΣ straße, ЁЖ", "a,b;c d-e f\tg"]


@pytest.mark.parametrize(("ngram", "bands", "rows"), [(5, 16, 7), (2, 3, 2), (1, 4, 1)])
def test_signatures_match_the_definition(texts, ngram, bands, rows):
    hasher = MinHasher(ngram, bands, rows, seed=3)
    sig, has = hasher.signatures(texts)
    a, b = [int(x) for x in hasher.a], [int(x) for x in hasher.b]
    for i, text in enumerate(texts):
        expected = _reference_signature(text, ngram, a, b)
        assert has[i] == (expected is not None), repr(text[:60])
        if expected is not None:
            assert sig[i].tolist() == expected, repr(text[:60])


def test_signatures_do_not_depend_on_batching(texts):
    hasher = MinHasher(5, 16, 7, seed=1)
    whole, _ = hasher.signatures(texts * 150)  # about 10M characters: three chunks of 4M
    parts = np.concatenate([hasher.signatures(texts[i: i + 1])[0] for i in range(len(texts))] * 150)
    assert np.array_equal(whole, parts)
