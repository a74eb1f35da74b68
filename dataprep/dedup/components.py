"""Connected components of the candidate graph; every component's smallest key is its survivor.

Small graphs (the usual case: only near-duplicates have edges) are solved in one process with scipy. Large ones use
the alternating large-star / small-star contraction of Kiveris et al. ("Connected Components in MapReduce and
Beyond", SoCC 2014): each step is a Ray Data hash shuffle by node plus a vectorized pass per block, and it stops
when every component is a star around its minimum, so neither edges nor signatures are ever gathered.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def find_components(edges, partitions: int, local_max_edges: int):
    """(members, rounds, sizes): a Dataset of (key, root) for every document that is not its component's root,
    the contraction rounds used (0: solved in one process) and the histogram {cluster size: clusters}."""
    import ray
    from ray.data.expressions import col

    edges = edges.materialize()
    if edges.count() <= local_max_edges:
        pairs = [np.stack([b["u"], b["v"]], axis=1) for b in edges.iter_batches(batch_format="numpy")
                 if len(b["u"])]
        members = components_in_memory(np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64))
        return ray.data.from_arrow(members), 0, _histogram(members.column("root").to_numpy())
    rounds = 0
    while True:
        rounds += 1
        doubled = edges.map_batches(_both_directions, batch_format="pyarrow")
        edges = doubled.repartition(partitions, keys=["u"]).map_batches(
            _large_star, batch_size=None, batch_format="pyarrow").materialize()
        if _unsettled(edges) == 0:
            break
        edges = edges.filter(expr=col("u") >= 0).map_batches(_larger_first, batch_format="pyarrow")
        edges = edges.repartition(partitions, keys=["u"]).map_batches(
            _small_star, batch_size=None, batch_format="pyarrow")
    members = edges.filter(expr=col("u") >= 0).map_batches(
        lambda t: pa.table({"key": t.column("u"), "root": t.column("v")}), batch_format="pyarrow").materialize()
    return members, rounds, _cluster_sizes(members, partitions)


def _histogram(roots: np.ndarray) -> dict[str, int]:
    """{cluster size: clusters} from the root of every non-root member."""
    size, n = _size_counts(roots)
    return {str(int(s)): int(c) for s, c in zip(size, n, strict=True)}


def _size_counts(roots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster sizes, clusters of each) from the root of every non-root member of those clusters."""
    _, per_root = np.unique(roots, return_counts=True)
    return np.unique(per_root + 1, return_counts=True)


def _unsettled(edges) -> int:
    """The unsettled nodes counted by every block's marker row. A map over the blocks, not `Dataset.sum`: Ray Data
    runs an aggregate as a hash shuffle of its own, seconds of fixed cost per round for one number a block."""
    from ray.data.expressions import col

    markers = edges.filter(expr=col("u") < 0).select_columns(["unsettled"])
    return sum(int(b["unsettled"].sum()) for b in markers.iter_batches(batch_format="numpy"))


def _cluster_sizes(members, partitions: int) -> dict[str, int]:
    """{cluster size: clusters}: members shuffled by root (every root's members in one block, as the contraction's
    shuffles by node), one histogram a block, added up here."""
    def histogram(t: pa.Table) -> pa.Table:
        size, n = _size_counts(t.column("root").to_numpy())
        return pa.table({"size": pa.array(size, pa.int64()), "n": pa.array(n, pa.int64())})

    sizes: dict[int, int] = {}
    blocks = members.repartition(partitions, keys=["root"]).map_batches(histogram, batch_size=None,
                                                                        batch_format="pyarrow")
    for batch in blocks.iter_batches(batch_format="numpy"):
        for size, n in zip(batch["size"].tolist(), batch["n"].tolist(), strict=True):
            sizes[size] = sizes.get(size, 0) + n
    return {str(k): v for k, v in sorted(sizes.items())}


def components_in_memory(pairs: np.ndarray) -> pa.Table:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes, inverse = np.unique(pairs.reshape(-1), return_inverse=True)
    inverse = inverse.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (inverse[:, 0], inverse[:, 1])), shape=(len(nodes),) * 2)
    _, label = connected_components(graph, directed=False)
    roots = np.full(label.max() + 1 if len(label) else 0, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(roots, label, nodes)
    root = roots[label]
    members = nodes != root
    return pa.table({"key": pa.array(nodes[members], pa.int64()), "root": pa.array(root[members], pa.int64())})


def _both_directions(t: pa.Table) -> pa.Table:
    keep = t.column("u").to_numpy() >= 0
    u, v = t.column("u").to_numpy()[keep], t.column("v").to_numpy()[keep]
    return pa.table({"u": np.concatenate([u, v]), "v": np.concatenate([v, u])})


def _larger_first(t: pa.Table) -> pa.Table:
    u, v = t.column("u").to_numpy(), t.column("v").to_numpy()
    return pa.table({"u": np.maximum(u, v), "v": np.minimum(u, v)})


def _grouped(t: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique (u, v) pairs sorted by u, the start of each u's run, and each row's run index."""
    pairs = np.unique(np.stack([t.column("u").to_numpy(), t.column("v").to_numpy()], axis=1), axis=0) \
        if t.num_rows else np.zeros((0, 2), np.int64)
    u, v = pairs[:, 0], pairs[:, 1]
    starts = np.flatnonzero(np.concatenate([[True], u[1:] != u[:-1]])) if len(u) else np.zeros(0, np.int64)
    run = np.cumsum(np.concatenate([[True], u[1:] != u[:-1]])) - 1 if len(u) else np.zeros(0, np.int64)
    return u, v, starts, run


def _large_star(t: pa.Table) -> pa.Table:
    """Link every larger neighbour of u to min(Γ(u) ∪ {u}); count nodes that are not yet star centres or leaves."""
    u, v, starts, run = _grouped(t)
    if not len(u):
        return _edges(np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    low = np.minimum(np.minimum.reduceat(v, starts), u[starts])
    smaller = np.add.reduceat((v < u).astype(np.int64), starts)
    larger = np.add.reduceat((v > u).astype(np.int64), starts)
    unsettled = int(((smaller > 0) & (larger > 0)).sum() + (smaller > 1).sum())
    out = v > u
    return _edges(v[out], low[run[out]], unsettled)


def _small_star(t: pa.Table) -> pa.Table:
    """Rows are (larger, smaller): link u and its smaller neighbours to the smallest of them."""
    u, v, starts, run = _grouped(t)
    if not len(u):
        return _edges(np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
    low = np.minimum.reduceat(v, starts)
    lead, lead_low = u[starts], low
    keep = v != low[run]
    return _edges(np.concatenate([lead, v[keep]]), np.concatenate([lead_low, low[run[keep]]]), 0)


def _edges(u: np.ndarray, v: np.ndarray, unsettled: int) -> pa.Table:
    """Edges plus one marker row (-1, -1) carrying this block's count of unsettled nodes."""
    return pa.table({"u": pa.array(np.concatenate([[-1], u]), pa.int64()),
                     "v": pa.array(np.concatenate([[-1], v]), pa.int64()),
                     "unsettled": pa.array(np.concatenate([[unsettled], np.zeros(len(u), np.int64)]), pa.int64())})
