"""Model-based quality filtering, the last step of selection (`filters.quality`): score every kept document of the
prose sources, find each source's cut, remove what falls below it.

    score   Ray Data actors (`PartScorer`) write the (key, score) of every select part to `quality-scores-<key>/`;
            these side Parquet files are the per-document scores, kept and removed documents alike
    cut     per source, the boundary of its best `keep_fraction`, found exactly in two streaming passes over the
            scores (a histogram of the scores' top order bits, then the documents of the one bin holding the
            boundary), so no shuffle, no sort of the corpus and nothing proportional to it in one process
    filter  one task per file keeps the documents scoring at least `threshold` and inside the cut

The cut orders documents by score and, among equal scores, by document key, so it keeps exactly
round(keep_fraction × documents) of a source whatever the number of workers, and the same inputs give the same
shards. Every step sits under a key of its inputs and settings: a rerun reuses the scores and, when only the
threshold or fraction changed, scores nothing again.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dataprep.config import PrepConfig, QualityConfig
from dataprep.executor import file_digest, parts_of, read_table, run_tasks, stage_dir, user_error_in, write_table_atomic
from dataprep.filters.from_config import scorer_keywords
from dataprep.stages import PrepRun, StageOutput

BELOW_THRESHOLD, OUTSIDE_FRACTION = "quality_threshold", "quality_fraction"
HISTOGRAM_WIDTH = {"fasttext": 0.05, "hf": 0.25}  # score units per histogram bin in the report
_HIGH_BITS = 16  # the first pass's histogram: 65,536 bins of the scores' order


def apply_quality(config: PrepConfig, prep: PrepRun, selected: StageOutput) -> StageOutput:
    """The select stage's output with the quality removals applied; its results per file are select's, with the
    documents kept, the removals per reason and the file's `quality` summary (scored, removed, score histogram)."""
    q = config.filters.quality
    parts = {t["name"]: parts_of(selected.directory, t["name"]) for t in prep.files}
    scored = [t for t in prep.files if config.sources[t["source"]].kind == "prose"]
    scored_names = {t["name"] for t in scored}
    scores_dir = stage_dir(prep.work, "quality-scores", selected.directory, scorer_keywords(q), model_digest(q))
    prep.stats.enter("quality", sum(len(parts[t["name"]]) for t in scored))
    score_parts([p for t in scored for p in parts[t["name"]]], scores_dir, q, prep)
    by_source: dict[str, list[str]] = {}
    for t in scored:
        by_source.setdefault(t["source"], []).extend(score_file(scores_dir, p) for p in parts[t["name"]])
    cuts = {source: source_cut(files, q.keep_fraction) for source, files in by_source.items()}
    directory = stage_dir(prep.work, "quality", scores_dir, q.threshold, q.keep_fraction)
    tasks = [(t["name"], {"name": t["name"], "source": t["source"], "parts": parts[t["name"]],
                          "scores": scores_dir if t["name"] in scored_names else "", "cut": cuts.get(t["source"])})
             for t in prep.files]
    width = HISTOGRAM_WIDTH[q.type]
    prep.stats.enter("quality_filter", len(tasks))

    def count(_: str, result: dict) -> None:
        prep.stats.add("tasks_done")
        for reason, n in result["quality"]["removed"].items():
            prep.stats.add(f"removed_{reason}", n)
            prep.stats.add("docs_kept", -n)

    results = run_tasks(directory, tasks, lambda payload, out: filter_file(payload, out, q.threshold, width), count)
    merged = {}
    for name, before in selected.results.items():
        after = results[name]
        removed = dict(before["removed"])
        for reason, n in after["quality"]["removed"].items():
            removed[reason] = removed.get(reason, 0) + n
        merged[name] = {**before, **{k: after[k] for k in ("docs_kept", "bytes_kept", "parts", "quality")},
                        "removed": removed}
    return StageOutput(directory, merged)


def model_digest(q: QualityConfig) -> str:
    """The model's content (a file, or every file of a model directory); a Hub name stands for itself."""
    if os.path.isfile(q.model):
        return file_digest(q.model)
    if not os.path.isdir(q.model):
        return q.model
    digest = hashlib.blake2b(digest_size=16)
    for root, _, files in sorted(os.walk(q.model)):
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(f"{os.path.relpath(path, q.model)}\0{file_digest(path)}\0".encode())
    return digest.hexdigest()


def score_file(scores_dir: str, part: str) -> str:
    return os.path.join(scores_dir, os.path.basename(part))


