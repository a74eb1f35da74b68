"""Gopher quality rules (Rae et al. 2021, "Scaling Language Models", appendix A): word statistics of prose.

The keyword defaults are the paper's thresholds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dataprep.filters.base import BaseFilter, Verdict

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_PUNCT_TOKEN = re.compile(r"(?<!\S)[!-/:-@\[-`{-~]+(?!\S)")
_NO_LETTER_TOKEN = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")
_BULLETS = ("•", "-", "*", "‣", "⁃", "◦", "▪")


@dataclass(frozen=True, kw_only=True)
class GopherQualityFilter(BaseFilter):
    name = "gopher_quality"

    min_words: int = 50
    max_words: int = 100_000
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2

    def check(self, text: str) -> Verdict:
        words = text.split()
        punct = _PUNCT_TOKEN.findall(text)
        n = len(words) - len(punct)
        if n < self.min_words:
            return "gopher_quality_too_few_words"
        if n > self.max_words:
            return "gopher_quality_too_many_words"
        mean = (sum(map(len, words)) - sum(map(len, punct))) / n if n else 0.0
        if not self.min_avg_word_length <= mean <= self.max_avg_word_length:
            return "gopher_quality_word_length"
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols > self.max_symbol_word_ratio * max(len(words), 1):
            return "gopher_quality_symbols"
        lines = text.splitlines() or [""]
        if sum(line.lstrip().startswith(_BULLETS) for line in lines) > self.max_bullet_lines_ratio * len(lines):
            return "gopher_quality_bullet_lines"
        ellipsis = sum(line.rstrip().endswith(("...", "…")) for line in lines)
        if ellipsis > self.max_ellipsis_lines_ratio * len(lines):
            return "gopher_quality_ellipsis_lines"
        if len(words) - len(_NO_LETTER_TOKEN.findall(text)) < self.min_alpha_words_ratio * len(words):
            return "gopher_quality_alpha_words"
        if self.min_stop_words and sum(map(STOP_WORDS.__contains__, text.lower().split())) < self.min_stop_words:
            return "gopher_quality_stop_words"
        return None
