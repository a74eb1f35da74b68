"""The shard format: what `pretrain prep` writes and the training loader reads.

A shard directory holds `manifest.json`, `tokenizer.json` (Hugging Face tokenizers format) and Arrow IPC *files*
`train-00000.arrow`, ..., `val-00000.arrow`, ... Each file has one column `tokens` of type
fixed_size_list<int32>[seq_len + 1] (a packed row: seq_len inputs plus the one shifted target) stored as a single
record batch, so `open_shard` memory-maps it and views it as a zero-copy int32 array [rows, seq_len + 1]. Rows of a
split, shards in manifest order and rows in file order, are numbered 0..N-1: the global sample index of the loader.

A shard directory may be an object-store URI (`dataprep.filesystem`): the manifest and the shards are then objects,
each written whole, the manifest last.

With `dataprep.filesystem`, this module is what `parallel` imports of `dataprep`; it needs pyarrow, numpy and the
standard library.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from dataprep import filesystem
from orchestrator.config_parser import WRITTEN_FILE_BOUNDS, loads_json
from orchestrator.errors import DataError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
_HASH_CHUNK = 1 << 20
MAX_SEQ_LEN, MAX_VOCAB = 2**20, 2**31 - 1  # rows are read whole; token ids are int32


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.arrow"


def tokens_schema(seq_len: int) -> pa.Schema:
    return pa.schema([pa.field("tokens", pa.list_(pa.int32(), seq_len + 1), nullable=False)])


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


write_atomic = filesystem.write_atomic  # where the writers of dataprep and parallel import it from


class ShardWriter:
    """Appends packed rows to one split, starting a new shard file every `rows_per_shard` rows.

    A shard is written as one record batch (so it maps to one contiguous array): rows are buffered until the shard is
    full, which bounds memory to one shard. Each file goes to a temporary name and is renamed once complete, so a crash
    never leaves a truncated shard under a real name. `close()` returns the manifest entries of the files written.
    """

    def __init__(self, directory: str | os.PathLike, split: str, seq_len: int, rows_per_shard: int = 8192):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if seq_len < 1 or rows_per_shard < 1:
            raise ValueError(f"seq_len and rows_per_shard must be ≥ 1, got {seq_len}, {rows_per_shard}")
        self.directory = os.fspath(directory)
        self.split = split
        self.width = seq_len + 1
        self.rows_per_shard = rows_per_shard
        self.schema = tokens_schema(seq_len)
        self.entries: list[dict[str, Any]] = []
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        os.makedirs(self.directory, exist_ok=True)

    def write(self, rows: np.ndarray) -> None:
        """Append rows of shape [n, seq_len + 1]; any integer dtype whose values fit int32."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"rows must have shape [n, {self.width}], got {list(rows.shape)}")
        rows = rows.astype(np.int32, copy=False)
        while len(rows):
            take = min(len(rows), self.rows_per_shard - self._pending_rows)
            self._pending.append(rows[:take])
            self._pending_rows += take
            rows = rows[take:]
            if self._pending_rows == self.rows_per_shard:
                self._flush()

    def close(self) -> list[dict[str, Any]]:
        if self._pending_rows:
            self._flush()
        return list(self.entries)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, *_: Any) -> None:
        if kind is None:
            self.close()

    def _flush(self) -> None:
        block = np.ascontiguousarray(np.concatenate(self._pending)) if len(self._pending) > 1 else self._pending[0]
        values = pa.array(np.ascontiguousarray(block).reshape(-1), type=pa.int32())
        column = pa.FixedSizeListArray.from_arrays(values, self.width)
        batch = pa.record_batch([column], schema=self.schema)
        name = shard_name(self.split, len(self.entries))
        path = os.path.join(self.directory, name)
        tmp = f"{path}.tmp-{os.getpid()}"
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, self.schema) as writer:
            writer.write_batch(batch)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.entries.append({"file": name, "rows": int(len(block)), "sha256": file_sha256(path)})
        self._pending, self._pending_rows = [], 0


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Check the manifest against the format, then write it whole (the last file of a prep run)."""
    path = filesystem.join(os.fspath(directory), MANIFEST_FILE)
    _check_manifest(manifest, path)
    filesystem.write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a shard directory, checked; any problem is a `DataError` naming the file and what is wrong."""
    path = filesystem.join(os.fspath(directory), MANIFEST_FILE)
    if not filesystem.exists(path):
        raise DataError(f"{path}: no such file; is {os.fspath(directory)!r} a directory written by `pretrain prep`?")
    manifest = loads_json(filesystem.read_bytes(path), source=path, bounds=WRITTEN_FILE_BOUNDS, error=DataError)
    _check_manifest(manifest, path)
    return manifest


def verify_shard(directory: str | os.PathLike, entry: dict[str, Any]) -> None:
    """Check a shard file against its manifest entry (presence, then sha256); a mismatch is a `DataError`.

    An object in a store is only checked for presence: objects are written whole, and reading every shard to hash
    it would download the dataset; the loader hashes a shard when it copies it into its local cache.
    """
    path = filesystem.join(os.fspath(directory), entry["file"])
    if not filesystem.is_file(path):
        raise DataError(f"{path}: shard listed in {MANIFEST_FILE} is missing")
    if not filesystem.is_remote(path):
        check_sha256(path, entry["sha256"], path)


