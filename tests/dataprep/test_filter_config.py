"""The prep config's filter sections map onto the filters' keywords: defaults agree, every field reaches its filter;
the chain's verdicts do not depend on how documents are batched."""

from __future__ import annotations

import dataclasses
import gzip
import json

import pytest

from dataprep.config import (
    C4Config,
    DecontaminationConfig,
    FiltersConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
    PiiConfig,
)
from dataprep.filters import build_filters, filter_for
from dataprep.filters.base import FILTER_BATCH_CHARS, apply_filters
from dataprep.filters.from_config import FILTER_OF_SECTION
from dataprep.normalize import normalize_text


def test_the_configs_defaults_are_the_papers():
    """A default prep config builds each filter exactly as its keyword defaults do (decontamination is off until
    evaluation files are given)."""
    chain = build_filters(FiltersConfig())
    assert [type(f) for f in chain] == [f for s, f in FILTER_OF_SECTION.items() if s is not DecontaminationConfig]
    for built in chain:
        assert vars(built) == vars(type(built)())


@pytest.mark.parametrize("section", [GopherQualityConfig, GopherRepetitionConfig, C4Config, PiiConfig])
def test_every_field_reaches_the_filter(section):
    """Each field set away from its default changes the built filter: no setting is silently dropped."""
    default = vars(filter_for(section()))
    for f in dataclasses.fields(section):
        if f.name == "enabled":
            continue
        value = getattr(section(), f.name)
        changed = not value if isinstance(value, bool) else value + ("x" if isinstance(value, str) else 1)
        assert vars(filter_for(section(**{f.name: changed}))) != default, f.name


def test_language_list_and_disabled_sections():
    language = filter_for(LanguageConfig(languages="en, fr,,de", min_score=0.5))
    assert language.languages == {"en", "fr", "de"} and language.min_score == 0.5
    off = FiltersConfig(c4=C4Config(enabled=False), language=LanguageConfig(enabled=False))
    assert [f.name for f in build_filters(off)] == ["gopher_quality", "gopher_repetition", "pii"]
    assert [f.name for f in build_filters(off, kind="code")] == ["pii"], "code skips the quality filters only"


def test_the_chain_gives_each_document_the_verdict_it_gets_alone(sample_corpora):
    """The chain takes a part of the corpus a batch of characters at a time: every document's verdict and edited
    text are what it gets in a batch of its own, across the batches' edges too."""
    texts = []
    for name in ("wiki_vital_en", "fortunes", "kjv", "postgres_docs", "wiki_vital_fr", "python_docs"):
        with gzip.open(sample_corpora[name], "rt") as f:
            texts += [normalize_text(json.loads(line)["text"]) for line in f]
    assert sum(map(len, texts)) > 2 * FILTER_BATCH_CHARS, "the part spans several batches"
    chain = build_filters(FiltersConfig(pii=PiiConfig(enabled=True)))
    together, reasons, edits = apply_filters(chain, texts)
    alone = [apply_filters(chain, [t]) for t in texts]
    assert together == [a[0][0] for a in alone] and reasons == [a[1][0] for a in alone]
    assert len(set(reasons)) > 2, "kept and several reasons of dropping: the chain decided something"
    summed: dict[str, int] = {}
    for _, _, counts in alone:
        for name, n in counts.items():
            summed[name] = summed.get(name, 0) + n
    assert edits == summed
