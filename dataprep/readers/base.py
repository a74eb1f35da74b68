"""What every reader yields, and how a source's path becomes an ordered list of files.

Readers never raise on a bad record: they yield it with the reason, so the stage can count it with file and line
(or stop, in strict mode) and the conservation check still balances.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from orchestrator.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


Span = tuple[int, int, int]  # (start, stop, index of its first record): bytes of JSONL, row groups of Parquet
WHOLE_FILE: Span = (0, -1, 0)


@dataclass(frozen=True)
class Record:
    """One document as read: `text` is None when the record is bad, and `problem` says why."""

    index: int  # 0-based record number in its file (the line for JSONL)
    doc_id: str
    text: str | None
    problem: str = ""  # reason code: malformed_json, missing_field, too_large, invalid_utf8, unreadable_file
    detail: str = ""
    repaired: bool = False  # invalid UTF-8 replaced by U+FFFD


class BadInput(DataError):
    """A bad record or file in strict mode; names the file and line."""


def detect_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text"


def split_file(path: str, fmt: str, text_field: str, span_bytes: int) -> list[Span]:
    """The spans of a file that separate tasks may read: about `span_bytes` each for plain JSONL (cut at line
    starts) and Parquet (whole row groups); one for compressed or text files, or when `span_bytes` is 0."""
    from dataprep.readers.jsonl import is_splittable, line_spans
    from dataprep.readers.parquet import row_group_spans

    if span_bytes <= 0:
        return [WHOLE_FILE]
    fmt = detect_format(path, fmt)
    try:
        if fmt == "jsonl" and is_splittable(path):
            return line_spans(path, span_bytes)
        if fmt == "parquet":
            return row_group_spans(path, text_field, span_bytes)
    except (OSError, ValueError):  # reported as an unreadable file by the task that reads it whole
        pass
    return [WHOLE_FILE]


def read_records(path: str, fmt: str, text_field: str, id_field: str, max_doc_bytes: int,
                 repair_utf8: bool, span: Span = WHOLE_FILE) -> Iterator[Record]:
    """Records of one file (or of one span of it); an unreadable file yields one bad record instead of raising."""
    from dataprep.readers.jsonl import read_jsonl
    from dataprep.readers.parquet import read_parquet
    from dataprep.readers.text import read_text_file

    fmt = detect_format(path, fmt)
    try:
        if fmt == "jsonl":
            yield from read_jsonl(path, text_field, id_field, max_doc_bytes, repair_utf8, span)
        elif fmt == "parquet":
            yield from read_parquet(path, text_field, id_field, max_doc_bytes, span)
        else:
            yield from read_text_file(path, max_doc_bytes, repair_utf8)
    except (OSError, EOFError, ValueError) as e:
        yield Record(-1, os.path.basename(path), None, "unreadable_file", f"{type(e).__name__}: {e}")


def decode_utf8(data: bytes, repair: bool) -> tuple[str | None, bool]:
    """Text of `data` and whether it was repaired; None when invalid and not repaired."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return (data.decode("utf-8", errors="replace"), True) if repair else (None, False)