def check_sha256(local: str, expected: str, name: str) -> None:
    """The local file `local` (a copy of the shard `name`) hashes to `expected`, else a `DataError` naming it."""
    actual = file_sha256(local)
    if actual != expected:
        raise DataError(f"{name}: sha256 {actual} does not match {MANIFEST_FILE} ({expected}); "
                        "the file is corrupt or was changed after prep, rerun `pretrain prep`")


def open_shard(path: str | os.PathLike, seq_len: int | None = None) -> np.ndarray:
    """Memory-map a shard as a read-only int32 array [rows, seq_len + 1] without copying it.

    The array keeps the mapping alive; pages are read on first touch, so opening every shard of a large run is cheap.
    """
    path = os.fspath(path)
    try:
        source = pa.memory_map(path, "r")
        reader = pa.ipc.open_file(source)
        if reader.num_record_batches != 1:
            raise DataError(f"{path}: holds {reader.num_record_batches} record batches, expected 1")
        batch = reader.get_batch(0)
    except FileNotFoundError:
        raise DataError(f"{path}: no such shard file") from None
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{path}: not a readable Arrow IPC file: {e}") from None
    kind = batch.schema.field("tokens").type if "tokens" in batch.schema.names else None
    if (kind is None or not pa.types.is_fixed_size_list(kind) or kind.value_type != pa.int32()
            or (seq_len is not None and kind.list_size != seq_len + 1)):
        want = f"fixed_size_list<int32>[{seq_len + 1 if seq_len is not None else 'seq_len + 1'}]"
        raise DataError(f"{path}: column 'tokens' should be {want}, found schema {batch.schema}")
    column = batch.column(0)
    values = column.values
    if column.null_count or column.offset or values.null_count or values.offset:
        raise DataError(f"{path}: column 'tokens' has nulls or an offset; it was not written by `pretrain prep`")
    # The data buffer viewed directly: Array.to_numpy imports pandas, which every training rank would pay for.
    tokens = np.frombuffer(values.buffers()[1], dtype=np.int32, count=len(values))
    return tokens.reshape(len(column), kind.list_size)


def shard_paths(directory: str | os.PathLike, manifest: dict[str, Any], split: str) -> list[str]:
    return [filesystem.join(os.fspath(directory), e["file"]) for e in manifest["splits"][split]["shards"]]


# ---------------------------------------------------------------------------------------------- checking


def _check_manifest(manifest: Any, path: str) -> None:
    problems = list(_manifest_problems(manifest))
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems))


def _manifest_problems(m: Any) -> Iterable[str]:
    if not isinstance(m, dict):
        yield f"expected a JSON object, got {type(m).__name__}"
        return
    if m.get("format_version") != FORMAT_VERSION:
        yield f"format_version is {m.get('format_version')!r}, this version of pretrain reads {FORMAT_VERSION}"
        return
    if not _is_count(m.get("seq_len"), minimum=1, maximum=MAX_SEQ_LEN):
        yield f"seq_len is {m.get('seq_len')!r}, expected an integer from 1 to {MAX_SEQ_LEN}"
    tok = m.get("tokenizer")
    if not isinstance(tok, dict):
        yield "tokenizer is missing or not an object"
    else:
        if not isinstance(tok.get("file"), str) or not tok["file"]:
            yield "tokenizer.file is missing"
        if not _is_count(tok.get("vocab_size"), minimum=2, maximum=MAX_VOCAB):
            yield f"tokenizer.vocab_size is {tok.get('vocab_size')!r}, expected an integer from 2 to {MAX_VOCAB}"
        if not _is_count(tok.get("eos_id")) or (
                _is_count(tok.get("vocab_size")) and tok["eos_id"] >= tok["vocab_size"]):
            yield f"tokenizer.eos_id is {tok.get('eos_id')!r}, expected an integer below vocab_size"
    if not isinstance(m.get("config_hash"), str):
        yield "config_hash is missing"
    if not isinstance(m.get("sources"), dict):
        yield "sources is missing or not an object"
    splits = m.get("splits")
    if not isinstance(splits, dict) or "train" not in splits:
        yield "splits.train is missing"
        return
    for name, split in splits.items():
        yield from _split_problems(name, split)


def _split_problems(name: str, split: Any) -> Iterable[str]:
    where = f"splits.{name}"
    if name not in SPLITS:
        yield f"{where}: unknown split, allowed: {', '.join(SPLITS)}"
        return
    if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
        yield f"{where}.shards is missing"
        return
    if not _is_count(split.get("rows")) or not _is_count(split.get("tokens")):
        yield f"{where}: rows and tokens must be integers ≥ 0"
    total = 0
    for i, entry in enumerate(split["shards"]):
        ok = (isinstance(entry, dict) and isinstance(entry.get("file"), str) and _is_count(entry.get("rows"))
              and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64)
        if not ok:
            yield f"{where}.shards[{i}]: expected {{file, rows, sha256}}, got {entry!r}"
            return
        if os.path.basename(entry["file"]) != entry["file"]:
            yield f"{where}.shards[{i}].file {entry['file']!r} must be a plain file name in the shard directory"
        total += entry["rows"]
    if _is_count(split.get("rows")) and total != split["rows"]:
        yield f"{where}.rows is {split['rows']}, but its shards hold {total} rows"


def _is_count(value: Any, minimum: int = 0, maximum: int = 2**62) -> bool:
    """An integer in [minimum, maximum]; the default maximum keeps row arithmetic within int64."""
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum
