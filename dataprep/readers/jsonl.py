"""JSON Lines, plain or compressed with gzip or zstd (pyarrow's codecs, so no extra dependency)."""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from typing import IO

import pyarrow as pa

from dataprep import filesystem
from dataprep.readers.base import WHOLE_FILE, Record, Span, decode_utf8


def open_binary(path: str) -> IO[bytes]:
    """The file's decompressed bytes, from a disk or an object store (`dataprep.filesystem`)."""
    if path.endswith(".gz"):
        return gzip.open(filesystem.open_binary(path) if filesystem.is_remote(path) else path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(pa.CompressedInputStream(filesystem.open_native(path), "zstd"), buffer_size=1 << 20)
    return filesystem.open_binary(path)


def is_splittable(path: str) -> bool:
    """Only an uncompressed file can be entered at a byte offset."""
    return not path.endswith((".gz", ".zst"))


def line_spans(path: str, span_bytes: int) -> list[Span]:
    """Byte ranges of about `span_bytes` each, cut after a newline, with the 0-based line number each starts at.

    Counting the newlines before each cut is one pass of `bytes.count` over the file: cheap next to parsing it,
    and it lets a range number its records exactly as one reader of the whole file would.
    """
    size = filesystem.size(path)
    if size <= span_bytes:
        return [WHOLE_FILE]
    spans, start, first_index = [], 0, 0
    with filesystem.open_binary(path) as f:
        while start < size:
            chunk = f.read(span_bytes)
            if not chunk.endswith(b"\n"):
                chunk += f.readline()
            if not chunk:
                break
            spans.append((start, start + len(chunk), first_index))
            first_index += chunk.count(b"\n")
            start += len(chunk)
    return spans


def _lines_until(f: IO[bytes], limit: int) -> Iterator[bytes]:
    consumed = 0
    while consumed < limit:
        line = f.readline()
        if not line:
            return
        consumed += len(line)
        yield line


def read_jsonl(path: str, text_field: str, id_field: str, max_doc_bytes: int, repair: bool,
               span: Span = WHOLE_FILE) -> Iterator[Record]:
    """Records of the file, or of the byte range `span` of a plain file (see `line_spans`), numbered by file line."""
    name = os.path.basename(path)
    start, stop, first_index = span
    with open_binary(path) as f:
        lines: Iterator[bytes] = f
        if stop >= 0:
            f.seek(start)
            lines = _lines_until(f, stop - start)
        for index, line in enumerate(lines, first_index):
            doc_id = f"{name}:{index + 1}"
            if not line.strip():
                yield Record(index, doc_id, None, "malformed_json", "blank line")
                continue
            if len(line) > max_doc_bytes:
                yield Record(index, doc_id, None, "too_large", f"{len(line):,} bytes > max_doc_bytes")
                continue
            decoded, repaired = decode_utf8(line, repair)
            if decoded is None:
                yield Record(index, doc_id, None, "invalid_utf8", "bytes are not valid UTF-8")
                continue
            try:
                obj = json.loads(decoded)
            except json.JSONDecodeError as e:
                yield Record(index, doc_id, None, "malformed_json", f"{e.msg} (column {e.colno})")
                continue
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                what = "not an object" if not isinstance(obj, dict) else f"no string field {text_field!r}"
                yield Record(index, doc_id, None, "missing_field", what)
                continue
            if id_field and isinstance(obj.get(id_field), (str, int)):
                doc_id = str(obj[id_field])
            yield Record(index, doc_id, text, repaired=repaired)
