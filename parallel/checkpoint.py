"""Checkpoints that a crash, a corrupt file or a new layout cannot break.

    <checkpoint.dir>/
      step_<N>/                  one complete checkpoint
        engine/                  DeepSpeed's own files (save_checkpoint tag "engine"), convertible to universal
        rng/rank_<r>.pt          python, numpy, torch and cuda RNG states of every rank
        loader.json              the loader's rank-independent position
        spec.yaml                the resolved job spec
        layout.json              dp, pp, tp, ZeRO stage and world size it was written with
        ranks/rank_<r>.json      what each rank wrote, with checksums (assembled into the manifest)
        manifest.json            step, layout and the sha256 of every file; written last
      step_<N>.partial/          a checkpoint being written (renamed to step_<N> when complete)
      latest                     name of the newest complete checkpoint, updated after the rename

Saving: every rank snapshots its state into host memory (the only stall training sees), then a writer thread
writes the files, checksums them and drops a marker; rank 0's writer waits for every rank's marker, writes the
manifest, renames the directory, updates `latest` and applies retention. On object stores, where a directory cannot
be renamed, the files go straight to step_<N>/ and the manifest (uploaded last) is what makes it complete.

Resuming: the newest step_<N> whose manifest is present and whose files all match it wins; ranks check a share of
the files each and agree. Anything else is skipped with a log line naming the file, falling back to the previous
checkpoint; nothing is deleted. When the saved layout differs from the running one, the engine state goes through
DeepSpeed's universal checkpoint conversion first (rank 0 converts into a cache beside the checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
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
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from orchestrator.errors import CheckpointError
from orchestrator.spec import JobSpec
from parallel.callbacks import CheckpointStats
from parallel.launch import barrier
from parallel.optim import set_schedule_step
from parallel.parallel_dims import ParallelDims
from parallel.storage import Storage, local_sha256

log = logging.getLogger(__name__)

ENGINE_TAG = "engine"
MANIFEST = "manifest.json"
LATEST = "latest"
UNIVERSAL_CACHE = ".universal"
_STEP = re.compile(r"^step_(\d+)$")
_ROW_PARALLEL = re.compile(r"(^|\.)(o_proj|down_proj)\.weight$")
_MARKER_POLL_S = 0.05
_COMMIT_TIMEOUT_S = 3600.0


def step_name(step: int) -> str:
    return f"step_{step}"


@dataclass
class Resumed:
    """What a resume restored: the step to continue after, the loader position, where it came from."""

    step: int
    loader_state: dict[str, Any]
    path: str
    converted: bool


# ---------------------------------------------------------------------------------------------- host snapshots


def snapshot_to_host(obj: Any) -> Any:
    """A copy of `obj` whose tensors live in fresh host memory, so training may change the originals at once."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, snapshot_to_host(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(snapshot_to_host(v) for v in obj)
    return obj


class RecordingEngine(CheckpointEngine):
    """DeepSpeed checkpoint engine that records which files this rank writes, and can defer writing them.

    DeepSpeed calls `save` for each of its files inside `save_checkpoint`. Deferred, `save` keeps only a host copy,
    so `save_checkpoint` returns after the copy and `drain()` hands the (path, state) pairs to a writer thread;
    otherwise it writes at once and keeps (path, None). Either way the paths say which files are this rank's.
    """

    def __init__(self, defer: bool):
        super().__init__()
        self.name = "RecordingEngine"
        self.defer = defer
        self.pending: list[tuple[str, Any]] = []

    def create(self, info) -> None:
        self.pending = []

    def save(self, state_dict, path: str) -> None:
        if self.defer:
            self.pending.append((path, snapshot_to_host(state_dict)))
        else:
            torch.save(state_dict, path)
            self.pending.append((path, None))

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info) -> bool:
        return True

    def preserves_storage_sharing(self) -> bool:
        # the host copy already gives every tensor its own storage; DeepSpeed's extra clone would copy twice
        return not self.defer

    def drain(self) -> list[tuple[str, Any]]:
        pending, self.pending = self.pending, []
        return pending


