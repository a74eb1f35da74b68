"""Training a fastText quality classifier from labelled JSONL, as DCLM does: positive documents (text of the quality
wanted) against negative ones (the corpus as crawled), in as many sources of each as given.

A source is a JSONL file (`.gz` read too) whose documents all share a label (`--positive`, `--negative`), or whose
every line names its own in a label field (`--labelled`). A document is held out for the accuracy check by a hash of
its text (`held_out`), so the split is the same on every run and machine and a document repeated across sources
stays on one side. Training is single-threaded by default and runs in a fresh process (`dataprep.fasttext_fit`
says why), so the same inputs give the same model file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from dataprep.fasttext_fit import fit_supervised
from dataprep.filters.fasttext_predict import predict_lines
from dataprep.filters.quality_model import NEGATIVE, POSITIVE
from orchestrator.errors import UserError

POSITIVE_VALUES = (True, 1, "1", "true", "positive", "pos", "hq", "high")
NEGATIVE_VALUES = (False, 0, "0", "false", "negative", "neg", "lq", "low")
_HOLD_OUT_BUCKETS = 10_000


class TrainingDataError(UserError):
    """A labelled input is missing, unreadable or malformed; the message names the file and line."""


@dataclass
class TrainSettings:
    held_out: float = 0.1  # share of documents held out for the accuracy check
    epochs: int = 5
    lr: float = 0.1
    dim: int = 64
    word_ngrams: int = 2
    min_count: int = 1
    buckets: int = 262_144  # hashed word n-gram rows: the model file is about (buckets + words) × dim × 4 bytes
    threads: int = 1
    max_chars: int = 0  # characters of a document's start read; 0: all (use the same as filters.quality.max_chars)


@dataclass
class SourceCounts:
    path: str
    label: str  # "positive", "negative" or "labelled"
    documents: int = 0
    held_out: int = 0
    correct: int = 0
    labels: dict = field(default_factory=dict)


def held_out(text: str, share: float) -> bool:
    """Whether a document is in the held-out split: a hash of its text, so the split depends on nothing else."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _HOLD_OUT_BUCKETS < share * _HOLD_OUT_BUCKETS


def label_of(value: object, where: str, label_field: str) -> str:
    """POSITIVE or NEGATIVE for a label field's value, or a `TrainingDataError` naming what is allowed."""
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, bool) or key in (0, 1) or isinstance(key, str):
        if key in POSITIVE_VALUES:
            return POSITIVE
        if key in NEGATIVE_VALUES:
            return NEGATIVE
    raise TrainingDataError(f"{where}: label field {label_field!r} holds {value!r}; allowed: one of "
                            f"{', '.join(map(str, POSITIVE_VALUES))} (positive) or "
                            f"{', '.join(map(str, NEGATIVE_VALUES))} (negative)")


def read_labelled(path: str, label: str, text_field: str, label_field: str) -> Iterator[tuple[str, str]]:
    """(fastText label, text) of each document of a source; `label` is POSITIVE, NEGATIVE or '' (its field)."""
    if not os.path.isfile(path):
        raise TrainingDataError(f"{path!r} is not a file")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TrainingDataError(f"{where}: not a JSON object ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise TrainingDataError(f"{where}: no text field {text_field!r} (a string); set --text-field")
                if not label:
                    if label_field not in record:
                        raise TrainingDataError(f"{where}: no label field {label_field!r}; set --label-field")
                    yield label_of(record[label_field], where, label_field), record[text_field]
                else:
                    yield label, record[text_field]
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise TrainingDataError(f"{path}: cannot be read as UTF-8 JSONL ({e})") from None


def _line(text: str, max_chars: int) -> str:
    """A document as fastText reads it when scoring (`predict_lines`): its start, one line."""
    return (text[:max_chars] if max_chars else text).replace("\n", " ")


def train_quality(sources: list[tuple[str, str]], output: str, text_field: str = "text", label_field: str = "label",
                  settings: TrainSettings | None = None) -> dict:
    """Train on (path, 'positive' | 'negative' | 'labelled') sources, write the model to `output` atomically, and
    return the held-out accuracy overall and per source."""
    import fasttext

    s = settings or TrainSettings()
    labels = {"positive": POSITIVE, "negative": NEGATIVE, "labelled": ""}
    counts = [SourceCounts(path, kind) for path, kind in sources]
    test: list[tuple[int, str, str]] = []
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(output))) as tmp:
        train_path = os.path.join(tmp, "train.txt")
        with open(train_path, "w", encoding="utf-8") as train:
            for number, (path, kind) in enumerate(sources):
                for label, text in read_labelled(path, labels[kind], text_field, label_field):
                    line = _line(text, s.max_chars)
                    if not line.strip():
                        continue
                    counts[number].documents += 1
                    counts[number].labels[label] = counts[number].labels.get(label, 0) + 1
                    if held_out(text, s.held_out):
                        test.append((number, label, line))
                    else:
                        train.write(f"{label} {line}\n")
        totals = {label: sum(c.labels.get(label, 0) for c in counts) for label in (POSITIVE, NEGATIVE)}
        if not all(totals.values()):
            raise TrainingDataError(f"needs positive and negative documents; got {totals[POSITIVE]:,} positive "
                                    f"and {totals[NEGATIVE]:,} negative")
        if not test:
            raise TrainingDataError(f"no document fell in the held-out {s.held_out:.0%}; give more documents or a "
                                    "larger --held-out")
        model_tmp = os.path.join(tmp, "model.bin")
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            params = {"epoch": s.epochs, "lr": s.lr, "dim": s.dim, "wordNgrams": s.word_ngrams,
                      "minCount": s.min_count, "bucket": s.buckets, "thread": s.threads}
            diverged = child.submit(fit_supervised, train_path, model_tmp, params).result()
        if diverged:
            raise TrainingDataError(f"training diverged ({diverged}); lower --lr (got {s.lr:g})")
        os.replace(model_tmp, output)
    model = fasttext.load_model(output)
    predicted, _ = predict_lines(model, [line for _, _, line in test])
    for (number, label, _), top in zip(test, predicted, strict=True):
        counts[number].held_out += 1
        counts[number].correct += top[0] == label
    held = sum(c.held_out for c in counts)
    majority = max(sum(1 for _, label, _ in test if label == x) for x in (POSITIVE, NEGATIVE)) / held
    return {"model": output, "documents": sum(c.documents for c in counts), "held_out": held,
            "accuracy": sum(c.correct for c in counts) / held, "majority_baseline": majority,
            "sources": [{"path": c.path, "label": c.label, "documents": c.documents, "held_out": c.held_out,
                         "accuracy": c.correct / c.held_out if c.held_out else None} for c in counts]}
