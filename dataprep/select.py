"""Stage 3, one task per input file: apply dedup removals and quality verdicts, keep the survivors' text.

This is where every readable document gets its final fate, in the design's precedence: exact duplicate, then
near duplicate, then the first quality rule it failed; so the per-reason counts add up with the kept documents
to the documents read.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataprep.dedup.stage import EXACT, NEAR, removal_file
from dataprep.executor import write_table_atomic

DUP_REASONS = {EXACT: "exact_duplicate", NEAR: "near_duplicate"}


def select_file(payload: dict, directory: str) -> dict:
    """payload: {source, file_id, parts: [...], removals_dir}."""
    removed_path = removal_file(payload["removals_dir"], payload["file_id"]) if payload["removals_dir"] else ""
    removed_keys = np.zeros(0, np.int64)
    removed_codes = np.zeros(0, np.int8)
    if removed_path and os.path.exists(removed_path):
        table = pq.read_table(removed_path)
        removed_keys, removed_codes = table.column("key").to_numpy(), table.column("code").to_numpy()
    stats = {"source": payload["source"], "docs": 0, "bytes": 0, "removed": {}, "parts": 0}
    for i, part in enumerate(payload["parts"]):
        table = pq.read_table(part, columns=["key", "doc_id", "text", "reason"])
        keys = table.column("key").to_numpy()
        reasons = np.array(table.column("reason").to_pylist(), dtype=object)
        where = np.searchsorted(removed_keys, keys)
        hit = (where < len(removed_keys)) & (removed_keys[np.minimum(where, max(len(removed_keys) - 1, 0))] == keys) \
            if len(removed_keys) else np.zeros(len(keys), bool)
        for code, name in DUP_REASONS.items():
            reasons[hit & (removed_codes[np.minimum(where, max(len(removed_codes) - 1, 0))] == code)
                    if len(removed_keys) else np.zeros(len(keys), bool)] = name
        for reason, count in zip(*np.unique(reasons[reasons != ""].astype(str), return_counts=True), strict=True):
            stats["removed"][str(reason)] = stats["removed"].get(str(reason), 0) + int(count)
        kept = table.filter(pa.array(reasons == "")).select(["key", "text"])
        stats["docs"] += kept.num_rows
        stats["bytes"] += int(pc.sum(pc.binary_length(pc.cast(kept.column("text"), pa.large_binary()))).as_py() or 0)
        write_table_atomic(kept, os.path.join(directory, f"{payload['name']}-{i:04d}.parquet"))
        stats["parts"] += 1
    return stats
