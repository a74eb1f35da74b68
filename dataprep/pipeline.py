"""`run_prep`: corpora → Arrow shards, as the chain of resumable stages that `prep_stages` lists, on Ray Data.

    ingest     (per span)   read, normalize; quality verdicts, text hash and MinHash band keys while the text is read
    dedup      (shuffles)   exact duplicates, LSH buckets, connected components, removal lists per file
    select     (per file)   apply exact dedup, near dedup, then the quality verdicts; documents in = kept + removed
    tokenizer               train a byte-level BPE on a sample of the mix, or load one
    encode     (per file)   train / validation split by document, token ids
    mix                     passes over each source, from its token count and the mixture settings
    pack       (per file)   repeat per the mixture plan, pack rows of seq_len + 1 with EOS
    write                   global row order, Arrow shards, tokenizer.json, manifest.json

then the report beside the shards. Every stage's outputs sit under a key of its inputs and settings
(`dataprep.stages`), so a rerun after a crash redoes only what was not finished, and the same inputs and config give
byte-identical shards.
"""

from __future__ import annotations

import os
from typing import Any

from dataprep import filesystem
from dataprep.config import PrepConfig
from dataprep.dedup.stage import DedupStage
from dataprep.executor import connect_ray, file_digest
from dataprep.ingest import IngestStage
from dataprep.keys import file_id
from dataprep.mix import MixStage
from dataprep.readers import list_files
from dataprep.readers.base import detect_format
from dataprep.report import build_report, write_report
from dataprep.select import SelectStage
from dataprep.stages import PrepRun, Stage
from dataprep.stats import PrepStats
from dataprep.tokenize.encode import EncodeStage
from dataprep.tokenize.pack import PackStage
from dataprep.tokenize.tokenizer import TokenizerStage
from dataprep.writers.assemble import WriteStage
from orchestrator.errors import DataError


def prep_stages(config: PrepConfig) -> list[Stage]:
    """The stages in data-flow order; each reads what the earlier ones left in the `PrepRun`."""
    return [IngestStage(config), DedupStage(config), SelectStage(config), TokenizerStage(config),
            EncodeStage(config), MixStage(config), PackStage(config), WriteStage(config)]


def run_prep(config: PrepConfig, address: str | None = None, stats: PrepStats | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run every stage not already done; returns the report (also written as report.json beside the shards)."""
    stats = stats or PrepStats()
    filesystem.check_writable(config.output)  # a refused credential or a missing bucket: now, not at the end
    started_ray = connect_ray(address, config.num_cpus, progress)
    try:
        import ray

        os.makedirs(config.work, exist_ok=True)
        partitions = config.dedup.shuffle_partitions or max(2, int(ray.cluster_resources().get("CPU", 1)))
        prep = PrepRun(config, stats, progress, file_tasks(config), partitions)
        for stage in prep_stages(config):
            prep.done[stage.name] = stage.run(prep)
        stats.enter("done")
        report = build_report(config, prep["ingest"].results, prep["select"].results, prep["encode"].results,
                              prep["pack"].results, prep["dedup"].info, prep["mix"].info, prep["write"].info,
                              prep["select"].info, stats.snapshot()["stage_seconds"])
        write_report(report, config.output, print_table=progress)
        return report
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def file_tasks(config: PrepConfig) -> list[dict]:
    """Every input file with its identity: sources in dedup-rank order (priority, then as declared), files in
    listing order; the name holds the content digest, so a changed file never reuses stale stage outputs."""
    order = sorted(enumerate(config.sources.items()), key=lambda x: (x[1][1].priority, x[0]))
    tasks = []
    for rank, (_, (name, source)) in enumerate(order):
        files = list_files(source.path)
        if not files:
            raise DataError(f"sources.{name}.path: {source.path!r} holds no files")
        for index, path in enumerate(files):
            digest = file_digest(path)
            tasks.append({"name": f"{name}-{index:05d}-{digest[:12]}", "source": name, "source_rank": rank,
                          "file_index": index, "path": path, "kind": source.kind,
                          "fmt": detect_format(path, source.format), "text_field": source.text_field,
                          "id_field": source.id_field, "digest": digest, "size": filesystem.size(path),
                          "file_id": file_id(rank, index)})
    return tasks
