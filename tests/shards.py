"""Shard directories of real text for the loader, checkpoint and resume tests.

Text from examples/corpus is tokenized as UTF-8 bytes (vocab 257, id 256 ends a document), packed into rows of
seq_len + 1 and written with `dataprep.shards.ShardWriter` (the writer `pretrain prep` uses); every 10th row goes
to the val split.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import yaml

from dataprep.shards import ShardWriter, write_manifest

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "corpus"
EOS = 256


def corpus_tokens(max_tokens: int, sources: tuple[str, ...] = ("kjv", "python_docs", "wiki_vital_en")) -> np.ndarray:
    """Byte tokens of the named sources, interleaved by document, up to `max_tokens`."""
    streams = []
    for name in sources:
        with gzip.open(CORPUS / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
            streams.append([json.loads(line)["text"] for line in f])
    tokens: list[int] = []
    for docs in zip(*streams, strict=False):
        for text in docs:
            tokens.extend(text.encode("utf-8"))
            tokens.append(EOS)
        if len(tokens) >= max_tokens:
            break
    return np.asarray(tokens[:max_tokens], dtype=np.int32)


def write_shards(directory: Path, seq_len: int, rows: int, rows_per_shard: int = 64,
                 sources: tuple[str, ...] | None = None) -> Path:
    """A shard directory of about `rows` training rows (plus a tenth as many val rows) of real text; `sources`: the
    corpus files to read (e.g. ("fortunes",) for many short documents), else `corpus_tokens`' default."""
    width = seq_len + 1
    total = rows + rows // 9 + 1
    packed = (corpus_tokens(total * width, sources) if sources else corpus_tokens(total * width)).reshape(-1, width)
    is_val = np.arange(len(packed)) % 10 == 9
    splits = {}
    for split, block in (("train", packed[~is_val]), ("val", packed[is_val])):
        with ShardWriter(directory, split, seq_len, rows_per_shard=rows_per_shard) as writer:
            writer.write(block)
        entries = writer.close()
        splits[split] = {"shards": entries, "rows": int(len(block)), "tokens": int(block.size)}
    write_manifest(directory, {
        "format_version": 1, "seq_len": seq_len, "config_hash": "test-bytes",
        "tokenizer": {"file": "tokenizer.json", "vocab_size": 257, "eos_id": EOS},
        "sources": {"corpus": {"tokens": int(packed.size)}},
        "splits": splits,
    })
    return directory


def write_job(path: Path, shards: Path, seq_len: int, **sections: object) -> Path:
    """A one-process CPU job spec on `shards` written to `path`; `sections` (name, model, schedule, ...) added."""
    spec = {"data": {"path": str(shards), "seq_len": seq_len},
            "resources": {"device": "cpu", "num_nodes": 1, "gpus_per_node": 1}, **sections}
    path.write_text(yaml.safe_dump(spec))
    return path