# ---------------------------------------------------------------------------------------------- RNG and layout


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def universal_checkpoint_info(module: torch.nn.Module) -> dict[str, Any]:
    """How `ds_to_universal` merges tensor-parallel slices and how a later run re-splits them, for any tp.

    A sharded weight carries `partition_dim` (0: split by output rows, 1: by input columns). A checkpoint written
    at tp=1 has no sharded weights, yet a resume at tp>1 must split the row-parallel ones (o_proj, down_proj in the
    model's Hugging Face names) along dim 1, so those are recognised by name too; vectors (norms) are replicated.
    Layer numbers become a wildcard so one pattern covers a parameter of every block.
    """
    replicated, by_columns = set(), set()
    for name, param in module.named_parameters():
        pattern = re.sub(r"(^|\\\.)\d+(?=\\\.)", r"\1\\d+", re.escape(name)) + "$"
        dim = getattr(param, "partition_dim", None)
        if dim is None and _ROW_PARALLEL.search(name):
            dim = 1
        if dim is None and param.dim() == 1:
            replicated.add(pattern)
        elif dim == 1:
            by_columns.add(pattern)
    return {
        "universal_checkpoint_version": 0.2,
        "tp_replicated_parameter_patterns": sorted(replicated),
        "parameter_with_row_parallelism_patterns": sorted(by_columns),
    }


# ---------------------------------------------------------------------------------------------- the manager


