"""The batched Gopher repetition rules give, on real text, the verdicts of the one-document definition."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from dataprep.config import GopherRepetitionConfig
from dataprep.filters import filter_for
from dataprep.normalize import normalize_text


def _first(path, count: int) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [normalize_text(json.loads(line)["text"]) for line in itertools.islice(f, count)]


@pytest.fixture(scope="module")
def texts(sample_corpora):
    out = [text for _, path in sorted(sample_corpora.items()) for text in _first(path, 50)]
    words = _first(sample_corpora["kjv"], 1)[0].split()  # prose (Genesis 1) to plant the repeats in
    # Repeats planted on real words: a doubled passage, a chorus, ties between equally frequent n-grams.
    out += [" ".join(words[:60] * 2), " ".join(words[:40] + words[5:12] * 6 + words[40:80]),
            " ".join(["to be or", "not to be"] * 5 + words[:30]), "one", "two words", "a b a b a b"]
    return [t for t in out if t]


def test_batched_verdicts_equal_the_definition(texts):
    rules = filter_for(GopherRepetitionConfig())
    batched = rules.apply(texts)
    assert batched == [rules.check(t) for t in texts]
    reasons = Counter(v for v in batched if v)
    assert len(reasons) >= 5 and sum(reasons.values()) < len(texts) / 2, reasons


def test_strict_thresholds_exercise_every_ngram_rule(texts):
    strict = GopherRepetitionConfig(dup_line_frac=1, dup_para_frac=1, dup_line_char_frac=1, dup_para_char_frac=1,
                                    top_2gram_frac=0.5, top_3gram_frac=0.08, top_4gram_frac=0.06,
                                    dup_5gram_frac=0.2, dup_6gram_frac=0.1, dup_7gram_frac=0.08,
                                    dup_8gram_frac=0.06, dup_9gram_frac=0.04, dup_10gram_frac=0.01)
    rules = filter_for(strict)
    batched = rules.apply(texts)
    assert batched == [rules.check(t) for t in texts]
    assert {v for v in batched if v} >= {f"gopher_repetition_top_{n}gram" for n in (3, 4)} | {
        f"gopher_repetition_dup_{n}gram" for n in (5, 10)}


def test_verdicts_do_not_depend_on_the_process_hash_seed(sample_corpora):
    """Word ids come from the salted `hash`: ties between top n-grams must not be broken by id order."""
    script = ("import gzip, itertools, json, sys\n"
              "from dataprep.config import GopherRepetitionConfig\n"
              "from dataprep.filters import filter_for\n"
              "from dataprep.normalize import normalize_text\n"
              "texts = []\n"
              "for path in sys.argv[1:]:\n"
              "    with gzip.open(path, 'rt') as f:\n"
              "        texts += [normalize_text(json.loads(x)['text']) for x in f]\n"
              "rules = filter_for(GopherRepetitionConfig())\n"
              "texts = [t for t in texts if t]\n"
              "print(json.dumps([rules.apply(texts), [rules.check(t) for t in texts]]))\n")
    # Short documents, where equally frequent top n-grams are common: quotes and encyclopedia leads in three languages.
    paths = [str(sample_corpora[name]) for name in ("fortunes", "wiki_vital_en", "wiki_vital_fr", "wiki_vital_es")]
    runs = [subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)]
    batched, single = json.loads(runs[0])
    assert runs[1] == runs[2] == runs[0] and batched == single
    assert sum(1 for v in batched if v and "top" in v) >= 5
