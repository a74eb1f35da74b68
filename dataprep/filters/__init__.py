"""Quality filters: each returns None to keep a document or the reason it is dropped (one counter per rule)."""

from dataprep.filters.base import BaseFilter
from dataprep.filters.from_config import build_filters, filter_for

__all__ = ["BaseFilter", "build_filters", "filter_for"]
