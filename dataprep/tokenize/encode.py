"""Stage 4, one task per input file: split documents into train / validation and encode them.

The split is by document (a hash of its key and the seed), so no document contributes to both, and it does not
depend on how files are grouped into tasks.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any

import numpy as np
import pyarrow as pa

from dataprep.batches import text_batches
from dataprep.executor import file_digest, parts_of, read_table, write_table_atomic
from dataprep.hashing import splitmix64
from dataprep.stages import FileStage, PrepRun

TRAIN, VAL = 0, 1
_ENCODE_BATCH = 512
_ENCODE_BATCH_CHARS = 1 << 18
_PIECE_CHARS = 1 << 16
# after a character that is not whitespace, before a space, tab or newline; after ASCII punctuation other than an
# apostrophe, before an ASCII letter or digit (see `pieces_of`). Python's whitespace holds all of Unicode's, so its \S
# is never whitespace to the split.
_CUT = re.compile(r"(?<=\S)(?=[ \t\n])|(?<=[!-&(-/:-@\[-`{-~])(?=[A-Za-z0-9])")


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


@functools.lru_cache(maxsize=2)
def load_tokenizer(path: str, digest: str) -> tuple[Any, tuple[str, ...] | None]:
    """The tokenizer, loaded once per worker process (`digest` keys a changed file), and its `uncut_tokens`. A
    tokenizer loaded per task left its caches' freed memory scattered over the allocator's per-thread arenas: 48
    tasks of 2 MB files ended at 620 MiB of RSS with a fresh tokenizer each, 360 MiB with one."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)
    return tokenizer, uncut_tokens(tokenizer)


def uncut_tokens(tokenizer) -> tuple[str, ...] | None:
    """The added tokens (EOS and the like) that `pieces_of` must not cut into, or None when pieces could encode
    differently from the whole text: a normalizer, a pre-tokenization other than byte-level with the GPT-2 split
    and no prefix space, or an added token that takes the whitespace around it or matches whole words only."""
    spec = json.loads(tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    added = list(tokenizer.get_added_tokens_decoder().values())
    if (spec.get("normalizer") is not None or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space")
            or not pre.get("use_regex", True) or any(t.lstrip or t.rstrip or t.single_word for t in added)):
        return None
    return tuple(t.content for t in added)


def encode_file(payload: dict, directory: str, tokenizer_path: str, val_fraction: float, seed: int) -> dict:
    """payload: {name, source, parts}. Writes (key, split, tokens) parts; tokens exclude the EOS added at packing."""
    tokenizer, uncut = load_tokenizer(tokenizer_path, file_digest(tokenizer_path))
    stats = {"source": payload["source"], "train_docs": 0, "train_tokens": 0, "val_docs": 0, "val_tokens": 0}
    for i, part in enumerate(payload["parts"]):
        table = read_table(part)
        keys = table.column("key").to_numpy()
        split = (unit_hash(keys, seed, salt=1) < val_fraction).astype(np.int8)
        texts = table.column("text").to_pylist()
        values, lengths = encode_texts(tokenizer, texts, uncut)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
        write_table_atomic(pa.table({"key": keys, "split": split, "tokens": tokens}),
                           os.path.join(directory, f"{payload['name']}-{i:04d}.parquet"))
        for code, name in ((TRAIN, "train"), (VAL, "val")):
            stats[f"{name}_docs"] += int((split == code).sum())
            stats[f"{name}_tokens"] += int(lengths[split == code].sum())
    return stats


def encode_texts(tokenizer, texts: list[str], uncut: tuple[str, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """All texts' token ids, concatenated as int32, and each text's length.

    The tokenizer keeps about 450 bytes per token while it encodes (its per-token records, then Python's int
    objects), so a text is encoded in pieces (`pieces_of`, unless `uncut` is None) and batches are bounded in
    characters: what one task holds no longer follows its longest document (3 MB in the full corpus, 1.5 GB while
    encoded whole), and each batch's ids become int32 arrays at once.
    """
    pieces, owner = [], []
    for index, text in enumerate(texts):
        for piece in pieces_of(text, uncut) if uncut is not None else (text,):
            pieces.append(piece)
            owner.append(index)
    values = []
    lengths = np.zeros(len(texts), np.int64)
    for lo, hi in text_batches(pieces, _ENCODE_BATCH_CHARS, _ENCODE_BATCH):
        encoded = tokenizer.encode_batch(pieces[lo:hi], add_special_tokens=False)
        for index, encoding in zip(owner[lo:hi], encoded, strict=True):
            values.append(np.asarray(encoding.ids, dtype=np.int32))
            lengths[index] += len(values[-1])
    flat = np.concatenate(values) if values else np.zeros(0, np.int32)
    return flat, lengths


def pieces_of(text: str, uncut: tuple[str, ...] = ()) -> list[str]:
    """`text` cut into pieces of about `_PIECE_CHARS` that encode to the same ids as the whole text.

    Cuts fall where the GPT-2 split (byte-level pre-tokenization, no prefix space) ends a token without reading
    past it: a token holding a letter, digit or punctuation mark never takes whitespace, and a run of punctuation
    never takes a letter or digit (an apostrophe, which starts contractions like 's, is left out). The split has no
    lookbehind, so the tokens after a cut are the whole text's tokens from there, and each piece's tokens are the
    whole text's tokens in its range. No cut falls inside or at the edge of one of the `uncut` tokens (the
    tokenizer matches those before splitting). A text without such a place stays whole.
    """
    if len(text) <= _PIECE_CHARS:
        return [text]
    pieces, lo = [], 0
    at = lo + _PIECE_CHARS
    while len(text) - lo > _PIECE_CHARS and (cut := _CUT.search(text, at)):
        at = cut.start() + 1
        if any(inside(text, token, cut.start()) for token in uncut):
            continue
        pieces.append(text[lo:cut.start()])
        lo = cut.start()
        at = lo + _PIECE_CHARS
    pieces.append(text[lo:])
    return pieces


def inside(text: str, token: str, at: int) -> bool:
    """Whether an occurrence of `token` in `text` holds position `at` or ends there."""
    return text.find(token, max(0, at - len(token)), at + len(token)) != -1
