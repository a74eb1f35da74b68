"""Stage 1, one task per input file or span of one: read, normalize, filter, hash and sign every document.

Everything that needs a document's full text happens in this one pass, so the text is read and decoded once:
the exact-dedup hash and the MinHash band keys are taken from the normalized text, and the quality verdict is
computed now but applied after dedup (the order of the design: dedup, then filters). Edits (C4's line cleanup,
PII redaction, decontamination masks) change the text stored here, and their counts add up per file (`edits`).
Output parts are Parquet files of at most `part_bytes` of text holding one row per readable document; bad records
are only counted.
A large plain JSONL or Parquet file is read as several spans by separate tasks (`readers.split_file`); each span
numbers its records from the file's own record index, so keys, ids and reported lines do not depend on the split,
and `merge_span_stats` folds the spans' counters back into the file's.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dataprep.config import PrepConfig, config_to_dict
from dataprep.dedup.minhash import MinHasher
from dataprep.executor import file_digest, parts_of
from dataprep.filters.base import FILTER_BATCH_CHARS, apply_filters
from dataprep.filters.from_config import build_filters
from dataprep.keys import doc_key
from dataprep.normalize import normalize_text
from dataprep.readers import BadInput, read_records
from dataprep.readers.base import WHOLE_FILE, split_file
from dataprep.stages import FileStage, PrepRun, StageOutput

FILE_INGEST_VERSION = 3  # bump when a change to this stage changes its outputs for the same settings
MAX_BAD_LISTED = 20  # per file: the report names these, and counts the rest
EXAMPLE_CHARS = 240


@dataclass(frozen=True)
class FileTask:
    name: str  # unique per input file and content: names the task's outputs
    source: str
    source_rank: int  # position in (priority, declared order): lower survives dedup
    file_index: int
    path: str
    kind: str
    fmt: str
    text_field: str
    id_field: str
    start: int = WHOLE_FILE[0]  # the span of the file this task reads (see `readers.split_file`)
    stop: int = WHOLE_FILE[1]
    first_index: int = WHOLE_FILE[2]


class IngestStage(FileStage):
    """Read → normalize → quality verdicts, text hash and MinHash band keys, one task per span of a file.

    Its output holds each file's merged counters and, as `info`, each file's parts (the dedup stage's input).
    """

    name = "ingest"

    def key(self, prep: PrepRun) -> tuple:
        return FILE_INGEST_VERSION, ingest_settings(self.config)

    def tasks(self, prep: PrepRun) -> list[tuple[str, dict]]:
        """Every span of every file, largest first so that no big span starts last.

        Span names (`<file>-s<span>`) sort in file order, so the file's parts (`<file>-s<span>-<part>.parquet`) do
        too.
        """
        spans = []
        for t in prep.files:
            cuts = split_file(t["path"], t["fmt"], t["text_field"], self.config.span_bytes)
            for k, (start, stop, first_index) in enumerate(cuts):
                name = f"{t['name']}-s{k:06d}"
                size = stop - start if t["fmt"] == "jsonl" and stop >= 0 else t["size"] // len(cuts)
                spans.append((size, name, {**t, "file": t["name"], "name": name, "start": start, "stop": stop,
                                           "first_index": first_index}))
        return [(name, payload) for _, name, payload in sorted(spans, key=lambda s: -s[0])]

    def process(self, payload: dict, directory: str) -> dict:
        return ingest_file({f: payload[f] for f in FileTask.__dataclass_fields__}, directory, self.config)

    def run(self, prep: PrepRun) -> StageOutput:
        spans = super().run(prep)
        of_file: dict[str, list[dict]] = {t["name"]: [] for t in prep.files}
        for name in sorted(spans.results):
            of_file[name[: name.rindex("-s")]].append(spans.results[name])
        merged = {name: merge_span_stats(stats, self.config.examples) for name, stats in of_file.items()}
        parts = {t["name"]: parts_of(spans.directory, t["name"]) for t in prep.files}
        return StageOutput(spans.directory, merged, info=parts)


def ingest_settings(c: PrepConfig) -> dict:
    """The settings that change what ingest writes."""
    d = config_to_dict(c)
    return {"strict": c.strict, "invalid_utf8": c.invalid_utf8, "max_doc_bytes": c.max_doc_bytes,
            "part_bytes": c.part_bytes, "span_bytes": c.span_bytes, "examples": c.examples,
            "filters": {k: v for k, v in d["filters"].items() if k != "quality"},  # applied at select
            "minhash": [c.dedup.ngram, c.dedup.bands, c.dedup.rows, c.dedup.seed],
            "sources": {n: {k: v for k, v in s.items() if k not in ("share", "path")} for n, s in d["sources"].items()},
            "priority_order": sorted(((s.priority, i) for i, s in enumerate(c.sources.values()))),
            "eval_digests": [file_digest(p) for p in c.filters.decontamination.files]}


def part_schema(bands: int) -> pa.Schema:
    return pa.schema([
        ("key", pa.int64()), ("doc_id", pa.string()), ("text", pa.large_string()),
        ("hash", pa.binary(16)), ("reason", pa.string()), ("has_shingles", pa.bool_()),
        ("bands", pa.list_(pa.uint64(), bands)),
    ])


class _Collector:
    """Counts of one file: documents in, removed per reason, bad records with their line, examples."""

    def __init__(self, task: FileTask, examples: int):
        self.task, self.examples = task, examples
        self.stats: dict[str, Any] = {"source": task.source, "file": task.path, "docs_in": 0, "bytes_in": 0,
                                      "removed": {}, "bad": [], "bad_count": 0, "repaired_utf8": 0,
                                      "examples": {}, "parts": 0, "docs_out": 0, "edits": {}}

    def remove(self, reason: str, doc_id: str, text: str = "", line: int | None = None, detail: str = "") -> None:
        self.stats["removed"][reason] = self.stats["removed"].get(reason, 0) + 1
        shown = self.stats["examples"].setdefault(reason, [])
        if len(shown) < self.examples:
            shown.append({"doc_id": doc_id, "text": text[:EXAMPLE_CHARS], "detail": detail})
        if line is not None:
            self.stats["bad_count"] += 1
            if len(self.stats["bad"]) < MAX_BAD_LISTED:
                self.stats["bad"].append({"file": self.task.path, "line": line, "reason": reason, "detail": detail})


def ingest_file(payload: dict, directory: str, config: PrepConfig) -> dict:
    task = FileTask(**payload)
    out = _Collector(task, config.examples)
    hasher = MinHasher(config.dedup.ngram, config.dedup.bands, config.dedup.rows, config.dedup.seed)
    parts = _PartWriter(directory, task.name, out, hasher, build_filters(config.filters, task.kind), config)
    for record in read_records(task.path, task.fmt, task.text_field, task.id_field, config.max_doc_bytes,
                               config.invalid_utf8 == "repair", (task.start, task.stop, task.first_index)):
        if record.problem == "unreadable_file":
            _fail_or_count(config, out, record.problem, task.path, None, record.detail)
            continue
        out.stats["docs_in"] += 1
        if record.text is None:
            _fail_or_count(config, out, record.problem, record.doc_id, record.index + 1, record.detail)
            continue
        if record.repaired:
            out.stats["repaired_utf8"] += 1
            if config.strict:
                raise BadInput(f"{task.path}:{record.index + 1}: invalid UTF-8 (strict mode)")
        out.stats["bytes_in"] += len(record.text.encode("utf-8", "surrogatepass"))
        text = normalize_text(record.text)
        if not text:
            out.remove("empty", record.doc_id)
            continue
        parts.add(doc_key(task.source_rank, task.file_index, record.index), record.doc_id, text)
    parts.close()
    if out.stats["docs_in"] == 0 and not out.stats["removed"].get("unreadable_file"):
        _fail_or_count(config, out, "empty_file", task.path, None, "no documents")
    return out.stats


def merge_span_stats(spans: list[dict], examples: int) -> dict:
    """The counters of a whole file from those of its spans, in file order: what one task reading it would report."""
    merged = json.loads(json.dumps(spans[0]))
    for stat in spans[1:]:
        for key in ("docs_in", "bytes_in", "bad_count", "repaired_utf8", "parts", "docs_out"):
            merged[key] += stat[key]
        for counts in ("removed", "edits"):
            for name, n in stat[counts].items():
                merged[counts][name] = merged[counts].get(name, 0) + n
        for reason, shown in stat["examples"].items():
            merged["examples"].setdefault(reason, []).extend(shown)
        merged["bad"].extend(stat["bad"])
        if stat.get("bad_files"):
            merged.setdefault("bad_files", []).extend(stat["bad_files"])
    merged["bad"] = merged["bad"][:MAX_BAD_LISTED]
    merged["examples"] = {reason: shown[:examples] for reason, shown in merged["examples"].items()}
    return merged


def _fail_or_count(config: PrepConfig, out: _Collector, reason: str, doc_id: str, line: int | None,
                   detail: str) -> None:
    where = f"{out.task.path}:{line}" if line is not None else out.task.path
    if config.strict:
        raise BadInput(f"{where}: {reason.replace('_', ' ')}: {detail} (strict mode)")
    if reason in ("unreadable_file", "empty_file"):
        out.stats.setdefault("bad_files", []).append({"file": out.task.path, "reason": reason, "detail": detail})
        return
    out.remove(reason, doc_id, line=line, detail=detail)


class _PartWriter:
    """A task's output parts, written a batch at a time: every ~million characters of documents are hashed, signed
    and filtered, and go out as one row group of the open part, which is renamed into place once it holds
    `part_bytes` of text. A task holds one batch, whatever its file or `part_bytes`."""

    def __init__(self, directory: str, name: str, out: _Collector, hasher: MinHasher, chain: list,
                 config: PrepConfig):
        self.directory, self.name, self.out, self.hasher, self.chain = directory, name, out, hasher, chain
        self.part_bytes = config.part_bytes
        self.batch: list[tuple[int, str, str]] = []
        self.batch_chars = self.part_chars = 0
        self.writer: pq.ParquetWriter | None = None

    def add(self, key: int, doc_id: str, text: str) -> None:
        self.batch.append((key, doc_id, text))
        self.batch_chars += len(text)
        self.part_chars += len(text)
        if self.part_chars >= self.part_bytes:
            self.close()
        elif self.batch_chars >= FILTER_BATCH_CHARS:
            self._write_batch()

    def close(self) -> None:
        """Write what is batched and rename the open part into place."""
        self._write_batch()
        if self.writer is not None:
            self.writer.close()
            os.replace(self._tmp, self._path)
            self.out.stats["parts"] += 1
            self.writer, self.part_chars = None, 0

    @property
    def _path(self) -> str:
        return os.path.join(self.directory, f"{self.name}-{self.out.stats['parts']:04d}.parquet")

    @property
    def _tmp(self) -> str:
        return f"{self._path}.tmp-{os.getpid()}"

    def _write_batch(self) -> None:
        if not self.batch:
            return
        if self.writer is None:
            self.writer = pq.ParquetWriter(self._tmp, part_schema(self.hasher.bands), compression="zstd")
        self.writer.write_table(self._rows(self.batch))
        self.out.stats["docs_out"] += len(self.batch)
        self.batch, self.batch_chars = [], 0

    def _rows(self, batch: list[tuple[int, str, str]]) -> pa.Table:
        """The batch's rows: hash and MinHash band keys of the normalized text, quality verdict, edited text."""
        out, hasher = self.out, self.hasher
        keys = [k for k, _, _ in batch]
        ids = [i for _, i, _ in batch]
        texts = [t for _, _, t in batch]
        hashes = [hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in texts]
        sig, has = hasher.signatures(texts)
        bands = hasher.band_keys(sig)
        filtered, reasons, edits = apply_filters(self.chain, texts)
        for edit, n in edits.items():
            out.stats["edits"][edit] = out.stats["edits"].get(edit, 0) + n
        for doc_id, text, reason in zip(ids, texts, reasons, strict=True):
            if reason:
                shown = out.stats["examples"].setdefault(reason, [])
                if len(shown) < out.examples:
                    shown.append({"doc_id": doc_id, "text": text[:EXAMPLE_CHARS], "detail": ""})
        stored = [t if not r else "" for t, r in zip(filtered, reasons, strict=True)]
        return pa.table({
            "key": pa.array(keys, pa.int64()), "doc_id": pa.array(ids, pa.string()),
            "text": pa.array(stored, pa.large_string()), "hash": pa.array(hashes, pa.binary(16)),
            "reason": pa.array(reasons, pa.string()), "has_shingles": pa.array(has),
            "bands": pa.FixedSizeListArray.from_arrays(pa.array(bands.reshape(-1), pa.uint64()), hasher.bands),
        }, schema=part_schema(hasher.bands))
