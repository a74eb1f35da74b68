"""A checkpoint root on any `pyarrow.fs` filesystem: a local or NFS path, or an object-store URI (s3://, gs://).

The checkpoint code speaks only to `Storage`, so the same save, commit and resume logic runs everywhere; only two
things differ by filesystem and are decided here:
- whether the engine can write straight into the root (`local_path` is not None) or into a local staging
  directory whose files are uploaded afterwards;
- whether a directory rename is atomic (`atomic_rename`): on object stores it is not, so there the checkpoint's
  manifest, uploaded last, is what marks it complete.
"""

from __future__ import annotations

import hashlib
import os
import posixpath

import pyarrow.fs as pafs

from dataprep import filesystem
from dataprep.shards import write_atomic
from orchestrator.errors import CheckpointError

_CHUNK = 1 << 22


class Storage:
    def __init__(self, uri: str):
        self.uri = uri
        try:
            self.fs, self.root = filesystem.resolve(uri)
        except filesystem.StorageError as e:
            raise CheckpointError(f"checkpoint.dir {uri!r}: not a usable filesystem URI: {e}") from None
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if not self.is_local else os.path.join(self.root, *parts)

    def local_path(self, *parts: str) -> str | None:
        """The OS path of an entry when the filesystem is local (or mounted, as NFS is); None for object stores."""
        return self.path(*parts) if self.is_local else None

    @property
    def atomic_rename(self) -> bool:
        return self.is_local

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def is_dir(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.Directory

    def list_dir(self, *parts: str) -> list[str]:
        """Names of the entries directly under a directory; empty when it does not exist."""
        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(posixpath.basename(info.path.rstrip("/")) for info in self.fs.get_file_info(selector))

    def list_files(self, *parts: str) -> list[str]:
        """Every file under a directory, as paths relative to it with '/' separators."""
        base = self.path(*parts)
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        files = [info.path for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File]
        return sorted(posixpath.relpath(f.replace(os.sep, "/"), base.replace(os.sep, "/")) for f in files)

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts), compression=None) as f:
            return f.read()

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Readers see the old content or all of the new: a temporary name then a rename where renames are atomic
        (object-store writes are all-or-nothing by themselves)."""
        target = self.path(*parts)
        if not self.atomic_rename:
            with self.fs.open_output_stream(target, compression=None) as f:
                f.write(data)
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        write_atomic(target, data)

    def upload(self, local_file: str, *parts: str) -> None:
        pafs.copy_files(local_file, self.path(*parts), destination_filesystem=self.fs)

    def download(self, local_dir: str, *parts: str) -> None:
        """Copy a directory tree of the storage into a local directory."""
        pafs.copy_files(self.path(*parts), local_dir, source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())

    def move(self, src: str, dst: str) -> None:
        self.fs.move(self.path(src), self.path(dst))

    def delete_dir(self, *parts: str) -> None:
        self.fs.delete_dir(self.path(*parts))

    def sha256(self, *parts: str) -> tuple[str, int]:
        """(hex digest, size in bytes) of a file, read in chunks."""
        with self.fs.open_input_stream(self.path(*parts), compression=None) as f:
            return _digest(f)


def local_sha256(path: str) -> tuple[str, int]:
    """(hex digest, size) of a file on the local disk, where the engine's staging files are."""
    with open(path, "rb") as f:
        return _digest(f)


def _digest(stream) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size
