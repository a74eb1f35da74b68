"""Stage 5, one task per input file: repeat documents per the mixture and pack them into rows of seq_len + 1.

Documents are concatenated with EOS after each, in an order shuffled per (file, pass) so repeated passes are not
identical streams, and cut into rows of seq_len + 1 tokens; the tail shorter than a row is dropped and counted.
A pass beyond the whole epochs keeps each document with probability equal to the fraction (a per-document coin).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq

from dataprep.executor import parts_of
from dataprep.shards import write_atomic
from dataprep.stages import FileStage, PrepRun
from dataprep.tokenize.encode import TRAIN, VAL, unit_hash


class PackStage(FileStage):
    """Each file's documents repeated per the mixture plan and packed into rows, train and validation apart."""

    name = "pack"
    counters = ("train_rows", "train_tokens", "val_rows", "val_tokens")

    def key(self, prep: PrepRun) -> tuple:
        epochs = {n: round(p.epochs, 9) for n, p in prep["mix"].info.items()}
        return (prep["encode"].directory, epochs, self.config.seq_len, self.config.seed,
                prep["tokenizer"].info["eos_id"])

    def tasks(self, prep: PrepRun) -> list[tuple[str, dict]]:
        plans, eos_id = prep["mix"].info, prep["tokenizer"].info["eos_id"]
        return [(t["name"], {"name": t["name"], "source": t["source"], "file_id": t["file_id"],
                             "epochs": plans[t["source"]].epochs, "eos_id": eos_id,
                             "parts": parts_of(prep["encode"].directory, t["name"])}) for t in prep.files]

    def process(self, payload: dict, directory: str) -> dict:
        return pack_file(payload, directory, self.config.seq_len, payload["eos_id"], self.config.seed)


def pack_file(payload: dict, directory: str, seq_len: int, eos_id: int, seed: int) -> dict:
    """payload: {name, source, file_id, parts, epochs}. Writes <name>-train.npy and <name>-val.npy row blocks."""
    keys, splits, docs = [], [], []
    for part in payload["parts"]:
        table = pq.read_table(part)
        keys.append(table.column("key").to_numpy())
        splits.append(table.column("split").to_numpy())
        docs.extend(np.asarray(d, dtype=np.int32) for d in table.column("tokens").to_numpy(zero_copy_only=False))
    keys_all = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    split_all = np.concatenate(splits) if splits else np.zeros(0, np.int8)
    stats = {"source": payload["source"]}
    epochs = payload["epochs"]
    rng = np.random.default_rng([seed, payload["file_id"]])
    for code, name in ((TRAIN, "train"), (VAL, "val")):
        chosen = np.flatnonzero(split_all == code)
        order = []
        passes = int(np.ceil(epochs)) if code == TRAIN else 1
        for p in range(passes):
            take = chosen
            if code == TRAIN and p + 1 > epochs:
                take = chosen[unit_hash(keys_all[chosen], seed, salt=100 + p) < epochs - p]
            order.append(rng.permutation(take))
        order = np.concatenate(order) if order else np.zeros(0, np.int64)
        rows, used, dropped = _pack([docs[i] for i in order], seq_len, eos_id)
        path = os.path.join(directory, f"{payload['name']}-{name}.npy")
        _save_npy(path, rows)
        stats[f"{name}_rows"] = int(len(rows))
        stats[f"{name}_docs"] = int(len(order))
        stats[f"{name}_tokens"] = int(used)
        stats[f"{name}_dropped_tokens"] = int(dropped)
    return stats


def _pack(docs: list[np.ndarray], seq_len: int, eos_id: int) -> tuple[np.ndarray, int, int]:
    width = seq_len + 1
    if not docs:
        return np.zeros((0, width), np.int32), 0, 0
    eos = np.array([eos_id], np.int32)
    stream = np.concatenate([x for d in docs for x in (d, eos)])
    n = len(stream) // width
    return stream[: n * width].reshape(n, width), n * width, len(stream) - n * width


def _save_npy(path: str, rows: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, rows, allow_pickle=False)
    write_atomic(path, buffer.getvalue())
