"""Parquet files, read a row group at a time so a large file never sits in memory whole."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyarrow.parquet as pq

from dataprep.readers.base import Record


def read_parquet(path: str, text_field: str, id_field: str, max_doc_bytes: int) -> Iterator[Record]:
    name = os.path.basename(path)
    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    if text_field not in names:
        yield Record(-1, name, None, "missing_field", f"no column {text_field!r} (columns: {', '.join(names)})")
        return
    columns = [text_field] + ([id_field] if id_field and id_field in names else [])
    index = 0
    for batch in file.iter_batches(batch_size=4096, columns=columns):
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
