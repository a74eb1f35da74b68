"""Write the shard directory from the packed row blocks: a seeded global row order, shards, tokenizer, manifest.

Row blocks are memory-mapped and gathered one shard at a time, so memory holds one shard however large the
dataset. The manifest goes last: a directory with a manifest is complete.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from dataprep.shards import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    TOKENIZER_FILE,
    ShardWriter,
    write_manifest,
)


def write_shards(output: str, blocks: dict[str, list[str]], seq_len: int, rows_per_shard: int, seed: int,
                 progress=None) -> dict[str, dict]:
    """blocks: split → .npy row-block paths in a fixed order. Returns the manifest's `splits` section."""
    os.makedirs(output, exist_ok=True)
    stale = os.path.join(output, MANIFEST_FILE)
    if os.path.exists(stale):
        os.remove(stale)  # the old manifest would describe shards about to be replaced
    for name in os.listdir(output):
        if name.endswith(".arrow"):
            os.remove(os.path.join(output, name))
    splits = {}
    for split, paths in blocks.items():
        arrays = [np.load(p, mmap_mode="r") for p in paths]
        sizes = np.array([len(a) for a in arrays], np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        order = np.random.default_rng([seed, 7 if split == "train" else 8]).permutation(int(starts[-1]))
        writer = ShardWriter(output, split, seq_len, rows_per_shard)
        for lo in range(0, len(order), rows_per_shard):
            writer.write(_gather(arrays, starts, order[lo: lo + rows_per_shard], seq_len + 1))
            if progress:
                progress(min(rows_per_shard, len(order) - lo))
        entries = writer.close()
        rows = int(starts[-1])
        splits[split] = {"rows": rows, "tokens": rows * seq_len, "shards": entries}
    return splits


def _gather(arrays: list[np.ndarray], starts: np.ndarray, index: np.ndarray, width: int) -> np.ndarray:
    out = np.empty((len(index), width), np.int32)
    block = np.searchsorted(starts, index, side="right") - 1
    for b in np.unique(block):
        mine = block == b
        local = index[mine] - starts[b]
        order = np.argsort(local)
        rows = arrays[b][local[order]]
        target = np.flatnonzero(mine)[order]
        out[target] = rows
    return out


def finish_output(output: str, tokenizer_file: str, manifest: dict) -> None:
    shutil.copyfile(tokenizer_file, os.path.join(output, TOKENIZER_FILE))
    manifest = {"format_version": FORMAT_VERSION, **manifest}
    write_manifest(output, manifest)
