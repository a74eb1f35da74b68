"""Quality scores of documents from a learned classifier: a fastText model or a Hugging Face sequence classifier.

- fastText (`pretrain prep train-quality`, DCLM's recipe): the score is the probability of the positive label
  `__label__hq`, read from the first `max_chars` characters of a document (whitespace as fastText splits it).
- Hugging Face (`AutoModelForSequenceClassification`, e.g. FineWeb-Edu's classifier): the score is the logit of a
  one-output regression head, or the last label's probability for a classifier of several labels; documents are
  truncated to the model's maximum length and scored `batch_size` at a time, in the order given.

`PartScorer` is the callable class that Ray Data's actors run (`map_batches(PartScorer, compute=...)`): a row
is one Parquet part of kept documents, and the actor writes the part's scores beside it. The scorer batches the
documents of one part itself, in key order, so a document's batch, and so its score, does not depend on how Ray
Data groups rows or how many actors run: padded batches of other sizes give other floating-point results on GPUs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from dataprep.executor import read_table, write_table_atomic
from dataprep.filters.fasttext_predict import predict_lines
from orchestrator.errors import UserError

POSITIVE, NEGATIVE = "__label__hq", "__label__lq"
_CHARS_PER_TOKEN = 50  # a Hugging Face tokenizer reads at most this many characters per token it may keep


class QualityModelError(UserError):
    """The quality model cannot be loaded or is not the kind configured; the message names the file."""


@functools.lru_cache(maxsize=2)
def _load_fasttext(path: str, stamp: tuple) -> object:
    import fasttext

    try:
        model = fasttext.load_model(path)
    except ValueError as e:
        raise QualityModelError(f"{path}: not a fastText model ({e})") from None
    labels = set(model.get_labels())
    if POSITIVE not in labels:
        raise QualityModelError(f"{path}: a fastText model without the label {POSITIVE} (its labels: "
                                f"{', '.join(sorted(labels))}); train one with `pretrain prep train-quality`")
    return model


def load_fasttext(path: str) -> object:
    """The model at `path`, loaded once per process while the file is unchanged (a Ray worker outlives a run)."""
    if not os.path.isfile(path):
        raise QualityModelError(f"{path!r} is not a file; train a model with `pretrain prep train-quality`")
    info = os.stat(path)
    return _load_fasttext(path, (info.st_mtime_ns, info.st_size))


class FastTextScorer:
    def __init__(self, model: str, max_chars: int = 0):
        self.model, self.max_chars = load_fasttext(model), max_chars

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, np.float32)
        cut = [t[: self.max_chars] if self.max_chars else t for t in texts]
        labels, probs = predict_lines(self.model, cut, k=2)
        return np.array([p[list(top).index(POSITIVE)] if POSITIVE in top else 0.0
                         for top, p in zip(labels, probs, strict=True)], np.float32)


class HFScorer:
    """A sequence classifier on the GPU when there is one; `max_tokens` 0 reads as many tokens as the model takes."""

    def __init__(self, model: str, batch_size: int = 32, max_tokens: int = 0, device: str = ""):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForSequenceClassification.from_pretrained(model).eval().to(self.device)
        self.batch_size = batch_size
        self.max_length = max_tokens or model_max_length(self.tokenizer, self.model.config)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = [np.zeros(0, np.float32)]
        cut = [t[: self.max_length * _CHARS_PER_TOKEN] for t in texts]
        for lo in range(0, len(cut), self.batch_size):
            encoded = self.tokenizer(cut[lo: lo + self.batch_size], truncation=True, max_length=self.max_length,
                                     padding=True, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                logits = self.model(**encoded).logits.float()
            scores = logits[:, 0] if logits.shape[1] == 1 else logits.softmax(-1)[:, -1]
            out.append(scores.cpu().numpy().astype(np.float32))
        return np.concatenate(out)


def model_max_length(tokenizer, config) -> int:
    """The tokens a model reads: the tokenizer's limit, else the position embeddings' (a tokenizer saved without a
    limit reports a huge sentinel)."""
    limits = [n for n in (tokenizer.model_max_length, getattr(config, "max_position_embeddings", None))
              if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else 512


def make_scorer(type: str, model: str, batch_size: int = 32, max_tokens: int = 0, max_chars: int = 0):
    """The scorer of a `filters.quality` section's keywords."""
    if type == "fasttext":
        return FastTextScorer(model, max_chars)
    return HFScorer(model, batch_size, max_tokens)


class PartScorer:
    """Ray Data actor: each row names a Parquet part of (key, text); its (key, score) table is written under the
    same file name into `directory`."""

    def __init__(self, directory: str, **keywords):
        self.directory, self.score = directory, make_scorer(**keywords)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        docs = []
        for part in batch["part"]:
            table = read_table(part, columns=["key", "text"])
            scores = self.score(table.column("text").to_pylist())
            write_table_atomic(pa.table({"key": table.column("key"), "score": pa.array(scores, pa.float32())}),
                               os.path.join(self.directory, os.path.basename(part)))
            docs.append(len(scores))
        return {"part": batch["part"], "docs": np.array(docs, np.int64)}


def model_problem(type: str, model: str) -> str:
    """Why the configured model cannot be used ('' if it can), found before any stage runs: a missing file, a file
    that is not a fastText model of the two labels, a directory without a model's config."""
    if type == "fasttext":
        try:
            load_fasttext(model)
        except QualityModelError as e:
            return str(e)
        return ""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            return f"{model!r} holds no config.json: not a Hugging Face model directory"
        return ""
    if os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") != 1:
        return f"{model!r} is not a model directory nor a Hugging Face Hub name (organisation/model)"
    return ""
