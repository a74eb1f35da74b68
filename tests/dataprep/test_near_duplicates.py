"""Near-duplicate quality on real labelled pairs: Django's documentation and source, whose per-locale date-format
files are one template edited for each language.

Truth is the exact Jaccard similarity of the word 5-gram shingle sets; a pair is "merged" when the LSH buckets and
connected components (the pipeline's own block functions) put both documents in one cluster.
"""

from __future__ import annotations

import gzip
import itertools
import json

import numpy as np
import pytest

from dataprep.config import DedupConfig
from dataprep.dedup.minhash import MinHasher, shingle_set
from dataprep.dedup.quality import cluster_roots, pair_jaccard
from dataprep.normalize import normalize_text


def _texts(path, limit=200):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [normalize_text(json.loads(line)["text"]) for line in itertools.islice(f, limit)]


@pytest.fixture(scope="module")
def labelled(sample_corpora):
    texts = _texts(sample_corpora["django_docs"]) + _texts(sample_corpora["django_code"])
    shingles = [shingle_set(t, 5) for t in texts]
    truth = {}
    for i, j in itertools.combinations(range(len(texts)), 2):
        a, b = shingles[i], shingles[j]
        if a and b:
            truth[(i, j)] = len(a & b) / len(a | b)
    return texts, truth


def test_default_lsh_finds_near_duplicates_and_rarely_merges_dissimilar_pairs(labelled):
    texts, truth = labelled
    root = cluster_roots(texts, DedupConfig())
    edges = np.array([0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01])
    curve = []
    for lo, hi in itertools.pairwise(edges):
        pairs = [p for p, j in truth.items() if lo <= j < hi]
        merged = sum(root[i] == root[j] for i, j in pairs)
        curve.append((lo, hi, len(pairs), merged / len(pairs) if pairs else float("nan")))
    print("\nJaccard bin      pairs  merged")
    for lo, hi, n, rate in curve:
        print(f"[{lo:.1f}, {min(hi, 1.0):.1f})  {n:>8}  {rate:6.1%}")
    high = [p for p, j in truth.items() if j >= 0.8]
    low = [p for p, j in truth.items() if j < 0.5]
    recall = sum(root[i] == root[j] for i, j in high) / len(high)
    false_merge = sum(root[i] == root[j] for i, j in low) / len(low)
    assert sum(truth[p] < 1 for p in high) >= 20, "the labelled set must hold real near-duplicates, not only copies"
    assert recall >= 0.95, f"recall {recall:.3f} for J ≥ 0.8"
    assert false_merge <= 0.02, f"{false_merge:.3%} of pairs below J 0.5 merged"


def test_signatures_ignore_case_and_punctuation_but_not_words():
    hasher = MinHasher(5, 4, 2, 0)
    sig, has = hasher.signatures(["The cat sat on the mat today.", "the CAT, sat on: the mat today",
                                  "a dog sat on the mat today", "", "..."])
    assert (sig[0] == sig[1]).all() and not (sig[0] == sig[2]).all()
    assert has.tolist() == [True, True, True, False, False]


def test_sparse_pair_jaccard_equals_the_set_definition(labelled):
    texts, truth = labelled
    i, j, jaccard, total = pair_jaccard(texts, 5)
    found = {(int(a), int(b)): float(x) for a, b, x in zip(i, j, jaccard, strict=True)}
    assert total == len(truth) and len(found) > 100
    assert all(abs(found.get(p, 0.0) - x) < 1e-12 for p, x in truth.items())
