"""What the fastText quality step adds to `pretrain prep`, measured against the steps every prose document already
goes through, in one process on the same texts (the machine's load cancels out of the ratios, not out of the times).

    python benchmarks/quality_cost.py [--results benchmarks/results/quality_cost.json] [--repeats 3]

Texts: every sample source of the repository (examples/corpus and tests/data/corpora), normalized as ingest does.
Model: trained here by `train_quality` at the command's defaults (dim 64, 262,144 buckets, word bigrams) on
wiki_vital_en + python_docs against fortunes + django_code. Timed, best of `--repeats`:
- the default prose filter chain (Gopher quality and repetition, C4, language id, PII), and MinHash signatures with
  band keys: the per-document work ingest does today;
- the fastText score of every document, whole and with `max_chars` 10,000;
- the quality stage's own I/O: writing the kept documents' (key, text) Parquet and reading it back, as its filter
  task does, plus the (key, score) side file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataprep.config import DedupConfig, FiltersConfig  # noqa: E402
from dataprep.dedup.minhash import MinHasher  # noqa: E402
from dataprep.filters.base import apply_filters  # noqa: E402
from dataprep.filters.from_config import build_filters  # noqa: E402
from dataprep.filters.quality_model import FastTextScorer  # noqa: E402
from dataprep.filters.quality_train import train_quality  # noqa: E402
from dataprep.normalize import normalize_text  # noqa: E402

CORPORA = (os.path.join(ROOT, "examples", "corpus"), os.path.join(ROOT, "tests", "data", "corpora"))


def sources() -> dict[str, str]:
    return {name.removesuffix(".jsonl.gz"): os.path.join(folder, name) for folder in CORPORA
            for name in sorted(os.listdir(folder)) if name.endswith(".jsonl.gz")}


def read_texts(path: str) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [t for t in (normalize_text(json.loads(line)["text"]) for line in f) if t]


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "quality_cost.json"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    paths = sources()
    texts = [t for path in paths.values() for t in read_texts(path)]
    megabytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "quality.bin")
        train_quality([(paths["wiki_vital_en"], "positive"), (paths["python_docs"], "positive"),
                       (paths["fortunes"], "negative"), (paths["django_code"], "negative")], model)
        chain = build_filters(FiltersConfig(), "prose")
        d = DedupConfig()
        hasher = MinHasher(d.ngram, d.bands, d.rows, d.seed)
        whole, prefix = FastTextScorer(model), FastTextScorer(model, max_chars=10_000)
        keys = np.arange(len(texts), dtype=np.int64)

        def stage_io() -> None:
            part, scores = os.path.join(tmp, "part.parquet"), os.path.join(tmp, "scores.parquet")
            pq.write_table(pa.table({"key": keys, "text": pa.array(texts, pa.large_string())}), part,
                           compression="zstd")
            pq.write_table(pa.table({"key": keys, "score": np.zeros(len(texts), np.float32)}), scores,
                           compression="zstd")
            pq.read_table(part)
            pq.read_table(scores)

        seconds = {
            "filter_chain": best(lambda: apply_filters(chain, texts), args.repeats),
            "minhash": best(lambda: hasher.band_keys(hasher.signatures(texts)[0]), args.repeats),
            "fasttext_whole": best(lambda: whole(texts), args.repeats),
            "fasttext_10000_chars": best(lambda: prefix(texts), args.repeats),
            "quality_stage_io": best(stage_io, args.repeats),
        }
    existing = seconds["filter_chain"] + seconds["minhash"]
    result = {"documents": len(texts), "megabytes": round(megabytes, 2), "load_average": os.getloadavg(),
              "seconds": {k: round(v, 4) for k, v in seconds.items()},
              "microseconds_per_document": {k: round(v / len(texts) * 1e6, 1) for k, v in seconds.items()},
              "share_of_filters_and_minhash": {k: round(v / existing, 4) for k, v in seconds.items()
                                               if k not in ("filter_chain", "minhash")}}
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
