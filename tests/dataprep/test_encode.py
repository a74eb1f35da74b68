"""Encoding long documents in pieces gives the ids of encoding them whole, and a tokenizer whose pre-tokenization
could differ at a cut is never cut."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, normalizers, pre_tokenizers

from dataprep.config import TokenizerConfig
from dataprep.tokenize.encode import cuts_at_newlines, encode_texts, pieces_of
from dataprep.tokenize.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def texts(repo_root: Path) -> list[str]:
    """Real long texts: the project's Python modules and docs, each package and the docs folder as one text, plus
    the short modules alone."""
    groups = [sorted((repo_root / d).rglob("*.py")) for d in ("dataprep", "orchestrator", "parallel")]
    groups.append(sorted((repo_root / "docs").glob("*.md")))
    long = ["".join(p.read_text() for p in group) for group in groups]
    short = [p.read_text() for p in groups[0][:20]]
    return long + short


@pytest.fixture(scope="module")
def tokenizer(texts: list[str]) -> Tokenizer:
    return train_tokenizer(texts, TokenizerConfig(vocab_size=2000))


def whole(tokenizer: Tokenizer, texts: list[str]) -> tuple[list[int], list[int]]:
    encoded = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return [i for ids in encoded for i in ids], [len(ids) for ids in encoded]


def test_pieces_encode_to_the_whole_texts_ids(tokenizer: Tokenizer, texts: list[str]) -> None:
    assert cuts_at_newlines(tokenizer)
    assert sum(len(pieces_of(t)) for t in texts) > len(texts) + 10  # the long texts are cut, many times
    assert all("".join(pieces_of(t)) == t for t in texts)
    values, lengths = encode_texts(tokenizer, texts, cut=True)
    expected_values, expected_lengths = whole(tokenizer, texts)
    assert values.dtype == np.int32
    assert lengths.tolist() == expected_lengths
    assert values.tolist() == expected_values


@pytest.mark.parametrize("change", ["prefix_space", "normalizer"])
def test_tokenizers_that_could_split_differently_are_not_cut(tokenizer: Tokenizer, texts: list[str],
                                                             change: str) -> None:
    other = Tokenizer.from_str(tokenizer.to_str())
    if change == "prefix_space":
        other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    else:
        other.normalizer = normalizers.NFKC()
    assert not cuts_at_newlines(other)
    values, lengths = encode_texts(other, texts[:2], cut=False)
    expected_values, expected_lengths = whole(other, texts[:2])
    assert lengths.tolist() == expected_lengths
    assert values.tolist() == expected_values
