"""The dedup stage over all ingested parts: exact losers, near-duplicate clusters, and the per-file removal lists.

The survivor of an exact group or a near-duplicate cluster is its lowest key: source priority first, then file and
record order. A document that is both an exact and a near duplicate counts as exact.

Memory per process stays flat however large the corpus: every shuffle (bucket rows, candidate edges, removals) gets
as many partitions as its rows need for about `PARTITION_BYTES` each (at least one per CPU), so one reduce task
holds one partition and one map task about as much input; shuffle data waits in the object store (shared memory,
spilled to disk by Ray when full), or, when the bucket rows would take more than `DISK_SHUFFLE_SHARE` of it, in
Ray Data's disk-based hash shuffle, whose map outputs are Arrow files on each node's disk.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dataprep.config import DedupConfig, config_to_dict
from dataprep.dedup.buckets import BAND_ROW, EXACT_ROW, find_duplicates
from dataprep.dedup.components import find_components
from dataprep.executor import atomic_stage, stage_dir, user_error_in
from dataprep.keys import file_of
from dataprep.shards import write_atomic
from dataprep.stages import PrepRun, Stage, StageOutput
from orchestrator.config_parser import WRITTEN_FILE_BOUNDS, load_json
from orchestrator.errors import DataError

EXACT, NEAR = 1, 2  # removal codes, in precedence order
PARTITION_BYTES = 16_000_000  # rows of one shuffle partition: what one reduce task holds (and sorts)
BUCKET_ROW_BYTES, EDGE_ROW_BYTES, REMOVAL_ROW_BYTES = 25, 16, 17  # Arrow bytes of a row of each shuffle
# Bucket rows above this share of the cluster's object store shuffle through local disk; below, through the object
# store, which is faster for small shuffles (the disk shuffle starts a file server per node).
DISK_SHUFFLE_SHARE = 0.25


class DedupStage(Stage):
    """Exact duplicates, then near-duplicate clusters, over every ingested part: a whole-dataset shuffle.

    Its output directory holds the removal lists per file (none when dedup is off); `info` its counters.
    """

    name = "dedup"

    def run(self, prep: PrepRun) -> StageOutput:
        ingest = prep["ingest"]
        directory = stage_dir(prep.work, self.name, ingest.directory, sorted(ingest.info),
                              config_to_dict(self.config)["dedup"])
        prep.stats.enter(self.name)
        with atomic_stage(directory) as tmp:
            if tmp is not None:
                parts = [p for t in prep.files for p in ingest.info[t["name"]]]
                documents = sum(r["docs_out"] for r in ingest.results.values())
                try:
                    result = run_dedup(parts, tmp, self.config.dedup, prep.partitions, documents)
                except Exception as e:
                    raise user_error_in(e) or e from None
                write_atomic(os.path.join(tmp, "stats.json"), json.dumps(result).encode())
        stats = load_json(os.path.join(directory, "stats.json"), bounds=WRITTEN_FILE_BOUNDS, error=DataError)
        return StageOutput(directory, info=stats)


def removal_file(directory: str, file_id: int) -> str:
    return os.path.join(directory, f"removed-{file_id:012d}.parquet")


def partitions_for(rows: int, row_bytes: int, minimum: int) -> int:
    """Shuffle partitions for `rows` of `row_bytes`: about `PARTITION_BYTES` each, and never fewer than `minimum`."""
    return max(minimum, math.ceil(rows * row_bytes / PARTITION_BYTES))


@contextmanager
def shuffle_settings(on_disk: bool) -> Iterator[None]:
    """Ray Data settings for the shuffles of datasets created inside: a map task takes about `PARTITION_BYTES` of
    input at a time (Ray's default coalesces up to 1 GiB into one task), and `on_disk` selects the disk-based hash
    shuffle, whose map outputs are Arrow files on each node's local disk instead of objects in the object store."""
    import ray

    context = ray.data.DataContext.get_current()
    before = context.use_disk_based_hash_shuffle, context.shuffle_input_batch_bytes
    context.use_disk_based_hash_shuffle, context.shuffle_input_batch_bytes = on_disk, PARTITION_BYTES
    try:
        yield
    finally:
        context.use_disk_based_hash_shuffle, context.shuffle_input_batch_bytes = before


def run_dedup(parts: list[str], out_dir: str, config: DedupConfig, partitions: int, documents: int) -> dict:
    """Write `removed-<file>.parquet` (key, code) per input file that lost documents; return the stage counters.

    `partitions` is the least number of shuffle partitions (the setting, or one per CPU); `documents` sizes the
    shuffles. With `config.shuffle_partitions` set, every shuffle uses exactly that many."""
    stats: dict = {"exact_removed": 0, "near_removed": 0, "clusters": {}, "rounds": 0, "candidate_edges": 0}
    if not (config.exact or config.near):
        return stats
    import ray

    bucket_rows = documents * (int(config.exact) + (config.bands if config.near else 0))
    store = ray.cluster_resources().get("object_store_memory", 0)
    with shuffle_settings(on_disk=bucket_rows * BUCKET_ROW_BYTES > DISK_SHUFFLE_SHARE * store):
        _find_and_write(parts, out_dir, config, partitions, documents, bucket_rows, stats)
    return stats


def _find_and_write(parts: list[str], out_dir: str, config: DedupConfig, partitions: int, documents: int,
                    bucket_rows: int, stats: dict) -> None:
    from ray.data.expressions import col

    def sized(rows: int, row_bytes: int) -> int:
        return config.shuffle_partitions or partitions_for(rows, row_bytes, partitions)

    found = find_duplicates(parts, sized(bucket_rows, BUCKET_ROW_BYTES), config.exact, config.near).materialize()
    removals = found.filter(expr=col("kind") == EXACT_ROW).map_batches(
        lambda t: _codes(t.column("a"), EXACT), batch_format="pyarrow")
    if config.near:
        edges = found.filter(expr=col("kind") == BAND_ROW).map_batches(
            lambda t: pa.table({"u": t.column("b"), "v": t.column("a")}), batch_format="pyarrow").materialize()
        stats["candidate_edges"] = edges.count()
        members, stats["rounds"], stats["clusters"] = find_components(
            edges, sized(2 * stats["candidate_edges"], EDGE_ROW_BYTES), config.local_components_max_edges)
        removals = removals.union(members.map_batches(lambda t: _codes(t.column("key"), NEAR),
                                                      batch_format="pyarrow"))
    routed = removals.map_batches(_with_file, batch_format="pyarrow").repartition(
        sized(documents, REMOVAL_ROW_BYTES), keys=["file"])
    counts = routed.map_batches(lambda t: _write_removals(t, out_dir), batch_size=None, batch_format="pyarrow")
    for row in counts.iter_rows():
        stats["exact_removed"] += int(row["exact"])
        stats["near_removed"] += int(row["near"])


def _codes(keys: pa.ChunkedArray | pa.Array, code: int) -> pa.Table:
    return pa.table({"key": keys, "code": pa.array(np.full(len(keys), code, np.int8))})


def _with_file(t: pa.Table) -> pa.Table:
    return t.append_column("file", pa.array(file_of(t.column("key").to_numpy()), pa.int64()))


def _write_removals(t: pa.Table, out_dir: str) -> pa.Table:
    """One file per input file, keys sorted, each key once with its strongest reason (exact before near)."""
    key, code, file = (t.column(c).to_numpy() for c in ("key", "code", "file"))
    order = np.lexsort((code, key))
    key, code, file = key[order], code[order], file[order]
    first = np.concatenate([[True], key[1:] != key[:-1]]) if len(key) else np.zeros(0, bool)
    key, code, file = key[first], code[first], file[first]
    for f in np.unique(file):
        mine = file == f
        table = pa.table({"key": pa.array(key[mine], pa.int64()), "code": pa.array(code[mine], pa.int8())})
        pq.write_table(table, removal_file(out_dir, int(f)))
    return pa.table({"exact": [int((code == EXACT).sum())], "near": [int((code == NEAR).sum())]})
