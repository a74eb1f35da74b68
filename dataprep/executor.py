"""Running stages on Ray Data, resumably.

A stage's outputs live in `<work>/<stage>-<key>/`, where the key hashes everything the outputs depend on (the
input fingerprints and the settings that stage reads), so a changed config never reuses stale outputs and an
unchanged one reuses all of them. Per-task stages write each task's files atomically and then a
`<task>.done.json` holding its counters; a rerun after a crash runs only the tasks without one. Whole-dataset
stages (shuffles) write into a temporary directory renamed into place once complete.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.local import start_local_ray
from dataprep import filesystem
from dataprep.shards import write_atomic
from orchestrator.config_parser import WRITTEN_FILE_BOUNDS, load_json
from orchestrator.errors import DataError, UserError

DONE_SUFFIX = ".done.json"
# glibc's: hands the free pages of its heaps back to the system (absent elsewhere)
_MALLOC_TRIM = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None) \
    if sys.platform.startswith("linux") else None


def stable_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def stage_dir(work: str, name: str, *key: Any) -> str:
    return os.path.join(work, f"{name}-{stable_hash(*key)[:16]}")


def connect_ray(address: str | None, num_cpus: int, progress: bool = True) -> bool:
    """Join the cluster at `address`, or start an embedded local Ray; returns whether this call started Ray.

    Without `progress`, Ray Data shows no progress (bars, or the periodic log lines it writes instead when stdout
    is not a terminal) and logs only errors, so a quiet run prints nothing.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        level = logging.INFO if progress else logging.WARNING
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=level)
        else:
            start_local_ray(num_cpus or None, include_dashboard=False, log_to_driver=False, logging_level=level)
    ctx = ray.data.DataContext.get_current()
    # Each hash-shuffle aggregator is an actor: on a small machine a few are faster to start than one per partition.
    ctx.max_hash_shuffle_aggregators = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.ERROR)
    return started


def write_table_atomic(table: pa.Table, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    """A work file read whole in the calling thread. Arrow's default pre-buffering reads column chunks on its IO
    threads, and what those threads allocate stays cached with them after it is freed: a worker reading a few
    parts per task grew by ~2.5 MiB a task (60 files: +150 MiB), so its peak followed how many files it had run."""
    return pq.read_table(path, columns=columns, pre_buffer=False)


def read_done(directory: str, task: str) -> dict | None:
    path = os.path.join(directory, task + DONE_SUFFIX)
    if not os.path.exists(path):
        return None

    def refused(why: str) -> DataError:
        return DataError(f"{why}; delete the file and the task runs again")

    stats = load_json(path, bounds=WRITTEN_FILE_BOUNDS, error=refused)
    if not isinstance(stats, dict):
        raise refused(f"{path}: expected a JSON object (the task's stats), got {type(stats).__name__}")
    return stats


def mark_done(directory: str, task: str, stats: dict) -> None:
    write_atomic(os.path.join(directory, task + DONE_SUFFIX), json.dumps(stats, sort_keys=True).encode())


def run_tasks(directory: str, tasks: Sequence[tuple[str, dict]], fn: Callable[[dict, str], dict],
              on_done: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    """Run `fn(payload, directory) -> stats` for every (name, JSON-able payload) task not yet done, on Ray Data.

    Returns every task's stats (done before or now) by name. `fn` writes its own outputs atomically; this wrapper
    records completion after it returns, so a task killed midway is simply redone.
    """
    import ray

    results = {}
    pending = []
    for name, payload in tasks:
        done = read_done(directory, name)
        if done is None:
            pending.append((name, payload))
        else:
            results[name] = done
            if on_done:
                on_done(name, done)
    if not pending:
        return results
    os.makedirs(directory, exist_ok=True)

    def run_one(row: dict) -> dict:
        name = row["name"]
        stats = fn(json.loads(row["payload"]), directory)
        mark_done(directory, name, stats)
        release_freed_memory()
        return {"name": name, "stats": json.dumps(stats)}

    items = [{"name": n, "payload": json.dumps(p)} for n, p in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map(run_one, num_cpus=1)
    try:
        for row in ds.iter_rows():
            stats = json.loads(row["stats"])
            results[row["name"]] = stats
            if on_done:
                on_done(row["name"], stats)
    except Exception as e:
        raise user_error_in(e) or e from None
    return results


def release_freed_memory() -> None:
    """Hand what a finished task freed back to the system: Arrow's allocator and glibc's keep freed pages for reuse,
    so a long-lived worker's RSS otherwise climbs with every task it has run (the largest file's task sets its peak,
    not the number of files)."""
    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def user_error_in(error: BaseException) -> UserError | None:
    """The `UserError` a Ray task raised, unwrapped from Ray's task and Ray Data's user-code exceptions."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserError):
            return type(error)(*error.args) if type(error).__init__ is Exception.__init__ else error
        error = error.__cause__ or getattr(error, "cause", None) or error.__context__
    return None


@contextmanager
def atomic_stage(directory: str) -> Iterator[str | None]:
    """Yields a temporary directory to fill, renamed to `directory` on success; yields None if already complete."""
    if os.path.isdir(directory) and os.path.exists(os.path.join(directory, "_SUCCESS")):
        yield None
        return
    tmp = directory.rstrip("/") + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    yield tmp
    write_atomic(os.path.join(tmp, "_SUCCESS"), b"")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def parquet_files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".parquet"))


def parts_of(directory: str, task: str) -> list[str]:
    """The Parquet parts a task wrote into a stage directory (`<task>-<part>.parquet`), in order."""
    if not os.path.isdir(directory):
        return []
    return [p for p in parquet_files(directory) if os.path.basename(p).startswith(task + "-")]


def file_digest(path: str) -> str:
    """A file's content hash: input fingerprints and stage keys."""
    digest = hashlib.blake2b(digest_size=16)
    with filesystem.open_binary(path) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