class Checkpointer:
    """Saves and resumes one rank's part of every checkpoint; all ranks construct one and call it together.

    `engine` is a `parallel.engine.Engine` of the DeepSpeed backend (its DeepSpeed engine is `engine.ds`) or a
    DeepSpeed engine itself. A resume whose saved layout (dp, pp, tp, ZeRO stage) differs from `dims` converts the
    engine state first. Ranks agree through torch.distributed when it is initialised.
    """

    def __init__(self, spec: JobSpec, dims: ParallelDims, staging_dir: str | None = None):
        self.config = spec.checkpoint
        self.storage = Storage(self.config.dir)
        self.spec = spec
        self.deepspeed = spec.parallel.backend == "deepspeed"
        self.layout = {"backend": spec.parallel.backend, "dp": dims.dp, "pp": dims.pp, "tp": dims.tp,
                       "zero_stage": spec.parallel.zero_stage,
                       "world_size": dims.world_size}
        self.rank, self.world_size = dims.rank, dims.world_size
        self._staging_root = staging_dir
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        self.last_write_seconds = 0.0
        if self.rank == 0:
            self.storage.makedirs()

    # ------------------------------------------------------------------------------------------ saving

    def save(self, step: int, engine: Any, loader_state: dict[str, Any]) -> CheckpointStats:
        """Write checkpoint `step` (every rank calls this); returns how long training was stalled by it."""
        start = time.perf_counter()
        self.wait()  # at most one checkpoint in flight: bounds the host memory held by snapshots
        name = step_name(step)
        write_dir = f"{name}.partial" if self.storage.atomic_rename else name
        if self.rank == 0:
            unfinished = self.storage.is_dir(write_dir) and (write_dir != name or not self._is_complete(name))
            if unfinished:
                log.warning("removing the unfinished checkpoint %s left by an earlier run",
                            self.storage.path(write_dir))
                self.storage.delete_dir(write_dir)
            self.storage.makedirs(write_dir)
        barrier()
        local = self.storage.local_path(write_dir) or self._staging(name)
        asynchronous = self.config.async_save
        if self.deepspeed:
            pending = self._save_deepspeed(engine, local, defer=asynchronous)
        else:
            # The native engine stages its shards in host memory and writes them in the background itself (DCP);
            # the writer below joins that write before it checksums the files.
            engine.save(os.path.join(local, ENGINE_TAG), client_state={})
            pending = []
        job = _SaveJob(step=step, name=name, write_dir=write_dir, local=local, pending=pending,
                       rng=rng_state(), loader_state=dict(loader_state) if self.rank == 0 else None,
                       engine=None if self.deepspeed else engine)
        if asynchronous:
            self._writer = threading.Thread(target=self._write_in_background, args=(job,), name="checkpoint-writer",
                                            daemon=True)
            self._writer.start()
        else:
            self._write(job)
        stall = time.perf_counter() - start
        return CheckpointStats(step=step, path=self.storage.path(name), seconds=stall, rank=self.rank)

    @staticmethod
    def _save_deepspeed(engine: Any, local: str, defer: bool) -> list[tuple[str, Any]]:
        """DeepSpeed's save with its file writes captured (as host snapshots when `defer`), for the writer thread."""
        recorder = RecordingEngine(defer=defer)
        ds = _deepspeed(engine)
        original, ds.checkpoint_engine = ds.checkpoint_engine, recorder
        try:
            ds.save_checkpoint(local, tag=ENGINE_TAG, save_latest=False,
                               client_state={"universal_checkpoint_info": universal_checkpoint_info(ds.module)})
        finally:
            ds.checkpoint_engine = original
        return recorder.drain()

    def wait(self) -> None:
        """Block until the checkpoint being written in the background is committed (or re-raise its error)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._writer_error is not None:
            error, self._writer_error = self._writer_error, None
            raise error

    close = wait

    def _staging(self, name: str) -> str:
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
        if job.engine is not None:
            job.engine.wait_saved()
        for path, state in job.pending:
            if state is not None:
                torch.save(state, path)
        job.pending = []
        rng_path = os.path.join(job.local, "rng", f"rank_{self.rank:05d}.pt")
        os.makedirs(os.path.dirname(rng_path), exist_ok=True)
        torch.save(job.rng, rng_path)
        if self.rank == 0:
            self._write_rank0_files(job)
        files = self._files_written(job)
        if self.storage.local_path() is None:
            for rel in files:
                self.storage.upload(os.path.join(job.local, rel), job.write_dir, rel)
            shutil.rmtree(job.local, ignore_errors=True)
        marker = json.dumps({"rank": self.rank, "files": files}).encode()
        self.storage.write_bytes(marker, job.write_dir, "ranks", f"rank_{self.rank:05d}.json")
        if self.rank == 0:
            self._commit(job)
        self.last_write_seconds = time.perf_counter() - start

    def _write_rank0_files(self, job: _SaveJob) -> None:
        texts = {
            "loader.json": json.dumps(job.loader_state, indent=2, sort_keys=True),
            "layout.json": json.dumps({**self.layout, "step": job.step}, indent=2, sort_keys=True),
            "spec.yaml": yaml.safe_dump(dataclasses.asdict(self.spec), sort_keys=False),
        }
        for file, text in texts.items():
            with open(os.path.join(job.local, file), "w", encoding="utf-8") as f:
                f.write(text + "\n")

    def _files_written(self, job: _SaveJob) -> dict[str, dict[str, Any]]:
        """Checksums of the files this rank wrote; rank 0 also answers for the shared ones DeepSpeed copies in."""
        mine = {os.path.relpath(p, job.local) for p in job.saved_paths} | {f"rng/rank_{self.rank:05d}.pt"}
        if self.rank == 0:
            for root, _, names in os.walk(job.local):
                for n in names:
                    rel = os.path.relpath(os.path.join(root, n), job.local)
                    by_engine_rank = self.deepspeed and _written_by_engine_rank(rel)
                    if not rel.startswith(("ranks", "rng")) and not by_engine_rank:
                        mine.add(rel)
        out = {}
        for rel in sorted(mine):
            digest, size = local_sha256(os.path.join(job.local, rel))
            out[rel.replace(os.sep, "/")] = {"sha256": digest, "bytes": size}
        return out

    def _commit(self, job: _SaveJob) -> None:
        files: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + _COMMIT_TIMEOUT_S
        for r in range(self.world_size):
            marker = f"rank_{r:05d}.json"
            while not self.storage.exists(job.write_dir, "ranks", marker):
                if time.monotonic() > deadline:
                    raise CheckpointError(f"{self.storage.path(job.write_dir)}: rank {r} did not finish writing "
                                          f"within {_COMMIT_TIMEOUT_S:.0f} s; the checkpoint stays incomplete")
                time.sleep(_MARKER_POLL_S)
            files.update(json.loads(self.storage.read_bytes(job.write_dir, "ranks", marker))["files"])
        manifest = {"step": job.step, "layout": self.layout, "files": files, "created": time.time()}
        self.storage.write_bytes(json.dumps(manifest, indent=1, sort_keys=True).encode(), job.write_dir, MANIFEST)
        if job.write_dir != job.name:
            if self.storage.is_dir(job.name):
                # a complete checkpoint of the same step that failed its checks when the run resumed before it
                kept = f"{job.name}.rejected-{int(time.time())}"
                log.warning("keeping the rejected %s as %s", self.storage.path(job.name), kept)
                self.storage.move(job.name, kept)
            self.storage.move(job.write_dir, job.name)
        self.storage.write_bytes((job.name + "\n").encode(), LATEST)
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
                self.storage.delete_dir(step_name(s))
                if self.storage.is_dir(UNIVERSAL_CACHE, step_name(s)):
                    self.storage.delete_dir(UNIVERSAL_CACHE, step_name(s))

    # ------------------------------------------------------------------------------------------ finding

    def list_steps(self) -> list[int]:
        """Steps of the directories named step_<N> (complete or not), oldest first."""
        return sorted(int(m.group(1)) for n in self.storage.list_dir() if (m := _STEP.match(n)))

    def _is_complete(self, name: str) -> bool:
        return self.storage.exists(name, MANIFEST)

    def verify(self, name: str, share: tuple[int, int] = (0, 1)) -> str | None:
        """Why checkpoint `name` cannot be used (naming the file), or None; checks every share[1]-th file."""
        where = self.storage.path(name)
        if not self._is_complete(name):
            return f"{where}: incomplete, it has no {MANIFEST} (the run stopped while writing it)"
        try:
            manifest = json.loads(self.storage.read_bytes(name, MANIFEST))
            files = manifest["files"]
        except (ValueError, KeyError, TypeError) as e:
            return f"{where}/{MANIFEST}: unreadable: {e}"
        index, count = share
        for rel in sorted(files)[index::count]:
            if not self.storage.exists(name, rel):
                return f"{where}/{rel}: missing, listed in {MANIFEST}"
            digest, size = self.storage.sha256(name, rel)
            if digest != files[rel]["sha256"] or size != files[rel]["bytes"]:
                return f"{where}/{rel}: sha256 {digest} ({size} bytes) does not match {MANIFEST} " \
                       f"({files[rel]['sha256']}, {files[rel]['bytes']} bytes)"
        return None

    def find_resumable(self) -> str | None:
        """Name of the newest checkpoint every rank agrees is complete and intact; None when there is none.

        Checkpoints found broken are skipped (logged with the file at fault) and left as they are. When
        checkpoints exist but none is usable, that is an error rather than a silent fresh start.
        """
        rejected = []
        for step in reversed(self.list_steps()):
            name = step_name(step)
            reasons = [r for r in _all_gather(self.verify(name, (self.rank, self.world_size))) if r]
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

    # ------------------------------------------------------------------------------------------ resuming

    def resume(self, engine: Any) -> Resumed | None:
        """Restore engine, RNG and loader position from the newest good checkpoint, if resuming is on."""
        if not self.config.resume:
            return None
        name = self.find_resumable()
        return None if name is None else self.restore(engine, name)

    def restore(self, engine: Any, name: str) -> Resumed:
        """Restore engine, RNG and loader position from checkpoint `name` (a step_<N> under checkpoint.dir)."""
        local = self.storage.local_path(name) or self._download(name)
        check_same_model(os.path.join(local, "spec.yaml"), self.spec)
        saved = json.loads(_read_text(os.path.join(local, "layout.json")))
        saved.setdefault("backend", "deepspeed")  # written before there was a choice
        keys = ("backend", "dp", "pp", "tp", "zero_stage")
        converted = any(saved.get(k) != self.layout.get(k) for k in keys)
        if saved["backend"] != self.layout["backend"]:
            self._restore_across_backends(engine, name, local, saved["backend"], saved["step"])
        elif not self.deepspeed:
            # DCP reshards on load: a native checkpoint of any layout loads as it is.
            engine.load(os.path.join(local, ENGINE_TAG))
        elif converted:
            if self.rank == 0:
                log.warning("checkpoint %s was written with %s, this run has %s: converting it to a universal "
                            "checkpoint", name, {k: saved.get(k) for k in keys}, {k: self.layout[k] for k in keys})
            self._load_engine(engine, self._universal(name, local), universal=True)
        else:
            self._load_engine(engine, local, universal=False)
        rng_file = os.path.join(local, "rng", f"rank_{self.rank:05d}.pt")
        if os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        loader_state = json.loads(_read_text(os.path.join(local, "loader.json")))
        if self.rank == 0:
            log.info("resumed from %s (step %d)", self.storage.path(name), saved["step"])
        return Resumed(step=saved["step"], loader_state=loader_state, path=self.storage.path(name),
                       converted=converted)

    def _download(self, name: str) -> str:
        target = self._staging(f"resume-{name}")
        self.storage.download(target, name)
        return target

    def _made_once(self, name: str, product: str, what: str, make: Callable[[str], None]) -> str:
        """The local path of `product` in `name`'s cache beside the checkpoints, made by `make(path)` on rank 0 alone
        (on object stores each rank makes its own, in its staging) unless an earlier run made it."""
        cache_local = self.storage.local_path(UNIVERSAL_CACHE, name) or self._staging(f"universal-{name}")
        target = os.path.join(cache_local, product)
        if (self.rank == 0 or not self.storage.is_local) and not os.path.exists(target):
            os.makedirs(cache_local, exist_ok=True)
            make(target)
        barrier()
        if not os.path.exists(target):
            raise CheckpointError(f"{target}: the {what} made by rank 0 is not visible here; checkpoint.dir must be "
                                  "shared by every node")
        return target

    def _universal(self, name: str, local: str) -> str:
        """A universal checkpoint of `name`'s engine state in the cache beside the checkpoints (made once)."""

        def convert(done: str) -> None:
            output = os.path.join(os.path.dirname(done), ENGINE_TAG)
            shutil.rmtree(output, ignore_errors=True)  # what a conversion cut short left
            convert_to_universal(os.path.join(local, ENGINE_TAG), output)
            with open(done, "w") as f:
                f.write(name + "\n")

        return os.path.dirname(self._made_once(name, "done", "universal checkpoint", convert))

    def _restore_across_backends(self, engine: Any, name: str, local: str, backend: str, step: int) -> None:
        """Continue from a checkpoint of the other backend: its weights, gathered once by the engine that wrote them
        (`parallel.consolidate`, in local CPU processes of the saved layout) and cached beside the checkpoints, go
        into this engine, and the LR schedule goes on from the saved step. AdamW's moments start again from zero:
        the two engines keep optimizer state in unrelated layouts, so the first steps move as after a warm restart."""
        from parallel.consolidate import TorchWriter, consolidate

        def gather(weights: str) -> None:
            if self.rank == 0:
                log.warning("checkpoint %s was written by the %s backend, this run uses %s: gathering its weights "
                            "with the %s engine; optimizer moments restart", name, backend,
                            self.layout["backend"], backend)
            consolidate(self.spec, local, TorchWriter(weights))

        weights = self._made_once(name, f"weights-{backend}.pt", f"{backend} weights", gather)
        engine.load_full_state_dict(torch.load(weights, weights_only=True))
        set_schedule_step(engine.scheduler, step)

    def _load_engine(self, engine: Any, directory: str, universal: bool) -> None:
        # DeepSpeed reads `load_universal` from its config only inside load_checkpoint, so it is set for this call
        ds = _deepspeed(engine)
        config = ds._config
        before = config.load_universal_checkpoint
        config.load_universal_checkpoint = universal
        try:
            path, _ = ds.load_checkpoint(directory, tag=ENGINE_TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        finally:
            config.load_universal_checkpoint = before
        if path is None:
            raise CheckpointError(f"{directory}/{ENGINE_TAG}: DeepSpeed found no engine state to load")


@dataclass
class _SaveJob:
    step: int
    name: str
    write_dir: str
    local: str
    pending: list[tuple[str, Any]]
    rng: dict[str, Any]
    loader_state: dict[str, Any] | None
    engine: Any = None  # a native engine whose background DCP write the writer joins first
    saved_paths: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.saved_paths = [p for p, _ in self.pending]


def check_same_model(saved_spec: str, spec: JobSpec) -> None:
    """A layout can change on resume, the model cannot: name every `model.*` value that differs.

    The common trap is `model.vocab_size: null`, which pads the tokenizer's size to a multiple of 128·tp, so a
    resume at another tp gets another vocabulary unless the size is pinned.
    """
    saved = (yaml.safe_load(_read_text(saved_spec)) or {}).get("model", {})
    current = dataclasses.asdict(spec.model)
    changed = [f"model.{k}: {saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in current.items()
               if saved.get(k) != v]
    if changed:
        raise CheckpointError(f"{saved_spec}: the checkpoint's model differs from this run's: " + "; ".join(changed)
                              + "; set the checkpoint's values in the job spec (pin model.vocab_size when tp changes)")


def convert_to_universal(engine_dir: str, output_dir: str) -> None:
    """Run DeepSpeed's converter (in a subprocess: it starts worker pools and may use much memory)."""
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", engine_dir,
               "--output_folder", output_dir, "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise CheckpointError(f"{engine_dir}: conversion to a universal checkpoint failed:\n{tail}")


def _deepspeed(engine: Any) -> Any:
    return getattr(engine, "ds", engine)


def _written_by_engine_rank(rel: str) -> bool:
    """Engine files are reported by the rank that wrote them (their paths come from DeepSpeed's save calls)."""
    return rel.startswith(ENGINE_TAG + os.sep) and rel.endswith(".pt")


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None


def _all_gather(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
