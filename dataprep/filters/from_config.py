"""The one place where the prep config's filter sections become filter keywords.

`dataprep.config` is the user's schema (YAML sections with help texts and bounds); a filter takes plain keywords
whose defaults are its paper's. A section's fields are named like its filter's keywords, so it maps by name, less
`enabled`; only lists are written differently (comma-separated in YAML, a sequence in code).
"""

from __future__ import annotations

import dataclasses

from dataprep.config import (
    C4Config,
    DecontaminationConfig,
    FiltersConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
    PiiConfig,
    QualityConfig,
    split_list,
)
from dataprep.filters.base import BaseFilter
from dataprep.filters.c4_filters import C4QualityFilter
from dataprep.filters.decontaminate import DecontaminationFilter
from dataprep.filters.gopher_quality import GopherQualityFilter
from dataprep.filters.gopher_repetition import GopherRepetitionFilter
from dataprep.filters.language import LanguageFilter
from dataprep.filters.pii import PiiFilter

Section = GopherQualityConfig | GopherRepetitionConfig | C4Config | LanguageConfig | PiiConfig | DecontaminationConfig

FILTER_OF_SECTION: dict[type, type[BaseFilter]] = {
    GopherQualityConfig: GopherQualityFilter, GopherRepetitionConfig: GopherRepetitionFilter,
    C4Config: C4QualityFilter, LanguageConfig: LanguageFilter, PiiConfig: PiiFilter,
    DecontaminationConfig: DecontaminationFilter,
}
LIST_KEYWORDS = ("languages", "eval_files", "text_fields")


def filter_keywords(section: Section) -> dict:
    """The keywords of the section's filter."""
    keywords = {k: v for k, v in dataclasses.asdict(section).items() if k != "enabled"}
    for name in LIST_KEYWORDS:
        if name in keywords:
            keywords[name] = tuple(split_list(keywords[name]))
    return keywords


def filter_for(section: Section) -> BaseFilter:
    """The filter a config section describes, whether or not the section is enabled."""
    return FILTER_OF_SECTION[type(section)](**filter_keywords(section))


def build_filters(filters: FiltersConfig, kind: str = "prose") -> list[BaseFilter]:
    """A source's chain. Decontamination first, so its count says how much of the corpus held evaluation data
    whatever its quality; for prose the quality filters in Gopher → repetition → C4 → language order (cheap word
    statistics first); PII redaction last, so only text that is kept is searched."""
    quality = (filters.gopher_quality, filters.gopher_repetition, filters.c4, filters.language)
    sections = (filters.decontamination, *(quality if kind == "prose" else ()), filters.pii)
    return [filter_for(section) for section in sections if section.enabled]


def scorer_keywords(section: QualityConfig) -> dict:
    """The keywords of the section's quality scorer (`quality_model.make_scorer`): only the settings its model
    type reads, so a setting of the other type neither reaches it nor re-scores the corpus."""
    per_type = {"fasttext": ("max_chars",), "hf": ("batch_size", "max_tokens")}[section.type]
    return {"type": section.type, "model": section.model, **{k: getattr(section, k) for k in per_type}}
