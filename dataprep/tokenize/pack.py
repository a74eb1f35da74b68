"""Stage 5, one task per input file: repeat documents per the mixture and pack them into rows of seq_len + 1.

Documents are concatenated with EOS after each, in an order shuffled per (file, pass) so repeated passes are not
identical streams, and cut into rows of seq_len + 1 tokens; the tail shorter than a row is dropped and counted.
A pass beyond the whole epochs keeps each document with probability equal to the fraction (a per-document coin).

`pack: whole` keeps documents whole where they fit: a document (with its EOS) that fits in a row but not in what
is left of the current one starts the next row, the gap filled with EOS (padding, counted); a longer document
continues the stream as under `split`. A source's `long_doc_boost` multiplies the passes over its long documents
(`mix.long_doc_tokens` tokens or more). Each task also counts its training documents' lengths (`dataprep.lengths`)
for the report.
"""

from __future__ import annotations

import os

import numpy as np

from dataprep.executor import parts_of, read_table
from dataprep.lengths import histogram
from dataprep.shards import write_atomic
from dataprep.stages import FileStage, PrepRun
from dataprep.tokenize.encode import TRAIN, VAL, unit_hash


class PackStage(FileStage):
    """Each file's documents repeated per the mixture plan and packed into rows, train and validation apart."""

    name = "pack"
    counters = ("train_rows", "train_tokens", "val_rows", "val_tokens")

    def key(self, prep: PrepRun) -> tuple:
        c = self.config
        epochs = {n: round(p.epochs, 9) for n, p in prep["mix"].info.items()}
        boosts = {n: s.long_doc_boost for n, s in c.sources.items() if s.long_doc_boost != 1}
        # Only a non-default packing enters the key, so the outputs of a prep from before these options are reused.
        whole = (c.pack, long_doc_tokens(c.mix.long_doc_tokens, c.seq_len), boosts) if c.pack != "split" or boosts \
            else ()
        return (prep["encode"].directory, epochs, c.seq_len, c.seed, prep["tokenizer"].info["eos_id"], *whole)

    def tasks(self, prep: PrepRun) -> list[tuple[str, dict]]:
        c, plans, eos_id = self.config, prep["mix"].info, prep["tokenizer"].info["eos_id"]
        return [(t["name"], {"name": t["name"], "source": t["source"], "file_id": t["file_id"],
                             "epochs": plans[t["source"]].epochs, "eos_id": eos_id, "pack": c.pack,
                             "long_doc_boost": c.sources[t["source"]].long_doc_boost,
                             "long_doc_tokens": long_doc_tokens(c.mix.long_doc_tokens, c.seq_len),
                             "parts": parts_of(prep["encode"].directory, t["name"])}) for t in prep.files]

    def process(self, payload: dict, directory: str) -> dict:
        return pack_file(payload, directory, self.config.seq_len, payload["eos_id"], self.config.seed)


def long_doc_tokens(configured: int, seq_len: int) -> int:
    """The length from which a document is long: mix.long_doc_tokens, or half a row when that is 0."""
    return configured or seq_len // 2


def pack_file(payload: dict, directory: str, seq_len: int, eos_id: int, seed: int) -> dict:
    """payload: {name, source, file_id, parts, epochs} and optionally {pack, long_doc_boost, long_doc_tokens}.
    Writes <name>-train.npy and <name>-val.npy row blocks."""
    keys, splits, docs = [], [], []
    for part in payload["parts"]:
        table = read_table(part)
        keys.append(table.column("key").to_numpy())
        splits.append(table.column("split").to_numpy())
        docs.extend(np.asarray(d, dtype=np.int32) for d in table.column("tokens").to_numpy(zero_copy_only=False))
    keys_all = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    split_all = np.concatenate(splits) if splits else np.zeros(0, np.int8)
    stats = {"source": payload["source"]}
    epochs = payload["epochs"]
    lengths = np.fromiter((len(d) for d in docs), np.int64, len(docs))
    rng = np.random.default_rng([seed, payload["file_id"]])
    for code, name in ((TRAIN, "train"), (VAL, "val")):
        chosen = np.flatnonzero(split_all == code)
        order = []
        # Passes per document: the source's epochs, times the boost for long documents (training only).
        long = lengths[chosen] >= payload.get("long_doc_tokens", 0)
        each = epochs * np.where(long, payload.get("long_doc_boost", 1.0), 1.0)
        passes = int(np.ceil(max(epochs, each.max(initial=0.0)))) if code == TRAIN else 1
        for p in range(passes):
            take = chosen
            if code == TRAIN and (p + 1 > each).any():
                take = chosen[unit_hash(keys_all[chosen], seed, salt=100 + p) < each - p]
            order.append(rng.permutation(take))
        order = np.concatenate(order) if order else np.zeros(0, np.int64)
        rows, used, dropped, padded = _pack([docs[i] for i in order], seq_len, eos_id,
                                            payload.get("pack", "split") == "whole")
        path = os.path.join(directory, f"{payload['name']}-{name}.npy")
        _save_npy(path, rows)
        stats[f"{name}_rows"] = int(len(rows))
        stats[f"{name}_docs"] = int(len(order))
        stats[f"{name}_tokens"] = int(used)
        stats[f"{name}_dropped_tokens"] = int(dropped)
        stats[f"{name}_pad_tokens"] = int(padded)
    train = lengths[split_all == TRAIN]
    stats["doc_lengths"] = histogram(train)
    stats["doc_length_max"] = int(train.max(initial=0))
    return stats


def _pack(docs: list[np.ndarray], seq_len: int, eos_id: int,
          whole: bool = False) -> tuple[np.ndarray, int, int, int]:
    """Rows of seq_len + 1 from the documents, each followed by EOS; the tokens in rows, the tail dropped, and the
    EOS padding inserted (`whole`: before a document that fits in a row but not in the rest of the current one).
    Document tokens are conserved: in rows + dropped - padding = Σ (len + 1)."""
    width = seq_len + 1
    if not docs:
        return np.zeros((0, width), np.int32), 0, 0, 0
    eos = np.array([eos_id], np.int32)
    pieces, filled, padded = [], 0, 0
    for d in docs:
        size = len(d) + 1
        if whole and filled and size <= width < filled + size:
            pieces.append(np.full(width - filled, eos_id, np.int32))
            padded += width - filled
            filled = 0
        pieces.extend((d, eos))
        filled = (filled + size) % width
    stream = np.concatenate(pieces)
    n = len(stream) // width
    return stream[: n * width].reshape(n, width), n * width, len(stream) - n * width, padded


def _save_npy(path: str, rows: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, rows, allow_pickle=False)
    write_atomic(path, buffer.getvalue())
