"""Parquet files, read a row group at a time so a large file never sits in memory whole."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyarrow.parquet as pq

from dataprep import filesystem
from dataprep.readers.base import WHOLE_FILE, Record, Span


def row_group_spans(path: str, text_field: str, span_bytes: int) -> list[Span]:
    """Runs of whole row groups holding about `span_bytes` of uncompressed data, with the row each starts at.

    A file without the text column stays whole, so its one "missing column" record is counted once.
    """
    file = pq.ParquetFile(filesystem.open_native(path))
    meta = file.metadata
    if text_field not in file.schema_arrow.names or meta.num_row_groups < 2:
        return [WHOLE_FILE]
    spans, first_group, first_row, size, rows = [], 0, 0, 0, 0
    for group in range(meta.num_row_groups):
        size += meta.row_group(group).total_byte_size
        rows += meta.row_group(group).num_rows
        if size >= span_bytes or group == meta.num_row_groups - 1:
            spans.append((first_group, group + 1, first_row))
            first_group, first_row, size = group + 1, first_row + rows, 0
            rows = 0
    return spans if len(spans) > 1 else [WHOLE_FILE]


def read_parquet(path: str, text_field: str, id_field: str, max_doc_bytes: int,
                 span: Span = WHOLE_FILE) -> Iterator[Record]:
    """Records of the file, or of the row groups [start, stop) of `span`, numbered by row in the file."""
    name = os.path.basename(path)
    start, stop, index = span
    file = pq.ParquetFile(filesystem.open_native(path))
    names = file.schema_arrow.names
    if text_field not in names:
        yield Record(-1, name, None, "missing_field", f"no column {text_field!r} (columns: {', '.join(names)})")
        return
    columns = [text_field] + ([id_field] if id_field and id_field in names else [])
    groups = range(start, stop) if stop >= 0 else None
    for batch in file.iter_batches(batch_size=4096, columns=columns, row_groups=groups):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
        for text, doc_id in zip(texts, ids, strict=True):
            doc_id = str(doc_id) if doc_id is not None else f"{name}:{index + 1}"
            if not isinstance(text, str):
                yield Record(index, doc_id, None, "missing_field", f"{text_field!r} is null")
            elif len(text) > max_doc_bytes and len(text.encode()) > max_doc_bytes:
                yield Record(index, doc_id, None, "too_large", f"{len(text.encode()):,} bytes > max_doc_bytes")
            else:
                yield Record(index, doc_id, text)
            index += 1
