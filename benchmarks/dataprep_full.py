"""Whole-pipeline benchmark of `pretrain prep` on the full natural-language corpus (about 242 MB of text).

    python benchmarks/dataprep_full.py [--corpus /work/corpora/jsonl] [--out /tmp/prep-bench] [--cpus 2]

Build the corpus first (outside the repo): see ../shared/corpora/README.md (fetch_sources.sh, build_corpus.py).
Prints the wall time of each stage and of the whole run, the MinHash+LSH throughput (signatures and band keys in
one process, per core; and the dedup shuffle stage), and the peak resident memory of the driver plus every Ray
process it started (sampled every 0.2 s).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import threading
import time

CODE_SOURCES = {"kernel_code", "django_code"}


def sample_rss(stop: threading.Event, peak: dict) -> None:
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        try:
            procs = [me, *me.children(recursive=True)]
            total = sum(p.memory_info().rss for p in procs if p.is_running())
            peak["total"] = max(peak.get("total", 0), total)
            peak["driver"] = max(peak.get("driver", 0), me.memory_info().rss)
        except Exception:  # a process ending while sampled
            pass
        stop.wait(0.2)


def minhash_throughput(paths: list[str], limit_bytes: int = 40_000_000) -> float:
    import json

    from dataprep.dedup.minhash import MinHasher

    texts, size = [], 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                texts.append(text)
                size += len(text.encode())
                if size >= limit_bytes:
                    break
        if size >= limit_bytes:
            break
    hasher = MinHasher(5, 16, 7, 1)
    start = time.perf_counter()
    for lo in range(0, len(texts), 2000):
        sig, _ = hasher.signatures(texts[lo: lo + 2000])
        hasher.band_keys(sig)
    return size / 1e6 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default="/work/corpora/jsonl")
    parser.add_argument("--out", default="/tmp/prep-bench")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--keep-work", action="store_true", help="reuse stage outputs (measures a resumed run)")
    args = parser.parse_args()

    from dataprep.config import parse_prep_config
    from dataprep.pipeline import run_prep

    paths = sorted(p for p in glob.glob(os.path.join(args.corpus, "*.jsonl"))
                   if os.path.basename(p)[: -len(".jsonl")] not in CODE_SOURCES)
    text_mb = sum(os.path.getsize(p) for p in paths) / 1e6
    if not args.keep_work:
        shutil.rmtree(args.out, ignore_errors=True)
    raw = {"name": "bench", "output": os.path.join(args.out, "shards"), "seq_len": 2048, "num_cpus": args.cpus,
           "filters": {"c4": {"drop_lines_without_terminal_punct": False, "min_words_per_line": 0}},
           "tokenizer": {"vocab_size": 32768, "sample_bytes": 20_000_000},
           "sources": {os.path.basename(p)[: -len(".jsonl")]: {"path": p} for p in paths}}
    config = parse_prep_config(raw, source="benchmark")
    peak: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(stop, peak), daemon=True)
    sampler.start()
    start = time.perf_counter()
    report = run_prep(config, progress=False)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()

    print(f"corpus: {len(paths)} sources, {text_mb:.1f} MB of JSONL, {report['totals']['bytes_in'] / 1e6:.1f} MB text")
    print(f"whole pipeline: {wall:.1f} s on {args.cpus} CPUs ({report['totals']['bytes_in'] / 1e6 / wall:.2f} MB/s)")
    for stage, seconds in report["stage_seconds"].items():
        print(f"  {stage:<10} {seconds:8.1f} s")
    print(f"documents: {report['totals']['docs_in']:,} in, {report['totals']['docs_kept']:,} kept; "
          f"dedup {report['dedup']}")
    print(f"rows: {report['totals']['train_rows']:,} train, {report['totals']['val_rows']:,} val")
    print(f"peak RSS: driver {peak.get('driver', 0) / 2**30:.2f} GiB, "
          f"driver + Ray processes {peak.get('total', 0) / 2**30:.2f} GiB")
    print(f"MinHash signatures + LSH band keys, one process: {minhash_throughput(paths):.1f} MB/s per core")
    dedup_s = report["stage_seconds"].get("dedup", 0.0)
    print(f"LSH bucket shuffle + components: {dedup_s:.1f} s "
          f"({report['totals']['bytes_in'] / 1e6 / max(dedup_s, 1e-9):.1f} MB/s of text)")


if __name__ == "__main__":
    main()
