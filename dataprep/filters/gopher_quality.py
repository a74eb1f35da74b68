"""Gopher quality rules (Rae et al. 2021, "Scaling Language Models", appendix A): word statistics of prose."""

from __future__ import annotations

import re

from dataprep.config import GopherQualityConfig
from dataprep.filters.base import BaseFilter, Verdict

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_PUNCT_TOKEN = re.compile(r"(?<!\S)[!-/:-@\[-`{-~]+(?!\S)")
_NO_LETTER_TOKEN = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")
_BULLETS = ("•", "-", "*", "‣", "⁃", "◦", "▪")


class GopherQualityFilter(BaseFilter):
    name = "gopher_quality"

    def __init__(self, config: GopherQualityConfig):
        self.c = config

    def check(self, text: str) -> Verdict:
        c = self.c
        words = text.split()
        punct = _PUNCT_TOKEN.findall(text)
        n = len(words) - len(punct)
        if n < c.min_words:
            return "gopher_quality_too_few_words"
        if n > c.max_words:
            return "gopher_quality_too_many_words"
        mean = (sum(map(len, words)) - sum(map(len, punct))) / n if n else 0.0
        if not c.min_avg_word_length <= mean <= c.max_avg_word_length:
            return "gopher_quality_word_length"
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols > c.max_symbol_word_ratio * max(len(words), 1):
            return "gopher_quality_symbols"
        lines = text.splitlines() or [""]
        if sum(line.lstrip().startswith(_BULLETS) for line in lines) > c.max_bullet_lines_ratio * len(lines):
            return "gopher_quality_bullet_lines"
        ellipsis = sum(line.rstrip().endswith(("...", "…")) for line in lines)
        if ellipsis > c.max_ellipsis_lines_ratio * len(lines):
            return "gopher_quality_ellipsis_lines"
        if len(words) - len(_NO_LETTER_TOKEN.findall(text)) < c.min_alpha_words_ratio * len(words):
            return "gopher_quality_alpha_words"
        if c.min_stop_words and sum(map(STOP_WORDS.__contains__, text.lower().split())) < c.min_stop_words:
            return "gopher_quality_stop_words"
        return None
