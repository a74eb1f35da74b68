"""Paths on the local disk or in an object store (s3://, gs://, abfs:// and az://), behind one set of functions.

Prep's readers and writers and the training loader call these instead of `open` and `os.path`, so a shard
directory, a corpus or a report can live in a bucket as well as on a disk; nothing else in the project branches on
the scheme. A URI goes through `pyarrow.fs.FileSystem.from_uri`, so credentials, regions and endpoints are found
the way pyarrow's own clients find them: for S3 the AWS SDK's chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, an instance role) and its endpoint variables (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, which point it
at MinIO or any S3-compatible store), or the URI's own query (`s3://bucket/dir?endpoint_override=host:9000`).
`az://container/dir` is `abfs://` on the account named by AZURE_STORAGE_ACCOUNT_NAME.

Writes are whole or absent: locally a temporary name then a rename; an object-store PUT is atomic by itself, so
an object is either there complete or not at all, and a directory is marked complete by the object written last
(a shard directory's manifest.json).

Every failure of the store (a refused credential, a missing bucket, a missing key, an unreachable endpoint) is one
`StorageError` that names the URI and what to check, never the SDK's traceback.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from orchestrator.errors import DataError

SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az")
_BUFFER = 1 << 20
# Streams are opened with compression=None throughout: pyarrow would otherwise (de)compress by the name's suffix, and
# a corpus.jsonl.gz must be stored and read as the bytes it is.
T = TypeVar("T")

# What a store's error text says → what the user should check. First match wins.
_CAUSES = (
    (re.compile(r"ACCESS_DENIED|InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|Forbidden|\b403\b|"
                r"UNAUTHORIZED|credential", re.I),
     "the store refused the credentials: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE (S3), "
     "GOOGLE_APPLICATION_CREDENTIALS (GCS) or AZURE_STORAGE_ACCOUNT_KEY (Azure), and that they may read and write "
     "this path"),
    (re.compile(r"NO_SUCH_BUCKET|bucket does not exist|Bucket '[^']*' not found|ContainerNotFound|"
                r"bucket_not_found", re.I),
     "the bucket does not exist: create it, or fix its name in the path"),
    (re.compile(r"curlCode|Couldn't connect|Could not resolve|Connection refused|Timeout|NETWORK_CONNECTION",
                re.I),
     "the store cannot be reached: check the endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or "
     "?endpoint_override= in the URI for S3-compatible stores) and the network"),
)


class StorageError(DataError):
    """A path could not be read or written; the message names it and what to check."""


def is_remote(path: str) -> bool:
    """Whether `path` is an object-store URI rather than a path of this machine."""
    return "://" in path and not path.startswith("file://")


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `path` and the path within it (a bucket-relative key for object stores)."""
    if not is_remote(path):
        return pafs.LocalFileSystem(), os.path.abspath(path.removeprefix("file://"))
    parts = urlsplit(path)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise StorageError(f"{path}: unknown scheme {scheme!r}; use a local path or one of "
                           f"{', '.join(s + '://' for s in SCHEMES)}")
    fs = _filesystem(scheme, parts.netloc, parts.query)
    root = parts.netloc.split("@")[0] if scheme in ("abfs", "abfss") else parts.netloc
    return fs, posixpath.join(root, parts.path.lstrip("/")).rstrip("/")


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, netloc: str, query: str) -> pafs.FileSystem:
    """One client per bucket and settings: building one resolves the bucket's region, a request each time."""
    uri = f"{scheme}://{netloc}" + (f"?{query}" if query else "")
    try:
        if scheme == "az":
            account = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
            if not account:
                raise StorageError(f"{uri}: az:// needs the storage account in AZURE_STORAGE_ACCOUNT_NAME (or use "
                                   "abfs://container@account.dfs.core.windows.net/...)")
            return pafs.AzureFileSystem(account_name=account,
                                        account_key=os.environ.get("AZURE_STORAGE_ACCOUNT_KEY") or None)
        return pafs.FileSystem.from_uri(uri)[0]
    except (OSError, pa.ArrowException, ValueError) as e:
        raise storage_error(uri, e) from None


def storage_error(path: str, error: BaseException) -> StorageError:
    """One readable error for a failed store operation on `path`: the cause the store gave, then what to check."""
    text = str(error).split("\n")[0]
    if isinstance(error, FileNotFoundError):
        return StorageError(f"{path}: no such file or object")
    for pattern, advice in _CAUSES:
        if pattern.search(str(error)):
            return StorageError(f"{path}: {advice} ({text})")
    return StorageError(f"{path}: {text}")


def guarded(path: str, call: Callable[[], T]) -> T:
    """`call()`, with a store's error turned into a `StorageError` naming `path`."""
    try:
        return call()
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise storage_error(path, e) from None


# ---------------------------------------------------------------------------------------------- asking


def file_type(path: str) -> pafs.FileType:
    """What `path` is; a path in a bucket that does not exist is a `StorageError` rather than "not found", since
    the store answers both alike and only the first is a typo to fix."""
    fs, inner = resolve(path)
    kind = guarded(path, lambda: fs.get_file_info(inner).type)
    bucket = inner.split("/")[0]
    if (kind == pafs.FileType.NotFound and is_remote(path) and bucket != inner
            and guarded(path, lambda: fs.get_file_info(bucket).type) == pafs.FileType.NotFound):
        raise StorageError(f"{path}: the bucket {bucket!r} does not exist: create it, or fix its name in the "
                           "path (and check the endpoint, if the store is not AWS's)")
    return kind


