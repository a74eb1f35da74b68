"""Packing for long context on real text: whole-document rows, long-document boost, the length report, their
settings. The documents are the byte-tokenized corpus documents of tests/shards.py."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprep.config import parse_prep_config
from dataprep.lengths import histogram, summary
from dataprep.report import draw_report, length_line
from dataprep.tokenize.encode import TRAIN, VAL
from dataprep.tokenize.pack import _pack, pack_file
from dataprep.writers.assemble import WriteStage
from orchestrator.errors import SpecError
from tests.shards import EOS, corpus_tokens

SEQ = 96


@pytest.fixture(scope="module")
def docs() -> list[np.ndarray]:
    """Real text in documents of many lengths: the corpus (EOS removed) cut at drawn lengths of 5 to 300 tokens,
    so both short and longer-than-a-row documents occur."""
    stream = corpus_tokens(60_000)
    body = stream[stream != EOS].astype(np.int32)
    cuts = np.cumsum(np.random.default_rng(0).integers(5, 300, len(body) // 5))
    return [d for d in np.split(body, cuts[cuts < len(body)]) if len(d)]


def _starts(docs: list[np.ndarray], rows: np.ndarray) -> list[int]:
    """Where each document begins in the flattened rows, walking past the EOS padding between documents."""
    flat, at, starts = rows.reshape(-1), 0, []
    for d in docs:
        size = len(d) + 1
        if at + size > len(flat):
            break
        while not np.array_equal(flat[at:at + size - 1], d):
            assert flat[at] == EOS, "only EOS padding lies between documents"
            at += 1
        starts.append(at)
        at += size
    return starts


def test_whole_packing_starts_each_fitting_document_in_one_row_and_conserves_tokens(docs) -> None:
    width = SEQ + 1
    split, used, dropped, padded = _pack(docs, SEQ, EOS)
    assert padded == 0 and np.array_equal(split.reshape(-1), np.concatenate([x for d in docs for x in (d, [EOS])])
                                          [:used].astype(np.int32))
    rows, used, dropped, padded = _pack(docs, SEQ, EOS, whole=True)
    assert used + dropped - padded == sum(len(d) + 1 for d in docs)
    assert padded > 0 and used == rows.size
    starts = _starts(docs, rows)
    assert len(starts) > 100
    fitting = [(s, len(d) + 1) for s, d in zip(starts, docs, strict=False) if len(d) + 1 <= width]
    assert all(s // width == (s + size - 1) // width for s, size in fitting), "a fitting document straddles rows"
    straddling = sum(s // width != (s + len(d)) // width for s, d in zip(
        _starts(docs, split), docs, strict=False) if len(d) + 1 <= width)
    assert straddling > 0, "split packing should cut some short documents (else the test shows nothing)"
    again = _pack(docs, SEQ, EOS, whole=True)[0]
    assert again.tobytes() == rows.tobytes()


def _part(tmp_path, docs: list[np.ndarray]) -> str:
    keys = np.arange(len(docs), dtype=np.int64) * 7919
    split = np.where(np.arange(len(docs)) % 10 == 9, VAL, TRAIN).astype(np.int8)
    path = str(tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"key": keys, "split": split,
                             "tokens": pa.array([d.tolist() for d in docs], pa.list_(pa.int32()))}), path)
    return path


def test_long_documents_boosted_and_lengths_counted(tmp_path, docs) -> None:
    """boost 3 at 2 epochs: each long training document 6 times, others twice; boost 1 writes the very bytes of
    a payload without the option; the task counts every training document's length once."""
    part = _part(tmp_path, docs)
    base = {"name": "f", "source": "s", "file_id": 3, "epochs": 2.0, "parts": [part]}
    runs = {}
    for label, extra in (("plain", {}), ("one", {"long_doc_boost": 1.0, "long_doc_tokens": 200}),
                         ("boost", {"long_doc_boost": 3.0, "long_doc_tokens": 200, "pack": "whole"})):
        out = tmp_path / label
        out.mkdir()
        runs[label] = (pack_file({**base, **extra}, str(out), SEQ, EOS, seed=9), out)
    assert (runs["plain"][1] / "f-train.npy").read_bytes() == (runs["one"][1] / "f-train.npy").read_bytes()
    train = [d for i, d in enumerate(docs) if i % 10 != 9]
    long = sum(len(d) >= 200 for d in train)
    assert 0 < long < len(train)
    assert runs["plain"][0]["train_docs"] == 2 * len(train)
    assert runs["boost"][0]["train_docs"] == 2 * len(train) + 4 * long
    assert runs["boost"][0]["train_pad_tokens"] > 0 and runs["plain"][0]["train_pad_tokens"] == 0
    stats = runs["plain"][0]
    assert sum(stats["doc_lengths"].values()) == len(train)
    assert stats["doc_length_max"] == max(len(d) for d in train)


def test_length_summary_quantiles_and_report(tmp_path, docs) -> None:
    lengths = np.array([len(d) for d in docs])
    s = summary(histogram(lengths), int(lengths.max()), SEQ)
    assert s["documents"] == len(docs) and sum(s["histogram"].values()) == len(docs)
    for name, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9)):
        exact = np.quantile(lengths, q, method="inverted_cdf")
        assert exact <= s["quantiles"][name] <= max(exact * 1.1, exact + 1), (name, exact, s["quantiles"])
    assert s["quantiles"]["max"] == lengths.max()
    assert s["share_over_seq_len"] == pytest.approx(np.mean(lengths > SEQ), abs=0.05)
    source = {"doc_lengths": s, "pad_tokens": 12, "docs_kept": 5, "removed": {}, "target_share": 1.0,
              "realised_share": 1.0}
    line = length_line("books", source)
    assert line.startswith(f"lengths books: p10 {s['quantiles']['p10']:,}") and "12 padding tokens" in line
    png = tmp_path / "report.png"
    draw_report({"sources": {"books": source}, "totals": {"removed": {}}}, str(png))
    assert png.stat().st_size > 1000


@pytest.mark.parametrize(("override", "match"), [
    ("pack=wholes", r"pack: got 'wholes', allowed: 'split', 'whole'"),
    ("sources.a.long_doc_boost=0.5", r"sources.a.long_doc_boost: got 0.5, must be ≥ 1"),
    ("mix.long_doc_tokens=-1", r"mix.long_doc_tokens: got -1, must be ≥ 0"),
])
def test_packing_settings_are_checked(tmp_path, override: str, match: str) -> None:
    raw = {"output": str(tmp_path / "out"), "sources": {"a": {"path": str(tmp_path)}}}
    with pytest.raises(SpecError, match=match):
        parse_prep_config(raw, source="prep.yaml", overrides=[override])


def test_packing_settings_enter_the_config_hash_only_when_set(tmp_path) -> None:
    """A prep at the defaults keeps the hash it had before these settings existed (they are left out at their
    defaults); each one set changes it, so shards packed another way never pass for the same config."""
    raw = {"output": str(tmp_path / "out"), "sources": {"a": {"path": str(tmp_path)}}}
    hashes = {o: WriteStage(parse_prep_config(raw, overrides=[o] if o else []))._config_hash([])
              for o in ("", "pack=split", "pack=whole", "sources.a.long_doc_boost=2", "mix.long_doc_tokens=512")}
    assert hashes[""] == hashes["pack=split"]
    assert len(set(hashes.values())) == 4, hashes
