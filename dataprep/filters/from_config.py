"""The one place where the prep config's filter sections become filter keywords.

`dataprep.config` is the user's schema (YAML sections with help texts and bounds); a filter takes plain keywords
whose defaults are its paper's. A section's fields are named like its filter's keywords, so it maps by name, less
`enabled`; only the language list is written differently (comma-separated in YAML, a sequence in code).
"""

from __future__ import annotations

import dataclasses

from dataprep.config import C4Config, FiltersConfig, GopherQualityConfig, GopherRepetitionConfig, LanguageConfig
from dataprep.filters.base import BaseFilter
from dataprep.filters.c4_filters import C4QualityFilter
from dataprep.filters.gopher_quality import GopherQualityFilter
from dataprep.filters.gopher_repetition import GopherRepetitionFilter
from dataprep.filters.language import LanguageFilter

FILTER_OF_SECTION: dict[type, type[BaseFilter]] = {
    GopherQualityConfig: GopherQualityFilter, GopherRepetitionConfig: GopherRepetitionFilter,
    C4Config: C4QualityFilter, LanguageConfig: LanguageFilter,
}


def filter_keywords(section: GopherQualityConfig | GopherRepetitionConfig | C4Config | LanguageConfig) -> dict:
    """The keywords of the section's filter."""
    keywords = {k: v for k, v in dataclasses.asdict(section).items() if k != "enabled"}
    if isinstance(section, LanguageConfig):
        keywords["languages"] = tuple(x.strip() for x in section.languages.split(",") if x.strip())
    return keywords


def filter_for(section: GopherQualityConfig | GopherRepetitionConfig | C4Config | LanguageConfig) -> BaseFilter:
    """The filter a config section describes, whether or not the section is enabled."""
    return FILTER_OF_SECTION[type(section)](**filter_keywords(section))


def build_filters(filters: FiltersConfig) -> list[BaseFilter]:
    """The prose chain in Gopher → repetition → C4 → language order: cheap word statistics first."""
    sections = (filters.gopher_quality, filters.gopher_repetition, filters.c4, filters.language)
    return [filter_for(section) for section in sections if section.enabled]
