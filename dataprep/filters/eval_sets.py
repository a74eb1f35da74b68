"""Evaluation sets for decontamination, read from files: JSONL (one item per line) or plain text (one per line).

A set is named by its file name without extensions (`hellaswag_val.jsonl.gz` → `hellaswag_val`, lower-cased,
other characters than letters and digits made `_`): the name appears in the removal reason and the report. Items
are normalized as documents are (`normalize_text`), so both sides of a comparison saw the same cleanup. Every
problem (a missing or unreadable file, a line that is not a JSON object or lacks the text fields, a set without
items, two files of one name) is an `EvalSetError` naming the file and line; the prep config reads the sets when
it is parsed, so the error comes before any stage runs.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
from dataclasses import dataclass

from dataprep.normalize import normalize_text
from orchestrator.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class EvalSetError(DataError):
    """An evaluation file cannot be used; the message names it (and the line)."""


@dataclass(frozen=True)
class EvalSet:
    name: str
    path: str
    items: tuple[str, ...]


def set_name(path: str) -> str:
    base = os.path.basename(path).lower().removesuffix(".gz")
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return re.sub(r"[^a-z0-9]+", "_", stem).strip("_") or "eval"


def read_eval_sets(files: tuple[str, ...], fields: tuple[str, ...]) -> list[EvalSet]:
    """The sets in the order listed; read once per process while the files are unchanged."""
    return _read_all(files, fields, file_stamps(files))


def file_stamps(files: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """(modification time, size) of each file: what a cache of their contents is keyed by."""
    stamps = []
    for path in files:
        try:
            stat = os.stat(path)
        except OSError as e:
            raise EvalSetError(f"{path}: {_reason(e)}") from None
        stamps.append((stat.st_mtime_ns, stat.st_size))
    return tuple(stamps)


@functools.lru_cache(maxsize=8)
def _read_all(files: tuple[str, ...], fields: tuple[str, ...], stamps: tuple) -> list[EvalSet]:
    sets, named = [], {}
    for path in files:
        name = set_name(path)
        if name in named:
            raise EvalSetError(f"{named[name]} and {path} are both the evaluation set {name!r}; rename one")
        named[name] = path
        sets.append(EvalSet(name, path, tuple(_read_items(path, fields))))
    return sets


def _read_items(path: str, fields: tuple[str, ...]) -> list[str]:
    jsonl = path.lower().removesuffix(".gz").endswith(JSONL_SUFFIXES)
    items = []
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else
              open(path, encoding="utf-8")) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                text = _item_text(line, fields, f"{path}:{number}") if jsonl else line
                if text := normalize_text(text):
                    items.append(text)
    except UnicodeDecodeError as e:
        raise EvalSetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a line)") from None
    except (OSError, EOFError) as e:
        raise EvalSetError(f"{path}: {_reason(e)}") from None
    if not items:
        raise EvalSetError(f"{path}: holds no items")
    return items


def _item_text(line: str, fields: tuple[str, ...], where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise EvalSetError(f"{where}: not JSON ({e.msg}); a JSONL evaluation set holds one object per line") from None
    if not isinstance(record, dict):
        raise EvalSetError(f"{where}: a JSON {type(record).__name__}, expected an object")
    parts = []
    for name in fields:
        value = record.get(name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, (str, int, float)) and not isinstance(v, bool):
                parts.append(str(v))
            elif v is not None:
                raise EvalSetError(f"{where}: field {name!r} holds {type(v).__name__}, expected text or a list of it")
    if not parts:
        raise EvalSetError(f"{where}: none of the fields {', '.join(fields)} (filters.decontamination.text_fields)")
    return "\n".join(parts)


def _reason(error: OSError | EOFError) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError):
        return "is a directory, expected a file"
    if isinstance(error, PermissionError):
        return "cannot be read (permission denied)"
    return f"cannot be read ({getattr(error, 'strerror', None) or error})"
