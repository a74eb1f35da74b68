"""Whole-pipeline benchmark of `pretrain prep` on the full natural-language corpus (about 242 MB of text).

    python benchmarks/dataprep_full.py [--corpus /work/corpora/jsonl] [--out /tmp/prep-bench] [--cpus 2]

Build the corpus first, outside the repo, with benchmarks/corpus/fetch_sources.sh and build_corpus.py (see
benchmarks/corpus/README.md).
Prints the wall time of each stage and of the whole run, the MinHash+LSH throughput (signatures and band keys, in
one process and in one process per CPU at once; and the dedup shuffle stage), the peak resident memory of the driver
plus every Ray process it started (sampled every 0.2 s), and the load average around the run; writes the figures to
benchmarks/results/dataprep_full_2core.json (--results).
"""

from __future__ import annotations

import argparse
import glob
import json
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


def _load_texts(paths: list[str], limit_bytes: int) -> tuple[list[str], int]:
    texts, size = [], 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                texts.append(text)
                size += len(text.encode())
                if size >= limit_bytes:
                    return texts, size
    return texts, size


def _sign(args: tuple[list[str], int, int]) -> float:
    """Seconds to sign and band the texts, in batches of 2000 documents as in a task."""
    from dataprep.dedup.minhash import MinHasher

    texts, bands, rows = args
    hasher = MinHasher(5, bands, rows, 1)
    start = time.perf_counter()
    for lo in range(0, len(texts), 2000):
        sig, _ = hasher.signatures(texts[lo: lo + 2000])
        hasher.band_keys(sig)
    return time.perf_counter() - start


def minhash_throughput(paths: list[str], processes: int, limit_bytes: int = 40_000_000) -> tuple[float, float]:
    """(MB/s of one process, MB/s of `processes` processes signing their shares at once) on the same texts."""
    from concurrent.futures import ProcessPoolExecutor

    texts, size = _load_texts(paths, limit_bytes)
    one = size / 1e6 / _sign((texts, 16, 7))
    shares = [(texts[k::processes], 16, 7) for k in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_sign, [([], 1, 1)] * processes + [(texts[:1], 1, 1)] * processes))  # start and import
        start = time.perf_counter()
        list(pool.map(_sign, shares))
        machine = size / 1e6 / (time.perf_counter() - start)
    return one, machine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default="/work/corpora/jsonl")
    parser.add_argument("--out", default="/tmp/prep-bench")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--keep-work", action="store_true", help="reuse stage outputs (measures a resumed run)")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results",
                                                         "dataprep_full_2core.json"),
                        help="write the figures here as JSON ('' : don't)")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
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
    load_before = os.getloadavg()
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(stop, peak), daemon=True)
    sampler.start()
    start = time.perf_counter()
    report = run_prep(config, progress=False)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()

    total_mb = report["totals"]["bytes_in"] / 1e6
    print(f"corpus: {len(paths)} sources, {text_mb:.1f} MB of JSONL, {total_mb:.1f} MB text")
    print(f"whole pipeline: {wall:.1f} s on {args.cpus} CPUs ({total_mb / wall:.2f} MB/s); "
          f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    for stage, seconds in report["stage_seconds"].items():
        print(f"  {stage:<10} {seconds:8.1f} s")
    print(f"documents: {report['totals']['docs_in']:,} in, {report['totals']['docs_kept']:,} kept; "
          f"dedup {report['dedup']}")
    print(f"rows: {report['totals']['train_rows']:,} train, {report['totals']['val_rows']:,} val")
    print(f"peak RSS: driver {peak.get('driver', 0) / 2**30:.2f} GiB, "
          f"driver + Ray processes {peak.get('total', 0) / 2**30:.2f} GiB")
    one, machine = minhash_throughput(paths, args.cpus)
    print(f"MinHash signatures + LSH band keys: {one:.1f} MB/s in one process, {machine:.1f} MB/s in {args.cpus}")
    dedup_s = report["stage_seconds"].get("dedup", 0.0)
    print(f"LSH bucket shuffle + components: {dedup_s:.1f} s ({total_mb / max(dedup_s, 1e-9):.1f} MB/s of text)")
    figures = {"machine": f"{os.cpu_count()}-core CPU", "cpus": args.cpus, "sources": len(paths),
               "jsonl_mb": round(text_mb, 1), "text_mb": round(total_mb, 1), "wall_s": round(wall, 1),
               "load_average_before": round(load_before[0], 2), "load_average_after": round(os.getloadavg()[0], 2),
               "stage_seconds": report["stage_seconds"], "docs_in": report["totals"]["docs_in"],
               "docs_kept": report["totals"]["docs_kept"], "dedup": report["dedup"],
               "train_rows": report["totals"]["train_rows"], "val_rows": report["totals"]["val_rows"],
               "peak_rss_gib": {"driver": round(peak.get("driver", 0) / 2**30, 2),
                                "driver_and_ray": round(peak.get("total", 0) / 2**30, 2)},
               "minhash_lsh_mb_per_s": {"one_process": round(one, 2), f"{args.cpus}_processes": round(machine, 2)},
               "span_bytes": config.span_bytes}
    if args.results:
        os.makedirs(os.path.dirname(args.results), exist_ok=True)
        with open(args.results, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
