"""Quality filters: each returns None to keep a document or the reason it is dropped (one counter per rule)."""

from dataprep.filters.base import BaseFilter, build_filters

__all__ = ["BaseFilter", "build_filters"]
