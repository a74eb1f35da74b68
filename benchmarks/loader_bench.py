"""Tokens per second one data-parallel rank gets from `ShardLoader` (target: ≥ 2M tokens/s on CPU at seq 2048).

    python benchmarks/loader_bench.py                      # builds byte-token shards of examples/corpus in a temp dir
    python benchmarks/loader_bench.py --shards runs/demo/shards --seq-len 2048

Prints one line per prefetch setting: tokens/s of rank 0 of `--dp` ranks, the loader doing nothing but reading
(the training step would overlap with the prefetch thread). The pages are cold only on the first pass over the data.
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import numpy as np

from dataprep.shards import ShardWriter, write_manifest
from parallel.loader import ShardLoader

CORPUS = Path(__file__).resolve().parent.parent / "examples" / "corpus"


def build_byte_shards(directory: Path, seq_len: int, rows: int) -> None:
    """`rows` rows of the demo corpus as UTF-8 byte tokens, repeated as often as needed to fill them."""
    text = b"".join(gzip.decompress(p.read_bytes()) for p in sorted(CORPUS.glob("*.jsonl.gz")))
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
    width = seq_len + 1
    packed = np.resize(tokens, rows * width).reshape(rows, width)
    with ShardWriter(directory, "train", seq_len, rows_per_shard=1024) as writer:
        writer.write(packed)
    entries = writer.close()
    write_manifest(directory, {
        "format_version": 1, "seq_len": seq_len, "config_hash": "bench-bytes",
        "tokenizer": {"file": "tokenizer.json", "vocab_size": 257, "eos_id": 256},
        "sources": {"corpus": {"tokens": int(packed.size)}},
        "splits": {"train": {"shards": entries, "rows": rows, "tokens": int(packed.size)}},
    })


def measure(path: str, seq_len: int, micro: int, accum: int, dp: int, prefetch: int, seconds: float) -> float:
    loader = ShardLoader(path, seq_len=seq_len, micro_batch_size=micro, grad_accum=accum, dp_rank=0, dp_size=dp,
                         seed=1, prefetch=prefetch, verify=False)
    loader.next_step()
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += sum(mb.inputs.numel() for mb in loader.next_step())
    rate = tokens / (time.perf_counter() - start)
    loader.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="a shard directory; default: build byte-token shards of the demo corpus")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=8192, help="rows of the built shards")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--dp", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path = args.shards
        if path is None:
            path = scratch
            build_byte_shards(Path(scratch), args.seq_len, args.rows)
        for prefetch in (0, 4):
            rate = measure(path, args.seq_len, args.micro_batch_size, args.grad_accum, args.dp, prefetch,
                           args.seconds)
            print(f"loader seq_len={args.seq_len} micro={args.micro_batch_size} accum={args.grad_accum} "
                  f"dp={args.dp} prefetch={prefetch}: {rate / 1e6:.2f}M tokens/s per rank")


if __name__ == "__main__":
    main()
