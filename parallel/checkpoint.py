"""Checkpoints that a crash, a corrupt file or a new layout cannot break: the commit protocol, for any engine.

The directory's layout is `parallel.checkpoint_layout`'s. What is in `engine/` is the engine's own business
(`Engine.save` / `Engine.load`): this module knows no backend.

Saving: the engine stages its state (the only stall training sees, when `checkpoint.async_save`), then a writer
thread waits for the engine's files (`Engine.wait_saved`, which names them), writes the rank's RNG state, checksums
every file it wrote and drops a marker; rank 0's writer waits for every rank's marker, writes the manifest, renames
the directory, updates `latest` and applies retention. On object stores, where a directory cannot be renamed, the
files go straight to step_<N>/ and the manifest (uploaded last) is what makes it complete.

Finding one to resume from: the newest step_<N> whose manifest is present and whose files all match it wins; ranks
check a share of the files each and agree. Anything else is skipped with a log line naming the file, falling back to
the previous checkpoint; nothing is deleted. Reading it is `parallel.restore`'s, deciding how `parallel.resume`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from orchestrator.errors import CheckpointError
from orchestrator.spec import JobSpec
from parallel import checkpoint_layout as names
from parallel.callbacks import CheckpointStats
from parallel.engine import Engine
from parallel.hf_origin import keep_origin
from parallel.launch import barrier
from parallel.lora_base import record_base
from parallel.parallel_dims import ParallelDims
from parallel.storage import Storage, local_sha256

log = logging.getLogger(__name__)

_MARKER_POLL_S = 0.05
_COMMIT_TIMEOUT_S = 3600.0


@dataclass
class _SaveJob:
    step: int
    name: str
    write_dir: str
    local: str
    engine: Engine
    rng: dict[str, Any]
    loader_state: dict[str, Any] | None


class Checkpointer:
    """Saves and finds one rank's part of every checkpoint; all ranks construct one and call it together."""

    def __init__(self, spec: JobSpec, dims: ParallelDims, staging_dir: str | None = None):
        self.config = spec.checkpoint
        self.storage = Storage(self.config.dir)
        self.spec = spec
        self.layout = names.run_layout(spec, dims)
        self.rank, self.world_size = dims.rank, dims.world_size
        self._staging_root = staging_dir
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        self.last_write_seconds = 0.0
        if self.rank == 0:
            self.storage.makedirs()

    # ------------------------------------------------------------------------------------------ saving

    def save(self, step: int, engine: Engine, loader_state: dict[str, Any]) -> CheckpointStats:
        """Write checkpoint `step` (every rank calls this); returns how long training was stalled by it."""
        start = time.perf_counter()
        self.wait()  # at most one checkpoint in flight: bounds the host memory held by snapshots
        name = names.step_name(step)
        write_dir = name + names.PARTIAL_SUFFIX if self.storage.atomic_rename else name
        if self.rank == 0:
            unfinished = self.storage.is_dir(write_dir) and (write_dir != name or not self._is_complete(name))
            if unfinished:
                log.warning("removing the unfinished checkpoint %s left by an earlier run",
                            self.storage.path(write_dir))
                self.storage.delete_dir(write_dir)
            self.storage.makedirs(write_dir)
        barrier()
        local = self.storage.local_path(write_dir) or self.staging(name)
        engine.save(os.path.join(local, names.ENGINE_DIR))
        job = _SaveJob(step=step, name=name, write_dir=write_dir, local=local, engine=engine, rng=rng_state(),
                       loader_state=dict(loader_state) if self.rank == 0 else None)
        if self.config.async_save:
            self._writer = threading.Thread(target=self._write_in_background, args=(job,), name="checkpoint-writer",
                                            daemon=True)
            self._writer.start()
        else:
            self._write(job)
        stall = time.perf_counter() - start
        return CheckpointStats(step=step, path=self.storage.path(name), seconds=stall, rank=self.rank)

    def wait(self) -> None:
        """Block until the checkpoint being written in the background is committed (or re-raise its error)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._writer_error is not None:
            error, self._writer_error = self._writer_error, None
            raise error

    close = wait

    def staging(self, name: str) -> str:
        """A local directory of this process for `name`'s files, where the checkpoints are not on a local path."""
        root = self._staging_root or tempfile.gettempdir()
        path = os.path.join(root, f"pretrain-staging-{os.getpid()}", name)
        os.makedirs(path, exist_ok=True)
        return path

    def _write_in_background(self, job: _SaveJob) -> None:
        try:
            self._write(job)
        except BaseException as e:  # noqa: BLE001 - surfaced by the next save() or wait() on the training thread
            log.error("checkpoint %s failed: %s", job.name, e)
            self._writer_error = e

    def _write(self, job: _SaveJob) -> None:
        start = time.perf_counter()
        written = job.engine.wait_saved()
        rng_path = os.path.join(job.local, names.RNG_DIR, names.rank_file(self.rank, ".pt"))
        os.makedirs(os.path.dirname(rng_path), exist_ok=True)
        torch.save(job.rng, rng_path)
        written.append(rng_path)
        if self.rank == 0:
            written += self._write_rank0_files(job)
        files = {}
        for path in sorted(written):
            digest, size = local_sha256(path)
            files[os.path.relpath(path, job.local).replace(os.sep, "/")] = {"sha256": digest, "bytes": size}
        if self.storage.local_path() is None:
            for rel in files:
                self.storage.upload(os.path.join(job.local, rel), job.write_dir, rel)
            shutil.rmtree(job.local, ignore_errors=True)
        marker = json.dumps({"rank": self.rank, "files": files}).encode()
        self.storage.write_bytes(marker, job.write_dir, names.RANKS_DIR, names.rank_file(self.rank, ".json"))
        if self.rank == 0:
            self._commit(job)
        self.last_write_seconds = time.perf_counter() - start

    def _write_rank0_files(self, job: _SaveJob) -> list[str]:
        texts = {
            names.LOADER_FILE: json.dumps(job.loader_state, indent=2, sort_keys=True),
            names.LAYOUT_FILE: json.dumps({**self.layout, "step": job.step}, indent=2, sort_keys=True),
            names.SPEC_FILE: yaml.safe_dump(dataclasses.asdict(self.spec), sort_keys=False),
        }
        for file, text in texts.items():
            with open(os.path.join(job.local, file), "w", encoding="utf-8") as f:
                f.write(text + "\n")
        # A run started from a Hugging Face model carries its tokenizer and special tokens (parallel.hf_origin).
        kept = keep_origin(self.spec.checkpoint.init_from, job.local, self.storage.local_path())
        kept += record_base(self.spec, job.local)  # a LoRA run's adapters name the frozen model they adapt
        return [os.path.join(job.local, file) for file in texts] + kept

    def _commit(self, job: _SaveJob) -> None:
        files: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + _COMMIT_TIMEOUT_S
        for r in range(self.world_size):
            marker = names.rank_file(r, ".json")
            while not self.storage.exists(job.write_dir, names.RANKS_DIR, marker):
                if time.monotonic() > deadline:
                    raise CheckpointError(f"{self.storage.path(job.write_dir)}: rank {r} did not finish writing "
                                          f"within {_COMMIT_TIMEOUT_S:.0f} s; the checkpoint stays incomplete")
                time.sleep(_MARKER_POLL_S)
            source = f"{self.storage.path(job.write_dir)}/{names.RANKS_DIR}/{marker}"
            files.update(names.listed_files(self.storage.read_bytes(job.write_dir, names.RANKS_DIR, marker), source))
        manifest = {"step": job.step, "layout": self.layout, "files": files, "created": time.time()}
        self.storage.write_bytes(json.dumps(manifest, indent=1, sort_keys=True).encode(), job.write_dir,
                                 names.MANIFEST_FILE)
        if job.write_dir != job.name:
            if self.storage.is_dir(job.name):
                # a complete checkpoint of the same step that failed its checks when the run resumed before it
                kept = f"{job.name}.rejected-{int(time.time())}"
                log.warning("keeping the rejected %s as %s", self.storage.path(job.name), kept)
                self.storage.move(job.name, kept)
            self.storage.move(job.write_dir, job.name)
        self.storage.write_bytes((job.name + "\n").encode(), names.LATEST_FILE)
        log.info("checkpoint %s complete (%d files)", self.storage.path(job.name), len(files))
        self.apply_retention(job.step)

    def apply_retention(self, newest: int) -> None:
        """Keep the newest `keep_last` and every step that is a multiple of `keep_every`; delete the rest."""
        steps = self.list_steps()
        keep = set(steps[-self.config.keep_last:]) | {newest}
        if self.config.keep_every:
            keep |= {s for s in steps if s % self.config.keep_every == 0}
        for s in steps:
            if s not in keep:
                self.storage.delete_dir(names.step_name(s))
                if self.storage.is_dir(names.DERIVED_DIR, names.step_name(s)):
                    self.storage.delete_dir(names.DERIVED_DIR, names.step_name(s))

    # ------------------------------------------------------------------------------------------ finding

    def list_steps(self) -> list[int]:
        """Steps of the directories named step_<N> (complete or not), oldest first."""
        return sorted(s for n in self.storage.list_dir() if (s := names.step_of(n)) is not None)

    def _is_complete(self, name: str) -> bool:
        return self.storage.exists(name, names.MANIFEST_FILE)

    def verify(self, name: str, share: tuple[int, int] = (0, 1)) -> str | None:
        """Why checkpoint `name` cannot be used (naming the file), or None; checks every share[1]-th file."""
        where, manifest_file = self.storage.path(name), names.MANIFEST_FILE
        if not self._is_complete(name):
            return f"{where}: incomplete, it has no {manifest_file} (the run stopped while writing it)"
        try:
            files = names.listed_files(self.storage.read_bytes(name, manifest_file), f"{where}/{manifest_file}")
        except CheckpointError as e:
            return str(e)
        index, count = share
        for rel in sorted(files)[index::count]:
            if not self.storage.exists(name, rel):
                return f"{where}/{rel}: missing, listed in {manifest_file}"
            digest, size = self.storage.sha256(name, rel)
            if digest != files[rel]["sha256"] or size != files[rel]["bytes"]:
                return f"{where}/{rel}: sha256 {digest} ({size} bytes) does not match {manifest_file} " \
                       f"({files[rel]['sha256']}, {files[rel]['bytes']} bytes)"
        return None

    def verify_everywhere(self, name: str) -> list[str]:
        """Why checkpoint `name` cannot be used, as every rank found checking its share of the files; collective."""
        return [r for r in _all_gather(self.verify(name, (self.rank, self.world_size))) if r]

    def find_resumable(self) -> str | None:
        """Name of the newest checkpoint every rank agrees is complete and intact; None when there is none.

        Checkpoints found broken are skipped (logged with the file at fault) and left as they are. When
        checkpoints exist but none is usable, that is an error rather than a silent fresh start.
        """
        rejected = []
        for step in reversed(self.list_steps()):
            name = names.step_name(step)
            reasons = self.verify_everywhere(name)
            if not reasons:
                if rejected and self.rank == 0:
                    log.warning("resuming from the older %s", self.storage.path(name))
                return name
            if self.rank == 0:
                log.warning("skipping checkpoint %s: %s", name, reasons[0])
            rejected.append(reasons[0])
        if rejected:
            raise CheckpointError("no usable checkpoint in " + self.storage.uri + ":\n  " + "\n  ".join(rejected)
                                  + "\nmove them away to start from scratch, or set checkpoint.resume=false")
        return None

    # ------------------------------------------------------------------------------------------ derived state

    def make_once(self, name: str, product: str, what: str, make: Callable[[str], None]) -> str:
        """The local path of `product` in `name`'s cache beside the checkpoints, made by `make(path)` on rank 0 alone
        (on object stores each rank makes its own, in its staging) unless an earlier run made it; collective."""
        cache_local = self.storage.local_path(names.DERIVED_DIR, name) or self.staging(f"universal-{name}")
        target = os.path.join(cache_local, product)
        if (self.rank == 0 or not self.storage.is_local) and not os.path.exists(target):
            os.makedirs(cache_local, exist_ok=True)
            make(target)
        barrier()
        if not os.path.exists(target):
            raise CheckpointError(f"{target}: the {what} made by rank 0 is not visible here; checkpoint.dir must be "
                                  "shared by every node")
        return target


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _all_gather(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
