"""Near-duplicate detection measured against the truth: exact Jaccard similarity of word n-gram shingle sets.

`cluster_roots` runs the pipeline's own LSH bucket scan and connected components on a list of texts, so "merged"
means what it means in a prep run: both documents end in one cluster, directly or through a chain of edges.
`pair_jaccard` computes the exact similarity of every pair at once as a sparse product of the document × shingle
incidence matrix with its transpose: pairs sharing no shingle (the vast majority) cost nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dataprep.config import DedupConfig
from dataprep.dedup.buckets import BAND_ROW, bucket_rows, scan_buckets
from dataprep.dedup.components import components_in_memory
from dataprep.dedup.minhash import MinHasher

BIN_EDGES = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001)


def cluster_roots(texts: Sequence[str], config: DedupConfig) -> np.ndarray:
    """The near-duplicate cluster of each text (its lowest member's index); a text alone is its own root."""
    hasher = MinHasher(config.ngram, config.bands, config.rows, config.seed)
    sig, has = hasher.signatures(texts)
    bands = hasher.band_keys(sig)
    table = pa.table({"key": np.arange(len(texts), dtype=np.int64),
                      "hash": pa.array([b"\0" * 16] * len(texts), pa.binary(16)),
                      "has_shingles": has,
                      "bands": pa.FixedSizeListArray.from_arrays(pa.array(bands.reshape(-1)), config.bands)})
    pairs = scan_buckets(bucket_rows(table, exact=False, near=True))
    band = pairs.filter(pc.equal(pairs.column("kind"), BAND_ROW))
    members = components_in_memory(np.stack([band.column("a").to_numpy(), band.column("b").to_numpy()], axis=1))
    root = np.arange(len(texts))
    root[members.column("key").to_numpy()] = members.column("root").to_numpy()
    return root


def pair_jaccard(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(i, j, J) for every pair i < j of texts with a shingle in common, and the number of pairs of texts that
    have shingles (the pairs not listed have J = 0)."""
    from scipy import sparse

    grams, owner = MinHasher(ngram, 1, 1, 0).shingles(texts)
    pairs = np.unique(np.stack([owner, grams.view(np.int64)], axis=1), axis=0)
    _, column = np.unique(pairs[:, 1], return_inverse=True)
    incidence = sparse.csr_matrix((np.ones(len(pairs), np.int32), (pairs[:, 0], column.reshape(-1))),
                                  shape=(len(texts), int(column.max()) + 1 if len(column) else 0))
    sizes = np.asarray(incidence.sum(axis=1)).reshape(-1)
    common = sparse.triu(incidence @ incidence.T, k=1).tocoo()
    i, j, both = common.row, common.col, common.data
    with_shingles = int((sizes > 0).sum())
    return i, j, both / (sizes[i] + sizes[j] - both), with_shingles * (with_shingles - 1) // 2


def merge_curve(i: np.ndarray, j: np.ndarray, jaccard: np.ndarray, root: np.ndarray, zero_pairs: int = 0,
                zero_merged: int = 0, edges: Sequence[float] = BIN_EDGES) -> dict:
    """Merged fraction per Jaccard bin, recall at J ≥ 0.8 and the merged fraction of pairs below J 0.5, over the
    listed pairs and `zero_pairs` more of J = 0 (of which `zero_merged` were merged through chains of edges)."""
    merged = root[i] == root[j]
    bins = []
    for lo, hi in itertools.pairwise(edges):
        inside = (jaccard >= lo) & (jaccard < hi)
        n, m = int(inside.sum()), int(merged[inside].sum())
        if lo == 0.0:
            n, m = n + zero_pairs, m + zero_merged
        bins.append({"jaccard": [lo, min(hi, 1.0)], "pairs": n, "merged": m, "rate": m / n if n else None})
    high, low = jaccard >= 0.8, jaccard < 0.5
    low_pairs = int(low.sum()) + zero_pairs
    return {"bins": bins, "pairs": len(i) + zero_pairs,
            "recall_at_0.8": float(merged[high].mean()) if high.any() else None, "pairs_at_0.8": int(high.sum()),
            "merged_below_0.5": (int(merged[low].sum()) + zero_merged) / low_pairs if low_pairs else None,
            "pairs_below_0.5": low_pairs}


def all_pairs_curve(texts: Sequence[str], root: np.ndarray, ngram: int) -> dict:
    """`merge_curve` over every pair of texts that have shingles."""
    i, j, jaccard, total = pair_jaccard(texts, ngram)
    sizes = np.bincount(root, minlength=len(root))
    merged_pairs = int((sizes * (sizes - 1) // 2).sum())
    return merge_curve(i, j, jaccard, root, total - len(i), merged_pairs - int((root[i] == root[j]).sum()))
