"""A plain text file is one document; its id is the file name."""

from __future__ import annotations

import os
from collections.abc import Iterator

from dataprep import filesystem
from dataprep.readers.base import Record, decode_utf8


def read_text_file(path: str, max_doc_bytes: int, repair: bool) -> Iterator[Record]:
    name = os.path.basename(path)
    size = filesystem.size(path)
    if size > max_doc_bytes:
        yield Record(0, name, None, "too_large", f"{size:,} bytes > max_doc_bytes")
        return
    data = filesystem.read_bytes(path)
    text, repaired = decode_utf8(data, repair)
    if text is None:
        yield Record(0, name, None, "invalid_utf8", "bytes are not valid UTF-8")
    else:
        yield Record(0, name, text, repaired=repaired)
