"""Document keys and file ids: the bit layout that orders dedup survivors and routes removals back to their file.

A document's key is (source rank, file index, record) packed into 63 bits; its file id is the key without the
record bits. The dedup stage names removal lists by file id and the pack stage seeds each file's shuffle with it,
so every stage must derive both from these functions: a second copy of the widths would silently misroute.
"""

from __future__ import annotations

import numpy as np

SOURCE_BITS, FILE_BITS, RECORD_BITS = 12, 20, 31


def file_id(source_rank: int, file_index: int) -> int:
    """A file's id: its source's dedup rank, then its index within the source."""
    return (source_rank << FILE_BITS) | file_index


def doc_key(source_rank: int, file_index: int, record: int) -> int:
    """A document's 63-bit key: its dedup rank (source priority, file, record) and its stable identity."""
    return (file_id(source_rank, file_index) << RECORD_BITS) | record


def file_of(keys: np.ndarray) -> np.ndarray:
    """The file id of each key."""
    return keys >> RECORD_BITS
