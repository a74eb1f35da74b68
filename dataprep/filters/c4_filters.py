"""C4 rules (Raffel et al. 2020, section 2.2): clean lines, then drop what is left if it is not prose.

The keyword defaults are the paper's: lines ending in terminal punctuation with at least 3 words, pages of at
least 5 sentences, no lorem ipsum, no curly bracket, no javascript or policy lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dataprep.filters.base import BaseFilter, Edit, Verdict

_TERMINAL = (".", "?", "!", '"', "'", "”", "’")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE_END = re.compile(r"[.?!]+(?:\s|$)")


@dataclass(frozen=True, kw_only=True)
class C4QualityFilter(BaseFilter):
    name = "c4"

    drop_lines_without_terminal_punct: bool = True
    min_words_per_line: int = 3
    drop_javascript_lines: bool = True
    drop_policy_lines: bool = True
    drop_lorem_ipsum: bool = True
    drop_curly_bracket: bool = True
    min_sentences: int = 5

    def check(self, text: str) -> Verdict:
        lowered = text.lower()
        if self.drop_lorem_ipsum and "lorem ipsum" in lowered:
            return "c4_lorem_ipsum"
        if self.drop_curly_bracket and "{" in text:
            return "c4_curly_bracket"
        # A line can mention javascript or a policy only if the document does: most documents skip those tests.
        javascript = self.drop_javascript_lines and "javascript" in lowered
        policy = self.drop_policy_lines and any(p in lowered for p in _POLICY)
        if javascript or policy or self.drop_lines_without_terminal_punct or self.min_words_per_line:
            cleaned = "\n".join(line for line in text.split("\n") if self._keep_line(line, javascript, policy))
        else:
            cleaned = text
        if len(_SENTENCE_END.findall(cleaned)) < self.min_sentences:
            return "c4_too_few_sentences"
        return Edit(cleaned) if len(cleaned) != len(text) else None

    def _keep_line(self, line: str, javascript: bool, policy: bool) -> bool:
        stripped = line.strip()
        if not stripped:
            return True
        if self.drop_lines_without_terminal_punct and not stripped.endswith(_TERMINAL):
            return False
        if len(stripped.split()) < self.min_words_per_line:
            return False
        if not (javascript or policy):
            return True
        lowered = stripped.lower()
        if javascript and "javascript" in lowered:
            return False
        return not (policy and any(p in lowered for p in _POLICY))
