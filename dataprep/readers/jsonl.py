"""JSON Lines, plain or compressed with gzip or zstd (pyarrow's codecs, so no extra dependency)."""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from typing import IO

import pyarrow as pa

from dataprep.readers.base import Record, decode_utf8


def open_binary(path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(pa.CompressedInputStream(pa.OSFile(path, "rb"), "zstd"), buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


def read_jsonl(path: str, text_field: str, id_field: str, max_doc_bytes: int, repair: bool) -> Iterator[Record]:
    name = os.path.basename(path)
    with open_binary(path) as f:
        for index, line in enumerate(f):
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
