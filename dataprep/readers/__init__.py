"""Corpus readers: JSONL (plain, .gz, .zst), Parquet and directories of text files, one record per document."""

from dataprep.filesystem import list_files
from dataprep.readers.base import BadInput, Record, read_records

__all__ = ["BadInput", "Record", "list_files", "read_records"]
