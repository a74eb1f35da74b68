"""Stage 3, one task per input file: apply dedup removals and quality verdicts, keep the survivors' text; then,
with `filters.quality` set, the quality model's cut (`dataprep.quality`).

This is where every readable document gets its final fate, in the design's precedence: exact duplicate, then
near duplicate, then the first quality rule it failed; so the per-reason counts add up with the kept documents
to the documents read, which `SelectStage` checks for every source.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dataprep.dedup.stage import EXACT, NEAR, removal_file
from dataprep.executor import read_table, write_table_atomic
from dataprep.quality import apply_quality
from dataprep.stages import FileStage, PrepRun, StageOutput
from orchestrator.errors import PretrainError

DUP_REASONS = {EXACT: "exact_duplicate", NEAR: "near_duplicate"}


class ConservationError(PretrainError):
    """Documents in ≠ kept + removed: a bug, never bad input; the message lists the sources that do not add up."""


class SelectStage(FileStage):
    """Exact duplicates, near duplicates and quality verdicts applied, in that precedence; `info` is the check
    that every source's documents add up."""

    name = "select"

    def key(self, prep: PrepRun) -> tuple:
        return (prep["dedup"].directory,)

    def tasks(self, prep: PrepRun) -> list[tuple[str, dict]]:
        dedup = self.config.dedup.exact or self.config.dedup.near
        return [(t["name"], {"name": t["name"], "source": t["source"], "file_id": t["file_id"],
                             "parts": prep["ingest"].info[t["name"]],
                             "removals_dir": prep["dedup"].directory if dedup else ""}) for t in prep.files]

    def process(self, payload: dict, directory: str) -> dict:
        return select_file(payload, directory)

    def run(self, prep: PrepRun) -> StageOutput:
        out = super().run(prep)
        if self.config.filters.quality.enabled:
            out = apply_quality(self.config, prep, out)
        out.info = check_conservation(prep["ingest"].results, out.results, list(self.config.sources))
        return out


def check_conservation(ingested: dict[str, dict], selected: dict[str, dict], sources: list[str]) -> dict:
    """Per source: documents in = kept + removed (at ingest or here); raises `ConservationError` otherwise."""
    per_source: dict[str, dict[str, int]] = {n: {"in": 0, "kept": 0, "removed": 0} for n in sources}
    for stat in ingested.values():
        per_source[stat["source"]]["in"] += stat["docs_in"]
        per_source[stat["source"]]["removed"] += sum(stat["removed"].values())
    for stat in selected.values():
        per_source[stat["source"]]["kept"] += stat["docs_kept"]
        per_source[stat["source"]]["removed"] += sum(stat["removed"].values())
    wrong = {n: v for n, v in per_source.items() if v["in"] != v["kept"] + v["removed"]}
    if wrong:
        detail = "; ".join(f"{n}: {v['in']} in, {v['kept']} kept + {v['removed']} removed" for n, v in wrong.items())
        raise ConservationError(f"documents do not add up: {detail}")
    return {"ok": True, "sources": per_source}


def select_file(payload: dict, directory: str) -> dict:
    """payload: {name, source, file_id, parts: [...], removals_dir}."""
    removed_path = removal_file(payload["removals_dir"], payload["file_id"]) if payload["removals_dir"] else ""
    removed_keys = np.zeros(0, np.int64)
    removed_codes = np.zeros(0, np.int8)
    if removed_path and os.path.exists(removed_path):
        table = read_table(removed_path)
        removed_keys, removed_codes = table.column("key").to_numpy(), table.column("code").to_numpy()
    stats = {"source": payload["source"], "docs_kept": 0, "bytes_kept": 0, "removed": {}, "parts": 0}
    for i, part in enumerate(payload["parts"]):
        table = read_table(part, columns=["key", "doc_id", "text", "reason"])
        keys = table.column("key").to_numpy()
        reasons = np.array(table.column("reason").to_pylist(), dtype=object)
        where = np.searchsorted(removed_keys, keys)
        hit = (where < len(removed_keys)) & (removed_keys[np.minimum(where, max(len(removed_keys) - 1, 0))] == keys) \
            if len(removed_keys) else np.zeros(len(keys), bool)
        for code, name in DUP_REASONS.items():
            reasons[hit & (removed_codes[np.minimum(where, max(len(removed_codes) - 1, 0))] == code)
                    if len(removed_keys) else np.zeros(len(keys), bool)] = name
        for reason, count in zip(*np.unique(reasons[reasons != ""].astype(str), return_counts=True), strict=True):
            stats["removed"][str(reason)] = stats["removed"].get(str(reason), 0) + int(count)
        kept = table.filter(pa.array(reasons == "")).select(["key", "text"])
        stats["docs_kept"] += kept.num_rows
        text_bytes = pc.binary_length(pc.cast(kept.column("text"), pa.large_binary()))
        stats["bytes_kept"] += int(pc.sum(text_bytes).as_py() or 0)
        write_table_atomic(kept, os.path.join(directory, f"{payload['name']}-{i:04d}.parquet"))
        stats["parts"] += 1
    return stats
