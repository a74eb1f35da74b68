"""Stage 4, one task per input file: split documents into train / validation and encode them.

The split is by document (a hash of its key and the seed), so no document contributes to both, and it does not
depend on how files are grouped into tasks.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dataprep.executor import file_digest, parts_of, write_table_atomic
from dataprep.hashing import splitmix64
from dataprep.stages import FileStage, PrepRun

TRAIN, VAL = 0, 1
_ENCODE_BATCH = 512


def unit_hash(keys: np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """A deterministic uniform number in [0, 1) per key: the coin of sampling and splitting decisions."""
    mixed = splitmix64(keys.astype(np.uint64) ^ splitmix64(np.array([seed * 1_000_003 + salt], dtype=np.uint64)))
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class EncodeStage(FileStage):
    """Train / validation split by document, then token ids, per file."""

    name = "encode"

    def key(self, prep: PrepRun) -> tuple:
        tokenizer = prep["tokenizer"].info["file"]
        return (prep["select"].directory, tokenizer, file_digest(tokenizer), self.config.mix.val_fraction,
                self.config.seed)

    def tasks(self, prep: PrepRun) -> list[tuple[str, dict]]:
        return [(t["name"], {"name": t["name"], "source": t["source"], "tokenizer": prep["tokenizer"].info["file"],
                             "parts": parts_of(prep["select"].directory, t["name"])}) for t in prep.files]

    def process(self, payload: dict, directory: str) -> dict:
        return encode_file(payload, directory, payload["tokenizer"], self.config.mix.val_fraction, self.config.seed)


def encode_file(payload: dict, directory: str, tokenizer_path: str, val_fraction: float, seed: int) -> dict:
    """payload: {name, source, parts}. Writes (key, split, tokens) parts; tokens exclude the EOS added at packing."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    stats = {"source": payload["source"], "train_docs": 0, "train_tokens": 0, "val_docs": 0, "val_tokens": 0}
    for i, part in enumerate(payload["parts"]):
        table = pq.read_table(part)
        keys = table.column("key").to_numpy()
        split = (unit_hash(keys, seed, salt=1) < val_fraction).astype(np.int8)
        texts = table.column("text").to_pylist()
        ids = []
        for lo in range(0, len(texts), _ENCODE_BATCH):
            ids.extend(e.ids for e in tokenizer.encode_batch(texts[lo: lo + _ENCODE_BATCH], add_special_tokens=False))
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        tokens = pa.array(ids, pa.large_list(pa.int32()))
        write_table_atomic(pa.table({"key": keys, "split": split, "tokens": tokens}),
                           os.path.join(directory, f"{payload['name']}-{i:04d}.parquet"))
        for code, name in ((TRAIN, "train"), (VAL, "val")):
            stats[f"{name}_docs"] += int((split == code).sum())
            stats[f"{name}_tokens"] += int(lengths[split == code].sum())
    return stats
