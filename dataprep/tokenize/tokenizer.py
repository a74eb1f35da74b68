"""Hugging Face `tokenizers`: train a byte-level BPE on a sample of the mix, or load tokenizer.json / GPT-2 files."""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dataprep.config import TokenizerConfig
from orchestrator.errors import DataError


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig) -> Tokenizer:
    """A byte-level BPE (GPT-2 style: any byte sequence encodes, nothing is unknown) with the EOS token at id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                  special_tokens=[config.eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(config: TokenizerConfig) -> Tokenizer:
    """tokenizer.json as is, or GPT-2's encoder.json/vocab.json + vocab.bpe/merges.txt; the EOS token must exist."""
    path = config.path
    try:
        if config.type == "file":
            tokenizer = Tokenizer.from_file(path)
        else:
            vocab = _first_existing(path, ("encoder.json", "vocab.json"))
            merges = _first_existing(path, ("vocab.bpe", "merges.txt"))
            tokenizer = Tokenizer(models.BPE.from_file(vocab, merges))
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tokenizer.decoder = decoders.ByteLevel()
    except Exception as e:  # tokenizers raises plain Exception subclasses for unreadable files
        raise DataError(f"{path}: cannot load the tokenizer: {e}") from None
    if tokenizer.token_to_id(config.eos) is None:
        raise DataError(f"{path}: the tokenizer has no EOS token {config.eos!r}; set tokenizer.eos to one it has")
    return tokenizer


def _first_existing(directory: str, names: tuple[str, ...]) -> str:
    for name in names:
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise DataError(f"{directory}: none of {', '.join(names)} found (GPT-2 vocabulary files)")
