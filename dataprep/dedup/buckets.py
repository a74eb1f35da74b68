"""One hash shuffle finds both exact duplicates and LSH candidate pairs.

Every document contributes an exact row (its 128-bit text hash split into `bucket` and `check`) and one row per
LSH band (the band key as `bucket`). Ray Data hash-shuffles the rows by `bucket`, so every bucket lands in one
block, where a numpy sort finds the runs of equal (bucket, check, kind): in an exact run every row after the first
(lowest key) is an exact duplicate; in a band run every member is linked to the run's lowest key (a star: enough
for connectivity, linear in the bucket size instead of quadratic). No process holds more than one block.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dataprep.executor import read_table

EXACT_ROW, BAND_ROW = 0, 1


def find_duplicates(parts: list[str], partitions: int, exact: bool, near: bool):
    """A Ray Dataset of (a, b, kind): kind 0 is 'a duplicates b exactly', kind 1 an LSH edge a < b."""
    import ray

    # One task per ingest part, reading only the columns it shuffles (a part's text is most of its bytes): what a
    # task holds follows one part, not the corpus, whatever grouping Ray Data's own file reads would choose.
    files = ray.data.from_items([{"part": p} for p in parts], override_num_blocks=len(parts))
    rows = files.map_batches(lambda batch: part_rows(batch["part"], exact, near), batch_size=1)
    return rows.repartition(partitions, keys=["bucket"]).map_batches(
        scan_buckets, batch_size=None, batch_format="pyarrow")


def part_rows(paths: list[str], exact: bool, near: bool) -> pa.Table:
    """The bucket rows of the ingest parts at `paths`."""
    columns = ["key", "hash", "bands", "has_shingles"]
    return pa.concat_tables([bucket_rows(read_table(p, columns=columns), exact, near) for p in paths])


def bucket_rows(table: pa.Table, exact: bool, near: bool) -> pa.Table:
    keys = table.column("key").to_numpy()
    buckets, checks, owners, kinds = [], [], [], []
    if exact:
        digests = np.frombuffer(table.column("hash").combine_chunks().buffers()[1], dtype=np.uint64)
        digests = digests[: 2 * len(keys)].reshape(len(keys), 2)
        buckets.append(digests[:, 0])
        checks.append(digests[:, 1])
        owners.append(keys)
        kinds.append(np.full(len(keys), EXACT_ROW, np.int8))
    if near:
        keep = table.column("has_shingles").to_numpy(zero_copy_only=False)
        bands = table.column("bands").combine_chunks()
        width = bands.type.list_size
        values = bands.values.to_numpy().reshape(-1, width)[keep].reshape(-1)
        buckets.append(values)
        checks.append(np.zeros(len(values), np.uint64))
        owners.append(np.repeat(keys[keep], width))
        kinds.append(np.full(len(values), BAND_ROW, np.int8))
    return pa.table({"bucket": pa.array(np.concatenate(buckets), pa.uint64()),
                     "check": pa.array(np.concatenate(checks), pa.uint64()),
                     "key": pa.array(np.concatenate(owners), pa.int64()),
                     "kind": pa.array(np.concatenate(kinds), pa.int8())})


def scan_buckets(table: pa.Table) -> pa.Table:
    bucket, check, key, kind = (table.column(c).to_numpy() for c in ("bucket", "check", "key", "kind"))
    order = np.lexsort((key, kind, check, bucket))
    bucket, check, key, kind = bucket[order], check[order], key[order], kind[order]
    if not len(key):
        return _pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int8))
    first = np.concatenate([[True], (bucket[1:] != bucket[:-1]) | (check[1:] != check[:-1]) | (kind[1:] != kind[:-1])])
    head = key[np.maximum.accumulate(np.where(first, np.arange(len(key)), 0))]
    linked = ~first
    pairs = np.unique(np.stack([key[linked], head[linked], kind[linked]], axis=1), axis=0)
    return _pairs(pairs[:, 0], pairs[:, 1], pairs[:, 2].astype(np.int8))


def _pairs(a: np.ndarray, b: np.ndarray, kind: np.ndarray) -> pa.Table:
    return pa.table({"a": pa.array(a, pa.int64()), "b": pa.array(b, pa.int64()), "kind": pa.array(kind, pa.int8())})
