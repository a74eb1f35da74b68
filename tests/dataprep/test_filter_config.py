"""The prep config's filter sections map onto the filters' keywords: defaults agree, every field reaches its filter."""

from __future__ import annotations

import dataclasses

import pytest

from dataprep.config import C4Config, FiltersConfig, GopherQualityConfig, GopherRepetitionConfig, LanguageConfig
from dataprep.filters import build_filters, filter_for
from dataprep.filters.from_config import FILTER_OF_SECTION


def test_the_configs_defaults_are_the_papers():
    """A default prep config builds each filter exactly as its keyword defaults do."""
    chain = build_filters(FiltersConfig())
    assert [type(f) for f in chain] == list(FILTER_OF_SECTION.values())
    for built in chain:
        assert vars(built) == vars(type(built)())


@pytest.mark.parametrize("section", [GopherQualityConfig, GopherRepetitionConfig, C4Config])
def test_every_field_reaches_the_filter(section):
    """Each field set away from its default changes the built filter: no setting is silently dropped."""
    default = vars(filter_for(section()))
    for f in dataclasses.fields(section):
        if f.name == "enabled":
            continue
        value = getattr(section(), f.name)
        changed = not value if isinstance(value, bool) else value + 1
        assert vars(filter_for(section(**{f.name: changed}))) != default, f.name


def test_language_list_and_disabled_sections():
    language = filter_for(LanguageConfig(languages="en, fr,,de", min_score=0.5))
    assert language.languages == {"en", "fr", "de"} and language.min_score == 0.5
    off = FiltersConfig(c4=C4Config(enabled=False), language=LanguageConfig(enabled=False))
    assert [f.name for f in build_filters(off)] == ["gopher_quality", "gopher_repetition"]