def exists(path: str) -> bool:
    return file_type(path) != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    return file_type(path) == pafs.FileType.File


def size(path: str) -> int:
    fs, inner = resolve(path)
    info = guarded(path, lambda: fs.get_file_info(inner))
    if info.type != pafs.FileType.File:
        raise StorageError(f"{path}: no such file or object")
    return int(info.size)


def list_dir(path: str) -> list[str]:
    """Names of the entries directly under a directory (or key prefix); empty when there is none."""
    fs, inner = resolve(path)
    infos = guarded(path, lambda: fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True)))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def list_files(path: str) -> list[str]:
    """A file, every file under a directory (hidden ones skipped), or a glob's matching files, sorted: the files
    of a prep source. Object-store globs match keys with `fnmatch` below the longest prefix without a wildcard."""
    if not is_remote(path):
        import glob

        files = []
        for match in sorted(glob.glob(path)):
            if os.path.isdir(match):
                for root, dirs, names in os.walk(match):
                    dirs.sort()
                    files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
            else:
                files.append(match)
        return files
    pattern, _, query = path.partition("?")
    wild = re.search(r"[*?\[]", pattern)
    base = pattern if not wild else pattern[:wild.start()].rpartition("/")[0]
    suffix = f"?{query}" if query else ""
    fs, inner = resolve(base + suffix)
    if not wild and guarded(path, lambda: fs.get_file_info(inner)).type == pafs.FileType.File:
        return [path]
    selector = pafs.FileSelector(inner, recursive=True, allow_not_found=True)
    found = guarded(path, lambda: fs.get_file_info(selector))
    relative = sorted(posixpath.relpath(i.path, inner) for i in found if i.type == pafs.FileType.File)
    uris = [f"{base.rstrip('/')}/{r}" for r in relative if not any(p.startswith(".") for p in r.split("/"))]
    return [u + suffix for u in uris if not wild or fnmatch.fnmatchcase(u, pattern)]


# ---------------------------------------------------------------------------------------------- reading


def open_binary(path: str) -> IO[bytes]:
    """A buffered, seekable binary file: the local file itself, or an object read by ranged requests."""
    if not is_remote(path):
        return open(path, "rb", buffering=_BUFFER)
    fs, inner = resolve(path)
    return io.BufferedReader(guarded(path, lambda: fs.open_input_file(inner)), _BUFFER)


def open_native(path: str) -> pa.NativeFile:
    """The file as a pyarrow random-access file (Parquet, Arrow IPC and pyarrow's codecs read these)."""
    fs, inner = resolve(path)
    return guarded(path, lambda: fs.open_input_file(inner))


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    fs, inner = resolve(path)

    def read() -> bytes:
        with fs.open_input_stream(inner, compression=None) as f:
            return f.read()

    return guarded(path, read)


def download(path: str, local: str) -> None:
    """Copy an object (or local file) to the local path `local`, through a temporary name so a reader of `local`
    never sees part of it."""
    tmp = f"{local}.tmp-{os.getpid()}"
    fs, inner = resolve(path)
    try:
        guarded(path, lambda: pafs.copy_files(inner, tmp, source_filesystem=fs,
                                              destination_filesystem=pafs.LocalFileSystem()))
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------- writing


def makedirs(path: str) -> None:
    """Create a local directory; object stores have none to create (a key's prefix exists with its objects)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a local file under a temporary name, flush to disk, then rename: a reader sees the old file or the
    whole new one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes(path: str, data: bytes) -> None:
    """Readers see the old content or all of the new: a temporary name, fsync and rename on a disk; one PUT of the
    whole object in a store."""
    if not is_remote(path):
        write_atomic(path, data)
        return
    fs, inner = resolve(path)

    def put() -> None:
        with fs.open_output_stream(inner, compression=None) as f:
            f.write(data)

    guarded(path, put)


def upload(local: str, path: str) -> None:
    """Copy the complete local file `local` to `path` (whole, as `write_bytes` does)."""
    if not is_remote(path):
        tmp = f"{path}.tmp-{os.getpid()}"
        shutil.copyfile(local, tmp)
        os.replace(tmp, path)
        return
    fs, inner = resolve(path)
    guarded(path, lambda: pafs.copy_files(local, inner, source_filesystem=pafs.LocalFileSystem(),
                                          destination_filesystem=fs))


@contextmanager
def written_locally(path: str) -> Iterator[str]:
    """A local path to write `path`'s content to, for writers that take only a file name (matplotlib, tokenizers):
    `path` itself on a disk; in a store, a temporary file uploaded whole when the block ends without an error."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, basename(path))
        yield local
        upload(local, path)


def remove(path: str) -> None:
    """Delete a file or object; one already gone is not an error."""
    fs, inner = resolve(path)
    try:
        fs.delete_file(inner)
    except FileNotFoundError:
        return
    except (OSError, pa.ArrowException) as e:
        raise storage_error(path, e) from None


def check_writable(path: str) -> None:
    """Fail now, with the URI, when a store refuses writes under `path` (a wrong key, a missing bucket), rather
    than after hours of work: a small probe object is written and deleted."""
    if not is_remote(path):
        return
    probe = join(path, f".write-probe-{os.getpid()}")
    write_bytes(probe, b"")
    remove(probe)
