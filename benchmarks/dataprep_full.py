"""Whole-pipeline benchmark of `pretrain prep` on the full natural-language corpus (about 242 MB of text).

    python benchmarks/dataprep_full.py [--corpus /work/corpora/jsonl] [--out /tmp/prep-bench] [--cpus 2]
        [--steps base|default|all]

Build the corpus first, outside the repo, with benchmarks/corpus/fetch_sources.sh and build_corpus.py (see
benchmarks/corpus/README.md); the 19 natural-language sources of build_corpus.py are read (not the code sources,
nor the ones build_large.py adds to the same folder).

`--steps` picks the filter steps: `base` those of the first figures (PII redaction off), `default` today's defaults
(PII on), `all` the defaults plus decontamination against 1,000 passages of the repository's example corpus
(`write_eval_set`) and a fastText quality model trained with `pretrain prep train-quality` on whole sources
(encyclopedia and manuals positive, licence boilerplate and fortunes negative) that scores every prose document.
The evaluation set and the model are built before the clock starts, under `--assets`.
Prints the wall time of each stage and of the whole run, the MinHash+LSH throughput (signatures and band keys, in
one process and in one process per CPU at once; and the dedup shuffle stage), the peak resident memory of the driver
plus every Ray process it started (sampled every 0.2 s), and the load average around the run; writes the figures to
benchmarks/results/dataprep_full_2core.json (--results).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

CODE_SOURCES = {"kernel_code", "django_code"}
HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples", "corpus")
QUALITY_POSITIVE = ("wiki_vital_en", "python_docs", "postgres_docs")
QUALITY_NEGATIVE = ("debian_copyright", "fortunes")


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


def natural_sources(corpus: str) -> list[str]:
    """The JSONL files of build_corpus.py's natural-language sources in `corpus`."""
    sys.path.insert(0, os.path.join(HERE, "corpus"))
    from build_corpus import SOURCES

    return sorted(os.path.join(corpus, f"{name}.jsonl") for name in SOURCES if name not in CODE_SOURCES)


def write_eval_set(path: str, items: int = 1000, words: int = 50) -> int:
    """`items` evaluation passages as JSONL: paragraphs of at least 20 words from the repository's example corpus
    (its first `words` words each), chosen by a hash of the text; returns the count written."""
    paragraphs = []
    for name in sorted(glob.glob(os.path.join(EXAMPLES, "*.jsonl.gz"))):
        with gzip.open(name, "rt", encoding="utf-8") as f:
            for line in f:
                for paragraph in re.split(r"\n\s*\n", json.loads(line)["text"]):
                    if len(paragraph.split()) >= 20:
                        paragraphs.append(" ".join(paragraph.split()[:words]))
    chosen = sorted(set(paragraphs), key=lambda t: hashlib.blake2b(t.encode(), digest_size=8).digest())[:items]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in chosen)
    return len(chosen)


def train_quality_model(corpus: str, path: str) -> None:
    """A fastText quality classifier from whole sources as labels, through the CLI users run."""
    args = [sys.executable, "-m", "orchestrator.cli", "prep", "train-quality", "-o", path, "--quiet"]
    args += [a for name in QUALITY_POSITIVE for a in ("--positive", os.path.join(corpus, f"{name}.jsonl"))]
    args += [a for name in QUALITY_NEGATIVE for a in ("--negative", os.path.join(corpus, f"{name}.jsonl"))]
    subprocess.run(args, check=True, cwd=os.path.dirname(HERE))


def step_filters(steps: str, corpus: str, assets: str) -> dict:
    """The `filters` section of the benchmark's config for `--steps`."""
    filters: dict = {"c4": {"drop_lines_without_terminal_punct": False, "min_words_per_line": 0}}
    if steps == "base":
        filters["pii"] = {"enabled": False}
    if steps == "all":
        os.makedirs(assets, exist_ok=True)
        eval_set, model = os.path.join(assets, "eval_passages.jsonl"), os.path.join(assets, "quality.bin")
        if not os.path.exists(eval_set):
            write_eval_set(eval_set)
        if not os.path.exists(model):
            train_quality_model(corpus, model)
        filters["decontamination"] = {"eval_files": eval_set}
        filters["quality"] = {"model": model}
    return filters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default="/work/corpora/jsonl")
    parser.add_argument("--out", default="/tmp/prep-bench")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--keep-work", action="store_true", help="reuse stage outputs (measures a resumed run)")
    parser.add_argument("--steps", choices=("base", "default", "all"), default="default",
                        help="base: without PII redaction; all: with decontamination and a quality model too")
    parser.add_argument("--assets", default="/tmp/prep-bench-assets", help="the evaluation set and quality model")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results",
                                                         "dataprep_full_2core.json"),
                        help="write the figures here as JSON ('' : don't)")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from dataprep.config import parse_prep_config
    from dataprep.pipeline import run_prep

    paths = natural_sources(args.corpus)
    text_mb = sum(os.path.getsize(p) for p in paths) / 1e6
    if not args.keep_work:
        shutil.rmtree(args.out, ignore_errors=True)
    raw = {"name": "bench", "output": os.path.join(args.out, "shards"), "seq_len": 2048, "num_cpus": args.cpus,
           "filters": step_filters(args.steps, args.corpus, args.assets),
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
    figures = {"machine": f"{os.cpu_count()}-core CPU", "cpus": args.cpus, "steps": args.steps,
               "filters": raw["filters"], "removed": report["totals"]["removed"], "sources": len(paths),
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
