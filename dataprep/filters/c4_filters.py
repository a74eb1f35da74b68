"""C4 rules (Raffel et al. 2020, section 2.2): clean lines, then drop what is left if it is not prose."""

from __future__ import annotations

import re

from dataprep.config import C4Config
from dataprep.filters.base import BaseFilter, Edit, Verdict

_TERMINAL = (".", "?", "!", '"', "'", "”", "’")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE_END = re.compile(r"[.?!]+(?:\s|$)")


class C4QualityFilter(BaseFilter):
    name = "c4"

    def __init__(self, config: C4Config):
        self.c = config

    def check(self, text: str) -> Verdict:
        c = self.c
        lowered = text.lower()
        if c.drop_lorem_ipsum and "lorem ipsum" in lowered:
            return "c4_lorem_ipsum"
        if c.drop_curly_bracket and "{" in text:
            return "c4_curly_bracket"
        # A line can mention javascript or a policy only if the document does: most documents skip those tests.
        javascript = c.drop_javascript_lines and "javascript" in lowered
        policy = c.drop_policy_lines and any(p in lowered for p in _POLICY)
        if javascript or policy or c.drop_lines_without_terminal_punct or c.min_words_per_line:
            cleaned = "\n".join(line for line in text.split("\n") if self._keep_line(line, javascript, policy))
        else:
            cleaned = text
        if len(_SENTENCE_END.findall(cleaned)) < c.min_sentences:
            return "c4_too_few_sentences"
        return Edit(cleaned) if len(cleaned) != len(text) else None

    def _keep_line(self, line: str, javascript: bool, policy: bool) -> bool:
        c = self.c
        stripped = line.strip()
        if not stripped:
            return True
        if c.drop_lines_without_terminal_punct and not stripped.endswith(_TERMINAL):
            return False
        if len(stripped.split()) < c.min_words_per_line:
            return False
        if not (javascript or policy):
            return True
        lowered = stripped.lower()
        if javascript and "javascript" in lowered:
            return False
        return not (policy and any(p in lowered for p in _POLICY))
