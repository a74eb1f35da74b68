"""Rows of a split's shards, wherever they are: memory-mapped from a disk, or streamed from an object store.

The loader asks for the rows of a step (`gather`: shard and row of each) and gets them in that order, the same
values whichever reader serves them, so the sample order and an exact resume do not depend on where shards live.

In an object store (`dataprep.filesystem`) a row is one ranged read: a shard holds a single record batch of
fixed-size rows, so row r of a shard sits at a fixed offset found once from the file's footer. The reads of a step
go out together on a thread pool, and the loader's prefetch thread asks for the next steps while the current one
trains, so the store's latency overlaps the compute instead of adding to it. With a cache directory, a background
thread also copies each shard there whole (sha256-checked against the manifest, named by its hash, so runs share
one cache) and rows come from the local copy once it is complete.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from dataprep import filesystem
from dataprep.shards import check_sha256, open_shard, tokens_schema
from orchestrator.errors import DataError

log = logging.getLogger(__name__)

READ_THREADS = 16  # ranged reads in flight per loader: a store's latency (~10-50 ms) times this many rows at once
_TAIL = 10  # an Arrow IPC file ends with its footer's length (int32) and the magic "ARROW1"
_ITEM = 4  # bytes of an int32 token


class MappedShards:
    """Shards on a disk (or a mounted filesystem), memory-mapped: rows are read on first touch."""

    def __init__(self, paths: list[str], seq_len: int):
        self.arrays = [open_shard(p, seq_len) for p in paths]
        self.lengths = [len(a) for a in self.arrays]

    def gather(self, shard_of: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.arrays[0].shape[1] if self.arrays else 0), np.int32)
        for shard in np.unique(shard_of):
            mine = np.flatnonzero(shard_of == shard)
            out[mine] = self.arrays[shard][rows[mine]]
        return out

    def close(self) -> None:
        pass


class StreamedShards:
    """Shards in an object store, read a row at a time by ranged requests; optionally copied into `cache_dir`."""

    def __init__(self, paths: list[str], entries: list[dict[str, Any]], seq_len: int, cache_dir: str = ""):
        self.paths, self.entries, self.seq_len = paths, entries, seq_len
        self.width = seq_len + 1
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="shard-read")
        self.files = list(self._pool.map(filesystem.open_native, paths))  # a request each: all at once
        self.starts = list(self._pool.map(_values_start, self.files, paths, [e["rows"] for e in entries],
                                          [self.width] * len(paths)))
        self.lengths = [e["rows"] for e in entries]
        self.local: list[np.ndarray | None] = [None] * len(paths)
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._copier: threading.Thread | None = None
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            self._copier = threading.Thread(target=self._copy_all, args=(cache_dir,), name="shard-cache",
                                            daemon=True)
            self._copier.start()

    def gather(self, shard_of: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if self._failure is not None:
            raise self._failure
        out = np.empty((len(rows), self.width), np.int32)
        nbytes = self.width * _ITEM
        pending = []
        for i, (shard, row) in enumerate(zip(shard_of.tolist(), rows.tolist(), strict=True)):
            local = self.local[shard]
            if local is not None:
                out[i] = local[row]
            else:
                read = self.files[shard].read_at
                pending.append((i, shard, self._pool.submit(read, nbytes, self.starts[shard] + row * nbytes)))
        for i, shard, future in pending:
            data = filesystem.guarded(self.paths[shard], future.result)
            if len(data) != nbytes:
                raise DataError(f"{self.paths[shard]}: a row read returned {len(data)} bytes, expected {nbytes}; "
                                "the object is shorter than its footer says")
            out[i] = np.frombuffer(data, np.int32)
        return out

    def close(self) -> None:
        self._stop.set()
        if self._copier is not None:
            self._copier.join()
        self._pool.shutdown(wait=True)

    def _copy_all(self, cache_dir: str) -> None:
        """Copy every shard into the cache, in manifest order; a failed checksum stops the loader at its next read
        (a corrupt shard), any other failure only stops caching (rows keep streaming)."""
        for shard, (path, entry) in enumerate(zip(self.paths, self.entries, strict=True)):
            if self._stop.is_set():
                return
            local = os.path.join(cache_dir, f"{entry['sha256']}.arrow")
            tmp = f"{local}.part-{os.getpid()}"
            try:
                if not os.path.exists(local):
                    filesystem.download(path, tmp)
                    check_sha256(tmp, entry["sha256"], path)
                    os.replace(tmp, local)
                self.local[shard] = open_shard(local, self.seq_len)
            except DataError as e:
                if os.path.exists(tmp):
                    os.remove(tmp)
                if isinstance(e, filesystem.StorageError):
                    log.warning("shard cache %s: stopped copying (%s); rows stream from the store", cache_dir, e)
                else:
                    self._failure = e
                return


def _values_start(file: pa.NativeFile, path: str, rows: int, width: int) -> int:
    """The byte offset of row 0 in a shard file, from its footer, after checking that the file is what prep
    writes (one record batch of `tokens` rows of this width, holding the manifest's number of rows)."""
    try:
        reader = pa.ipc.open_file(file)
        schema, batches = reader.schema, reader.num_record_batches
        size = file.size()
        length, magic = struct.unpack("<i6s", file.read_at(_TAIL, size - _TAIL))
        footer = file.read_at(length, size - _TAIL - length)
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: not a readable Arrow IPC file: {e}") from None
    except (OSError, pa.ArrowException) as e:
        raise filesystem.storage_error(path, e) from None
    if not schema.equals(tokens_schema(width - 1)) or batches != 1 or magic != b"ARROW1":
        raise DataError(f"{path}: expected one record batch of {tokens_schema(width - 1)}, found {batches} of "
                        f"{schema}")
    try:
        offset, metadata, body = _record_batch_blocks(footer)[0]
    except (struct.error, IndexError):
        raise DataError(f"{path}: its Arrow footer lists no readable record batch") from None
    values = rows * width * _ITEM
    # No nulls, so the only buffer of the body is the values: it starts the body and fills it but for padding.
    if not values <= body < values + 64:
        raise DataError(f"{path}: its record batch holds {body} bytes, but {rows} rows of {width} int32 tokens "
                        f"need {values}; the shard does not match manifest.json")
    return offset + metadata


def _record_batch_blocks(footer: bytes) -> list[tuple[int, int, int]]:
    """(offset, metadata length, body length) of each record batch, read from the footer's flatbuffer
    (Footer field 3, `recordBatches`: a vector of 24-byte Block structs)."""
    table = struct.unpack_from("<I", footer, 0)[0]
    vtable = table - struct.unpack_from("<i", footer, table)[0]
    field = vtable + 4 + 2 * 3
    if field + 2 > vtable + struct.unpack_from("<H", footer, vtable)[0]:
        return []
    at = table + struct.unpack_from("<H", footer, field)[0]
    vector = at + struct.unpack_from("<I", footer, at)[0]
    count = struct.unpack_from("<I", footer, vector)[0]
    return [struct.unpack_from("<qi4xq", footer, vector + 4 + 24 * i) for i in range(count)]


def open_split(directory: str, paths: list[str], entries: list[dict[str, Any]], seq_len: int,
               cache_dir: str = "") -> MappedShards | StreamedShards:
    """The reader of a split's shards: streamed when `directory` is in an object store, else memory-mapped."""
    if filesystem.is_remote(directory):
        return StreamedShards(paths, entries, seq_len, cache_dir)
    return MappedShards(paths, seq_len)
