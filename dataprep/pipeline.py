"""`run_prep`: corpora → Arrow shards, as a chain of resumable stages on Ray Data.

    ingest (per file)   read, normalize, quality verdicts, text hash, MinHash band keys
    dedup   (shuffles)  exact duplicates, LSH buckets, connected components, removal lists per file
    select  (per file)  apply removals and verdicts; the conservation check reads these counts
    tokenizer           train a byte-level BPE on a sample of the mix, or load one
    encode  (per file)  train / validation split by document, token ids
    pack    (per file)  repeat per the mixture plan, pack rows of seq_len + 1 with EOS
    write               global row order, Arrow shards, tokenizer.json, manifest.json, report

Every stage's outputs sit under a key of its inputs and settings (`dataprep.executor`), so a rerun after a crash
redoes only what was not finished, and the same inputs and config give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dataprep.config import PrepConfig, config_to_dict
from dataprep.executor import (
    atomic_stage,
    connect_ray,
    parquet_files,
    run_tasks,
    stable_hash,
    stage_dir,
    user_error_in,
)
from dataprep.ingest import FileTask, ingest_file, merge_span_stats
from dataprep.keys import file_id
from dataprep.mix import plan_mixture, target_shares
from dataprep.readers import list_files
from dataprep.readers.base import detect_format, split_file
from dataprep.shards import MANIFEST_FILE, read_manifest, verify_shard, write_atomic
from dataprep.stats import PrepStats
from orchestrator.errors import DataError, PretrainError

FILE_INGEST_VERSION = 2


class ConservationError(PretrainError):
    """Documents in ≠ kept + removed: a bug, never bad input; the message lists the sources that do not add up."""


def run_prep(config: PrepConfig, address: str | None = None, stats: PrepStats | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run every stage not already done; returns the report (also written as report.json beside the shards)."""
    stats = stats or PrepStats()
    started_ray = connect_ray(address, config.num_cpus, progress)
    try:
        return _Prep(config, stats, progress).run()
    finally:
        if started_ray:
            import ray

            ray.shutdown()


class _Prep:
    def __init__(self, config: PrepConfig, stats: PrepStats, progress: bool):
        self.c, self.stats, self.progress = config, stats, progress
        self.work = config.work
        os.makedirs(self.work, exist_ok=True)

    def run(self) -> dict[str, Any]:
        import ray

        c = self.c
        self.partitions = c.dedup.shuffle_partitions or max(2, int(ray.cluster_resources().get("CPU", 1)))
        tasks = self._file_tasks()
        ingest_key = (FILE_INGEST_VERSION, _ingest_settings(c))
        ingest_dir = stage_dir(self.work, "ingest", ingest_key)
        spans = self._span_tasks(tasks)
        by_span = self._per_file("ingest", ingest_dir, [(name, p) for name, p, _ in spans],
                                 lambda p, d, cfg=c: ingest_file(_task_fields(p), d, cfg))
        of_file: dict[str, list[dict]] = {t["name"]: [] for t in tasks}
        for name, payload in sorted((n, p) for n, p, _ in spans):  # span names sort in file order
            of_file[payload["file"]].append(by_span[name])
        ingested = {name: merge_span_stats(stats, c.examples) for name, stats in of_file.items()}
        parts_by_task = {t["name"]: sorted(f for f in _files_with_prefix(ingest_dir, t["name"] + "-")) for t in tasks}
        all_parts = [p for t in tasks for p in parts_by_task[t["name"]]]

        dedup_dir = stage_dir(self.work, "dedup", ingest_key, sorted(parts_by_task), config_to_dict(c)["dedup"])
        dedup_stats = self._dedup(all_parts, dedup_dir)

        select_dir = stage_dir(self.work, "select", dedup_dir)
        select_tasks = [(t["name"], {"name": t["name"], "source": t["source"], "file_id": t["file_id"],
                                     "parts": parts_by_task[t["name"]],
                                     "removals_dir": dedup_dir if (c.dedup.exact or c.dedup.near) else ""})
                        for t in tasks]
        from dataprep.select import select_file

        selected = self._per_file("select", select_dir, select_tasks, select_file)
        conservation = self._check_conservation(ingested, selected)

        tokenizer_file, eos_id, vocab_size = self._tokenizer(select_dir, tasks, selected)
        encode_dir = stage_dir(self.work, "encode", select_dir, tokenizer_file, _file_digest(tokenizer_file),
                               c.mix.val_fraction, c.seed)
        from dataprep.tokenize.encode import encode_file

        encoded = self._per_file(
            "encode", encode_dir,
            [(t["name"], {"name": t["name"], "source": t["source"], "parts": _files_with_prefix(select_dir,
                                                                                              t["name"] + "-")})
             for t in tasks],
            lambda p, d, path=tokenizer_file, c=c: encode_file(p, d, path, c.mix.val_fraction, c.seed))
        train_tokens = {name: 0 for name in c.sources}
        for stat in encoded.values():
            train_tokens[stat["source"]] += stat["train_tokens"] + stat["train_docs"]  # + one EOS per document
        plans = plan_mixture(train_tokens, c.sources, c.mix)

        pack_dir = stage_dir(self.work, "pack", encode_dir, {n: round(p.epochs, 9) for n, p in plans.items()},
                             c.seq_len, c.seed, eos_id)
        from dataprep.tokenize.pack import pack_file

        packed = self._per_file(
            "pack", pack_dir,
            [(t["name"], {"name": t["name"], "source": t["source"], "file_id": t["file_id"],
                          "epochs": plans[t["source"]].epochs,
                          "parts": _files_with_prefix(encode_dir, t["name"] + "-")}) for t in tasks],
            lambda p, d, c=c, eos=eos_id: pack_file(p, d, c.seq_len, eos, c.seed))

        config_hash = self._config_hash(tasks)
        manifest = self._write_output(tasks, pack_dir, packed, plans, tokenizer_file, eos_id, vocab_size,
                                      config_hash)
        self.stats.enter("done")
        from dataprep.report import build_report, write_report

        report = build_report(self.c, ingested, selected, encoded, packed, dedup_stats, plans, manifest,
                              conservation, self.stats.snapshot()["stage_seconds"])
        write_report(report, self.c.output, print_table=self.progress)
        return report

    # ------------------------------------------------------------------------------------------ stages

    def _file_tasks(self) -> list[dict]:
        order = sorted(enumerate(self.c.sources.items()), key=lambda x: (x[1][1].priority, x[0]))
        tasks = []
        for rank, (_, (name, source)) in enumerate(order):
            files = list_files(source.path)
            if not files:
                raise DataError(f"sources.{name}.path: {source.path!r} holds no files")
            for index, path in enumerate(files):
                digest = _file_digest(path)
                tasks.append({"name": f"{name}-{index:05d}-{digest[:12]}", "source": name, "source_rank": rank,
                              "file_index": index, "path": path, "kind": source.kind,
                              "fmt": detect_format(path, source.format), "text_field": source.text_field,
                              "id_field": source.id_field, "digest": digest, "size": os.path.getsize(path),
                              "file_id": file_id(rank, index)})
        return tasks

    def _span_tasks(self, tasks: list[dict]) -> list[tuple[str, dict, int]]:
        """(name, payload, bytes) of every span of every file, largest first so that no big span starts last.

        Span names sort in file order, so the file's parts (`<file>-s<span>-<part>.parquet`) do too.
        """
        spans = []
        for t in tasks:
            cuts = split_file(t["path"], t["fmt"], t["text_field"], self.c.span_bytes)
            for k, (start, stop, first_index) in enumerate(cuts):
                name = f"{t['name']}-s{k:06d}"
                size = stop - start if t["fmt"] == "jsonl" and stop >= 0 else t["size"] // len(cuts)
                spans.append((name, {**t, "file": t["name"], "name": name, "start": start, "stop": stop,
                                     "first_index": first_index}, size))
        return sorted(spans, key=lambda s: -s[2])

    def _per_file(self, stage: str, directory: str, tasks: list[tuple[str, dict]], fn) -> dict[str, dict]:
        self.stats.enter(stage, len(tasks))

        def on_done(_: str, stat: dict) -> None:
            self.stats.add("tasks_done")
            for key in ("docs_in", "bytes_in"):
                if stage == "ingest" and key in stat:
                    self.stats.add(key, stat[key])
            if stage == "select":
                self.stats.add("docs_kept", stat["docs"])
                for reason, n in stat["removed"].items():
                    self.stats.add(f"removed_{reason}", n)
            if stage == "pack":
                for split in ("train", "val"):
                    self.stats.add(f"{split}_rows", stat[f"{split}_rows"])
                    self.stats.add(f"{split}_tokens", stat[f"{split}_tokens"])

        return run_tasks(directory, tasks, fn, on_done)

    def _dedup(self, parts: list[str], directory: str) -> dict:
        from dataprep.dedup.stage import run_dedup

        self.stats.enter("dedup")
        with atomic_stage(directory) as tmp:
            if tmp is not None:
                try:
                    result = run_dedup(parts, tmp, self.c.dedup, self.partitions)
                except Exception as e:
                    raise user_error_in(e) or e from None
                write_atomic(os.path.join(tmp, "stats.json"), json.dumps(result).encode())
        with open(os.path.join(directory, "stats.json"), encoding="utf-8") as f:
            return json.load(f)

    def _tokenizer(self, select_dir: str, tasks: list[dict], selected: dict[str, dict]) -> tuple[str, int, int]:
        from tokenizers import Tokenizer

        from dataprep.tokenize.tokenizer import load_tokenizer, train_tokenizer

        t = self.c.tokenizer
        self.stats.enter("tokenizer")
        key = [config_to_dict(self.c)["tokenizer"], {n: s.share for n, s in self.c.sources.items()},
               self.c.mix.temperature, self.c.seed]
        if t.type == "train":
            key.append(select_dir)
        else:
            key.append(_file_digest(t.path) if os.path.isfile(t.path) else sorted(os.listdir(t.path)))
        directory = stage_dir(self.work, "tokenizer", *key)
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.exists(path):
            if t.type == "train":
                tokenizer = train_tokenizer(self._tokenizer_sample(select_dir, tasks, selected), t)
            else:
                tokenizer = load_tokenizer(t)
            os.makedirs(directory, exist_ok=True)
            write_atomic(path, tokenizer.to_str().encode())
        tokenizer = Tokenizer.from_file(path)
        return path, tokenizer.token_to_id(t.eos), tokenizer.get_vocab_size()

    def _tokenizer_sample(self, select_dir: str, tasks: list[dict], selected: dict[str, dict]):
        """Kept documents sampled per source in proportion to the target shares (bytes stand in for tokens)."""
        from dataprep.tokenize.encode import unit_hash

        kept = {n: 0 for n in self.c.sources}
        for stat in selected.values():
            kept[stat["source"]] += stat["bytes"]
        shares = target_shares({n: b for n, b in kept.items() if b}, {n: s.share for n, s in self.c.sources.items()},
                                self.c.mix.temperature)
        rates = {n: min(1.0, shares.get(n, 0.0) * self.c.tokenizer.sample_bytes / b) if b else 0.0
                 for n, b in kept.items()}
        for task in tasks:
            for part in _files_with_prefix(select_dir, task["name"] + "-"):
                table = pq.read_table(part)
                keys = table.column("key").to_numpy()
                chosen = np.flatnonzero(unit_hash(keys, self.c.seed, salt=2) < rates[task["source"]])
                texts = table.column("text")
                for i in chosen:
                    yield texts[int(i)].as_py()

    def _check_conservation(self, ingested: dict[str, dict], selected: dict[str, dict]) -> dict:
        per_source: dict[str, dict[str, int]] = {n: {"in": 0, "kept": 0, "removed": 0} for n in self.c.sources}
        for stat in ingested.values():
            per_source[stat["source"]]["in"] += stat["docs_in"]
            per_source[stat["source"]]["removed"] += sum(stat["removed"].values())
        for stat in selected.values():
            per_source[stat["source"]]["kept"] += stat["docs"]
            per_source[stat["source"]]["removed"] += sum(stat["removed"].values())
        wrong = {n: v for n, v in per_source.items() if v["in"] != v["kept"] + v["removed"]}
        if wrong:
            detail = "; ".join(f"{n}: {v['in']} in, {v['kept']} kept + {v['removed']} removed"
                               for n, v in wrong.items())
            raise ConservationError(f"documents do not add up: {detail}")
        return {"ok": True, "sources": per_source}

    def _config_hash(self, tasks: list[dict]) -> str:
        fingerprints = [(t["source"], t["file_index"], os.path.basename(t["path"]), t["size"], t["digest"])
                        for t in tasks]
        resolved = config_to_dict(self.c)
        for key in ("output", "work_dir", "num_cpus", "span_bytes"):
            resolved.pop(key)
        for s in resolved["sources"].values():
            s.pop("path")
        return stable_hash(resolved, fingerprints)

    def _write_output(self, tasks: list[dict], pack_dir: str, packed: dict[str, dict], plans: dict,
                      tokenizer_file: str, eos_id: int, vocab_size: int, config_hash: str) -> dict:
        from dataprep.writers.assemble import finish_output, write_shards

        self.stats.enter("write")
        existing = _complete_manifest(self.c.output, config_hash)
        if existing is not None:
            return existing
        blocks = {split: [os.path.join(pack_dir, f"{t['name']}-{split}.npy") for t in tasks]
                  for split in ("train", "val")}
        total = sum(s["train_rows"] + s["val_rows"] for s in packed.values())
        bar = _progress_bar(self.progress, total, "write shards")
        splits = write_shards(self.c.output, blocks, self.c.seq_len, self.c.rows_per_shard, self.c.seed,
                              progress=bar.update if bar else None)
        if bar:
            bar.close()
        if not splits["val"]["rows"]:
            splits.pop("val")
        emitted = {n: 0 for n in self.c.sources}
        documents = {n: 0 for n in self.c.sources}
        for stat in packed.values():
            emitted[stat["source"]] += stat["train_tokens"]
            documents[stat["source"]] += stat["train_docs"]
        total_tokens = sum(emitted.values()) or 1
        sources = {n: {"documents": documents[n], "tokens": emitted[n], "target_share": round(p.target_share, 6),
                       "realised_share": round(emitted[n] / total_tokens, 6), "epochs": round(p.epochs, 6),
                       "available_tokens": p.tokens} for n, p in plans.items()}
        manifest = {"seq_len": self.c.seq_len, "config_hash": config_hash, "sources": sources, "splits": splits,
                    "tokenizer": {"file": "tokenizer.json", "vocab_size": vocab_size, "eos_id": eos_id}}
        finish_output(self.c.output, tokenizer_file, manifest)
        return read_manifest(self.c.output)


# ---------------------------------------------------------------------------------------------- helpers


def _ingest_settings(c: PrepConfig) -> dict:
    d = config_to_dict(c)
    return {"strict": c.strict, "invalid_utf8": c.invalid_utf8, "max_doc_bytes": c.max_doc_bytes,
            "part_bytes": c.part_bytes, "span_bytes": c.span_bytes, "examples": c.examples, "filters": d["filters"],
            "minhash": [c.dedup.ngram, c.dedup.bands, c.dedup.rows, c.dedup.seed],
            "sources": {n: {k: v for k, v in s.items() if k not in ("share", "path")} for n, s in d["sources"].items()},
            "priority_order": sorted(((s.priority, i) for i, s in enumerate(c.sources.values())))}


def _task_fields(payload: dict) -> dict:
    return {f: payload[f] for f in FileTask.__dataclass_fields__}


def _files_with_prefix(directory: str, prefix: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return [p for p in parquet_files(directory) if os.path.basename(p).startswith(prefix)]


def _file_digest(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _complete_manifest(output: str, config_hash: str) -> dict | None:
    """The existing manifest if it was written for this very config and its shards verify; else None."""
    if not os.path.exists(os.path.join(output, MANIFEST_FILE)):
        return None
    try:
        manifest = read_manifest(output)
        if manifest.get("config_hash") != config_hash:
            return None
        for split in manifest["splits"].values():
            for entry in split["shards"]:
                verify_shard(output, entry)
        return manifest
    except DataError:
        return None


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", leave=False)

