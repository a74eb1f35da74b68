"""Encoding long documents in pieces gives the ids of encoding them whole, and a tokenizer whose pre-tokenization
could differ at a cut is never cut."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, normalizers, pre_tokenizers

from dataprep.config import TokenizerConfig
from dataprep.tokenize import encode
from dataprep.tokenize.encode import encode_texts, pieces_of, uncut_tokens
from dataprep.tokenize.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def texts(repo_root: Path) -> list[str]:
    """Real long texts: the project's Python modules and docs, each package and the docs folder as one text, the
    docs again as one line (cut between words only), plus the short modules alone."""
    groups = [sorted((repo_root / d).rglob("*.py")) for d in ("dataprep", "orchestrator", "parallel")]
    groups.append(sorted((repo_root / "docs").glob("*.md")))
    long = ["".join(p.read_text() for p in group) for group in groups]
    short = [p.read_text() for p in groups[0][:20]]
    return [*long, " ".join(long[-1].split()), *short]


@pytest.fixture(scope="module")
def tokenizer(texts: list[str]) -> Tokenizer:
    return train_tokenizer(texts, TokenizerConfig(vocab_size=2000))


def whole(tokenizer: Tokenizer, texts: list[str]) -> tuple[list[int], list[int]]:
    encoded = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return [i for ids in encoded for i in ids], [len(ids) for ids in encoded]


@pytest.mark.parametrize("piece_chars", [encode._PIECE_CHARS, 8])  # 8: nearly every place a cut may fall
def test_pieces_encode_to_the_whole_texts_ids(tokenizer: Tokenizer, texts: list[str], piece_chars: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encode, "_PIECE_CHARS", piece_chars)
    uncut = uncut_tokens(tokenizer)
    assert uncut == ("<|endoftext|>",)
    assert any(uncut[0] in t for t in texts)  # config.py names it: no cut may fall inside
    pieces = sum(len(pieces_of(t, uncut)) for t in texts)
    assert pieces > len(texts) + (10 if piece_chars > 8 else sum(map(len, texts)) // 20)  # cut, many times
    assert all("".join(pieces_of(t, uncut)) == t for t in texts)
    values, lengths = encode_texts(tokenizer, texts, uncut)
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
    assert uncut_tokens(other) is None
    values, lengths = encode_texts(other, texts[:2], None)
    expected_values, expected_lengths = whole(other, texts[:2])
    assert lengths.tolist() == expected_lengths
    assert values.tolist() == expected_values


@pytest.mark.parametrize("piece_chars", [encode._PIECE_CHARS, 8])
def test_a_tokenizer_trained_on_pieces_is_the_one_trained_on_whole_texts(texts: list[str], piece_chars: int,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The tokenizer stage trains on its sample cut as encode cuts it (what it holds then follows the cut, not the
    longest document): the words the trainer counts, so its merges, must not change."""
    monkeypatch.setattr(encode, "_PIECE_CHARS", piece_chars)
    config = TokenizerConfig(vocab_size=2000)
    pieces = [piece for text in texts for piece in pieces_of(text, (config.eos,))]
    assert len(pieces) > len(texts) + 10
    assert train_tokenizer(pieces, config).to_str() == train_tokenizer(texts, config).to_str()