def scoring_resources(q: QualityConfig) -> tuple[int, dict]:
    """(actors, resources per actor): a GPU each for a Hugging Face model on a cluster with GPUs, else a CPU each,
    one per CPU by default (an actor reads its parts and writes their scores itself; nothing else runs then)."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if q.type == "hf" and gpus:
        return q.actors or gpus, {"num_gpus": 1}
    return q.actors or max(1, int(resources.get("CPU", 1))), {"num_cpus": 1}


def score_parts(parts: list[str], directory: str, q: QualityConfig, prep: PrepRun) -> None:
    """Score every part without a score file yet, through a fixed pool of Ray Data actors each holding the model;
    a run that fails midway leaves the finished parts' scores, and a rerun scores only the others."""
    import ray

    from dataprep.filters.quality_model import PartScorer

    os.makedirs(directory, exist_ok=True)
    pending = [p for p in parts if not os.path.exists(score_file(directory, p))]
    prep.stats.add("tasks_done", len(parts) - len(pending))
    if not pending:
        return
    actors, resources = scoring_resources(q)
    ds = ray.data.from_items([{"part": p} for p in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(PartScorer, fn_constructor_kwargs={"directory": directory, **scorer_keywords(q)},
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(actors, len(pending))), **resources)
    try:
        for row in ds.iter_rows():
            prep.stats.add("tasks_done")
            prep.stats.add("quality_scored", int(row["docs"]))
    except Exception as e:
        raise user_error_in(e) or e from None


def score_order(scores: np.ndarray) -> np.ndarray:
    """A uint32 per score that sorts as the float32 scores do (NaN lowest): the cut's histogram reads its top bits."""
    bits = np.nan_to_num(np.asarray(scores, np.float32), nan=-np.inf).view(np.uint32)
    return np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(1 << 31))


def _order_and_keys(path: str) -> tuple[np.ndarray, np.ndarray]:
    table = read_table(path)
    return score_order(table.column("score").to_numpy()), table.column("key").to_numpy()


def source_cut(files: list[str], keep_fraction: float) -> dict:
    """The best round(keep_fraction × documents) of a source's scored documents as the last one kept: documents
    rank by score, then by key (the earlier document first). `order` None keeps every document."""
    counts = np.zeros(1 << _HIGH_BITS, np.int64)
    for path in files:
        order, _ = _order_and_keys(path)
        counts += np.bincount(order >> np.uint32(32 - _HIGH_BITS), minlength=1 << _HIGH_BITS)
    total = int(counts.sum())
    keep = min(total, int(keep_fraction * total + 0.5))
    if keep == total:
        return {"documents": total, "keep": keep, "order": None, "key": None}
    if keep == 0:
        return {"documents": total, "keep": 0, "order": 1 << 32, "key": 0}
    from_top = np.cumsum(counts[::-1])
    position = int(np.searchsorted(from_top, keep))
    high = (1 << _HIGH_BITS) - 1 - position
    rank = keep - int(from_top[position] - counts[high])  # 1-based within the boundary bin
    orders, keys = [], []
    for path in files:
        order, key = _order_and_keys(path)
        inside = (order >> np.uint32(32 - _HIGH_BITS)) == high
        orders.append(order[inside].astype(np.int64))
        keys.append(key[inside])
    order, key = np.concatenate(orders), np.concatenate(keys)
    last = np.lexsort((key, -order))[rank - 1]
    return {"documents": total, "keep": keep, "order": int(order[last]), "key": int(key[last]),
            "score": float(order_score(int(order[last])))}


def order_score(order: int) -> np.float32:
    """The score of a `score_order` value."""
    bits = np.uint32(order & 0x7FFFFFFF if order >> 31 else ~np.uint32(order))
    return bits.view(np.float32)


def kept_by_cut(order: np.ndarray, keys: np.ndarray, cut: dict | None) -> np.ndarray:
    if cut is None or cut["order"] is None:
        return np.ones(len(order), bool)
    return (order > cut["order"]) | ((order == cut["order"]) & (keys <= cut["key"]))


def filter_file(payload: dict, directory: str, threshold: float, width: float) -> dict:
    """payload: {name, source, parts, scores (the scores' directory; empty: the file is not scored), cut}."""
    quality = {"scored": 0, "removed": {}, "histogram": {}, "cut": payload["cut"]}
    stats = {"source": payload["source"], "docs_kept": 0, "bytes_kept": 0, "parts": 0, "quality": quality}
    for i, part in enumerate(payload["parts"]):
        target = os.path.join(directory, f"{payload['name']}-{i:04d}.parquet")
        table = read_table(part, columns=["key", "text"])
        if not payload["scores"]:
            shutil.copyfile(part, target + ".tmp")
            os.replace(target + ".tmp", target)
        else:
            scores = read_table(score_file(payload["scores"], part))
            keys, score = table.column("key").to_numpy(), scores.column("score").to_numpy()
            if not np.array_equal(keys, scores.column("key").to_numpy()):
                raise RuntimeError(f"{part}: its scores are of other documents; delete {payload['scores']}")
            above = score >= np.float32(threshold)
            inside = kept_by_cut(score_order(score), keys, payload["cut"])
            for reason, removed in ((BELOW_THRESHOLD, ~above), (OUTSIDE_FRACTION, above & ~inside)):
                if removed.any():
                    quality["removed"][reason] = quality["removed"].get(reason, 0) + int(removed.sum())
            bins, counts = np.unique(np.floor(score[np.isfinite(score)] / width).astype(np.int64), return_counts=True)
            for b, c in zip(bins, counts, strict=True):
                quality["histogram"][str(b)] = quality["histogram"].get(str(b), 0) + int(c)
            quality["scored"] += len(score)
            table = table.filter(pa.array(above & inside))
            write_table_atomic(table, target)
        stats["docs_kept"] += table.num_rows
        stats["bytes_kept"] += int(pc.sum(pc.binary_length(pc.cast(table.column("text"), pa.large_binary()))).as_py()
                                   or 0)
        stats["parts"] += 1
    return stats
