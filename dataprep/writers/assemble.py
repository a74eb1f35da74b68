"""Write the shard directory from the packed row blocks: a seeded global row order, shards, tokenizer, manifest.

Row blocks are memory-mapped and gathered one shard at a time, each shard mapping the blocks it reads and
unmapping them once gathered (a page stays in a process's resident set while mapped, so blocks mapped for the whole
write grew the driver by every page a shard had read), so memory holds one shard however large the dataset. The
manifest goes last: a directory with a manifest is complete. An output in an object store (`dataprep.filesystem`)
gets each shard written in the work directory first and uploaded whole once complete, so no reader ever sees part
of a shard, and a run killed before the manifest simply writes them again.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from dataprep import filesystem
from dataprep.config import config_to_dict
from dataprep.executor import stable_hash
from dataprep.shards import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    TOKENIZER_FILE,
    ShardWriter,
    read_manifest,
    verify_shard,
    write_manifest,
)
from dataprep.stages import PrepRun, Stage, StageOutput
from orchestrator.errors import DataError


class WriteStage(Stage):
    """The shard directory: rows in a seeded global order, Arrow shards, tokenizer.json, manifest.json last.

    A directory whose manifest was written for this very config and whose shards verify is kept as it is.
    `info` is the manifest.
    """

    name = "write"

    def run(self, prep: PrepRun) -> StageOutput:
        config_hash = self._config_hash(prep.files)
        prep.stats.enter(self.name)
        manifest = complete_manifest(self.config.output, config_hash)
        if manifest is None:
            manifest = self._write(prep, config_hash)
        return StageOutput(self.config.output, info=manifest)

    def _write(self, prep: PrepRun, config_hash: str) -> dict:
        c, packed, plans, tokenizer = self.config, prep["pack"].results, prep["mix"].info, prep["tokenizer"].info
        blocks = {split: [os.path.join(prep["pack"].directory, f"{t['name']}-{split}.npy") for t in prep.files]
                  for split in ("train", "val")}
        total = sum(s["train_rows"] + s["val_rows"] for s in packed.values())
        bar = _progress_bar(prep.progress, total, "write shards")
        splits = write_shards(c.output, blocks, c.seq_len, c.rows_per_shard, c.seed,
                              progress=bar.update if bar else None, staging=os.path.join(prep.work, "write-staging"))
        if bar:
            bar.close()
        if not splits["val"]["rows"]:
            splits.pop("val")
        emitted = {n: 0 for n in c.sources}
        documents = {n: 0 for n in c.sources}
        for stat in packed.values():
            emitted[stat["source"]] += stat["train_tokens"]
            documents[stat["source"]] += stat["train_docs"]
        total_tokens = sum(emitted.values()) or 1
        sources = {n: {"documents": documents[n], "tokens": emitted[n], "target_share": round(p.target_share, 6),
                       "realised_share": round(emitted[n] / total_tokens, 6), "epochs": round(p.epochs, 6),
                       "available_tokens": p.tokens} for n, p in plans.items()}
        manifest = {"seq_len": c.seq_len, "config_hash": config_hash, "sources": sources, "splits": splits,
                    "tokenizer": {"file": "tokenizer.json", "vocab_size": tokenizer["vocab_size"],
                                  "eos_id": tokenizer["eos_id"]}}
        finish_output(c.output, tokenizer["file"], manifest)
        return read_manifest(c.output)

    def _config_hash(self, files: list[dict]) -> str:
        """The config and the inputs' content, less what does not change the shards (paths, CPUs, span size)."""
        fingerprints = [(t["source"], t["file_index"], os.path.basename(t["path"]), t["size"], t["digest"])
                        for t in files]
        resolved = config_to_dict(self.config)
        for key in ("output", "work_dir", "num_cpus", "span_bytes"):
            resolved.pop(key)
        # Long-context packing is hashed only when set, so a prep from before those settings keeps its hash.
        if resolved["pack"] == "split":
            resolved.pop("pack")
        if not resolved["mix"]["long_doc_tokens"]:
            resolved["mix"].pop("long_doc_tokens")
        for s in resolved["sources"].values():
            s.pop("path")
            if s["long_doc_boost"] == 1:
                s.pop("long_doc_boost")
        return stable_hash(resolved, fingerprints)


def complete_manifest(output: str, config_hash: str) -> dict | None:
    """The existing manifest if it was written for this very config and its shards verify; else None."""
    if not filesystem.exists(filesystem.join(output, MANIFEST_FILE)):
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


def write_shards(output: str, blocks: dict[str, list[str]], seq_len: int, rows_per_shard: int, seed: int,
                 progress=None, staging: str = "") -> dict[str, dict]:
    """blocks: split → .npy row-block paths in a fixed order. Returns the manifest's `splits` section.

    An object-store `output` needs `staging`, a local directory where each shard is written before its upload."""
    filesystem.makedirs(output)
    # the old manifest would describe shards about to be replaced
    filesystem.remove(filesystem.join(output, MANIFEST_FILE))
    for name in filesystem.list_dir(output):
        if name.endswith(".arrow"):
            filesystem.remove(filesystem.join(output, name))
    local = staging if filesystem.is_remote(output) else output
    if local != output:
        shutil.rmtree(local, ignore_errors=True)  # a killed run's partial files
    splits = {}
    for split, paths in blocks.items():
        sizes = np.array([len(np.load(p, mmap_mode="r")) for p in paths], np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        order = np.random.default_rng([seed, 7 if split == "train" else 8]).permutation(int(starts[-1]))
        writer = ShardWriter(local, split, seq_len, rows_per_shard)
        for lo in range(0, len(order), rows_per_shard):
            writer.write(_gather(paths, starts, order[lo: lo + rows_per_shard], seq_len + 1))
            _publish(writer.entries, local, output)
            if progress:
                progress(min(rows_per_shard, len(order) - lo))
        entries = writer.close()
        _publish(entries, local, output)
        rows = int(starts[-1])
        splits[split] = {"rows": rows, "tokens": rows * seq_len, "shards": entries}
    return splits


def _publish(entries: list[dict], local: str, output: str) -> None:
    """Upload the shards written in the local directory `local` to `output` (when they differ), whole, and free
    their local space: the staging directory holds about one shard at a time."""
    if local == output:
        return
    for entry in entries:
        path = os.path.join(local, entry["file"])
        if os.path.exists(path):
            filesystem.upload(path, filesystem.join(output, entry["file"]))
            os.remove(path)


def _gather(paths: list[str], starts: np.ndarray, index: np.ndarray, width: int) -> np.ndarray:
    """The rows `index` of the blocks in `paths`, whose first rows are at `starts`; each block mapped only here."""
    out = np.empty((len(index), width), np.int32)
    block = np.searchsorted(starts, index, side="right") - 1
    for b in np.unique(block):
        mine = block == b
        local = index[mine] - starts[b]
        order = np.argsort(local)
        rows = np.load(paths[b], mmap_mode="r")[local[order]]
        target = np.flatnonzero(mine)[order]
        out[target] = rows
    return out


def finish_output(output: str, tokenizer_file: str, manifest: dict) -> None:
    filesystem.upload(tokenizer_file, filesystem.join(output, TOKENIZER_FILE))
    manifest = {"format_version": FORMAT_VERSION, **manifest}
    write_manifest(output, manifest)


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", leave=False)
