"""Hugging Face `tokenizers`: train a byte-level BPE on a sample of the mix, or load tokenizer.json / GPT-2 files."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dataprep.config import TokenizerConfig, config_to_dict
from dataprep.executor import file_digest, parts_of, read_table, release_freed_memory, stage_dir
from dataprep.mix import target_shares
from dataprep.shards import write_atomic
from dataprep.stages import PrepRun, Stage, StageOutput
from dataprep.tokenize.encode import pieces_of, unit_hash
from orchestrator.errors import DataError


class TokenizerStage(Stage):
    """Train a byte-level BPE on a sample of the kept documents, or load one; `info` holds its file, EOS id and
    vocabulary size."""

    name = "tokenizer"

    def run(self, prep: PrepRun) -> StageOutput:
        c, t = self.config, self.config.tokenizer
        prep.stats.enter(self.name)
        key = [config_to_dict(c)["tokenizer"], {n: s.share for n, s in c.sources.items()}, c.mix.temperature, c.seed]
        if t.type == "train":
            key.append(prep["select"].directory)
        else:
            key.append(file_digest(t.path) if os.path.isfile(t.path) else sorted(os.listdir(t.path)))
        directory = stage_dir(prep.work, self.name, *key)
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.exists(path):
            tokenizer = train_tokenizer(self._sample(prep), t) if t.type == "train" else load_tokenizer(t)
            os.makedirs(directory, exist_ok=True)
            write_atomic(path, tokenizer.to_str().encode())
        tokenizer = Tokenizer.from_file(path)
        return StageOutput(directory, info={"file": path, "eos_id": tokenizer.token_to_id(t.eos),
                                            "vocab_size": tokenizer.get_vocab_size()})

    def _sample(self, prep: PrepRun) -> Iterator[str]:
        """Kept documents sampled per source in proportion to the target shares (bytes stand in for tokens), cut
        into the pieces encode cuts them into (`pieces_of`: the same words to count, so the same tokenizer).

        What the driver holds follows `sample_bytes`, not the corpus: a part's keys are read first and its text
        only for the rows drawn, freed memory is handed back after each part, and no piece is longer than about
        64 K characters (the trainer pre-tokenizes a batch of texts at a time, and whole documents reach 3 MB)."""
        c = self.config
        kept = {n: 0 for n in c.sources}
        for stat in prep["select"].results.values():
            kept[stat["source"]] += stat["bytes_kept"]
        shares = target_shares({n: b for n, b in kept.items() if b}, {n: s.share for n, s in c.sources.items()},
                                c.mix.temperature)
        rates = {n: min(1.0, shares.get(n, 0.0) * c.tokenizer.sample_bytes / b) if b else 0.0
                 for n, b in kept.items()}
        uncut = (c.tokenizer.eos,)
        for task in prep.files:
            for part in parts_of(prep["select"].directory, task["name"]):
                keys = read_table(part, columns=["key"]).column("key").to_numpy()
                chosen = np.flatnonzero(unit_hash(keys, c.seed, salt=2) < rates[task["source"]])
                if len(chosen):
                    texts = read_table(part, columns=["text"]).column("text").take(chosen).to_pylist()
                    for text in texts:
                        yield from pieces_of(text, uncut)
                    del texts
                release_freed_memory()


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
