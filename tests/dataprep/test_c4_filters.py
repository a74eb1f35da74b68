"""C4 rules on real text against a line-by-line restatement of them, with javascript and policy lines planted."""

from __future__ import annotations

import gzip
import itertools
import json
import re

import pytest

from dataprep.config import C4Config
from dataprep.filters import filter_for
from dataprep.filters.base import Edit
from dataprep.normalize import normalize_text

POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def _reference(text: str, c: C4Config):
    if c.drop_lorem_ipsum and "lorem ipsum" in text.lower():
        return "c4_lorem_ipsum"
    if c.drop_curly_bracket and "{" in text:
        return "c4_curly_bracket"
    kept = []
    for line in text.split("\n"):
        s = line.strip()
        if s and ((c.drop_lines_without_terminal_punct and not s.endswith((".", "?", "!", '"', "'", "”", "’")))
                  or len(s.split()) < c.min_words_per_line
                  or (c.drop_javascript_lines and "javascript" in s.lower())
                  or (c.drop_policy_lines and any(p in s.lower() for p in POLICY))):
            continue
        kept.append(line)
    cleaned = "\n".join(kept)
    if len(re.findall(r"[.?!]+(?:\s|$)", cleaned)) < c.min_sentences:
        return "c4_too_few_sentences"
    return cleaned if cleaned != text else None


@pytest.fixture(scope="module")
def texts(sample_corpora):
    out = []
    for name in ("wiki_vital_en", "kjv", "python_docs", "django_code", "fortunes"):
        with gzip.open(sample_corpora[name], "rt", encoding="utf-8") as f:
            out += [normalize_text(json.loads(line)["text"]) for line in itertools.islice(f, 80)]
    planted = [t.replace(". ", ". Please enable JavaScript to view this.\n", 1) for t in out[:40:3]]
    planted += [t.replace(". ", ". This site uses cookies, see our Privacy Policy.\n", 1) for t in out[1:40:3]]
    return out + planted


@pytest.mark.parametrize("config", [C4Config(), C4Config(drop_lines_without_terminal_punct=False,
                                                         min_words_per_line=0)], ids=["default", "lenient"])
def test_verdicts_and_cleaned_text_follow_the_rules_line_by_line(texts, config):
    rules = filter_for(config)
    verdicts = rules.apply(texts)
    assert [str(v) if isinstance(v, Edit) else v for v in verdicts] == [_reference(t, config) for t in texts]
    cleaned = [v for v in verdicts if isinstance(v, Edit)]
    assert len(cleaned) >= 4 and not any("javascript" in v.lower() or "privacy policy" in v.lower() for v in cleaned)
