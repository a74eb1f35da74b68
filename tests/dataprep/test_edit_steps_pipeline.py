"""PII redaction and decontamination through the real prep pipeline on a tiny real corpus with planted values:
the counts reach the report and the live counters, documents add up, a run from scratch writes identical shards, a
rerun resumes, a changed setting re-runs."""

from __future__ import annotations

import glob
import gzip
import json
import os

import pyarrow.parquet as pq
import pytest
import yaml

from dataprep.config import load_prep_config
from dataprep.executor import connect_ray
from dataprep.filters.decontaminate import words_of
from dataprep.filters.pii import PiiFilter
from dataprep.ingest import IngestStage
from dataprep.pipeline import run_prep
from dataprep.report import format_table
from dataprep.shards import read_manifest
from dataprep.stats import PrepStats

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dataprep_ray")]

PII = {"prose": "Contact jane.doe@mailbox.org or +44 20 7946 0958 for details.",
       "code": "# maintainer: j.smith@uni-heidelberg.de at 81.2.69.142"}
RAW_VALUES = ("jane.doe@mailbox.org", "+44 20 7946 0958", "j.smith@uni-heidelberg.de", "81.2.69.142")


def _documents(path, n, keep):
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if keep(record["text"]):
                out.append(record)
            if len(out) == n:
                return out
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_corpora):
    """Real prose and code without personal data of their own, with values planted at the start of documents."""
    root = tmp_path_factory.mktemp("edit-steps")
    items = [s for doc in _documents(sample_corpora["python_docs"], 30, lambda t: True)
             for s in doc["text"].split("\n\n") if 20 <= len(words_of(s)) <= 80][:5]
    (root / "qa.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in items))

    def window(item: int, length: int) -> str:
        return " ".join(words_of(items[item])[3:3 + length])

    def clean(text: str) -> bool:
        return not PiiFilter().find(text)

    prose = _documents(sample_corpora["wiki_vital_en"], 30, clean)
    code = _documents(sample_corpora["django_code"], 20, clean)
    for doc, planted in ((prose[0], window(0, 13)), (prose[1], window(1, 30)), (code[0], "# " + window(2, 14)),
                         (prose[2], "NEARMISS " + window(3, 12) + " NEARMISS"),
                         (prose[3], PII["prose"]), (code[1], PII["code"])):
        doc["text"] = planted + "\n" + doc["text"]
    for name, docs in (("prose", prose), ("code", code)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    config = {
        "output": str(root / "shards"), "seq_len": 64, "num_cpus": 2, "mix": {"val_fraction": 0.0},
        "filters": {"gopher_quality": {"enabled": False}, "gopher_repetition": {"enabled": False},
                    "c4": {"enabled": False}, "language": {"enabled": False},
                    "decontamination": {"eval_files": "qa.jsonl"}},
        "tokenizer": {"vocab_size": 300, "sample_bytes": 100_000},
        "sources": {"prose": {"path": "prose.jsonl"}, "code": {"path": "code.jsonl", "kind": "code"}},
    }
    (root / "prep.yaml").write_text(yaml.safe_dump(config))
    return root, window(3, 12)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    connect_ray(None, num_cpus=2, progress=False)
    yield
    ray.shutdown()


def _kept_texts(config) -> list[str]:
    select = glob.glob(os.path.join(config.work, "select-*", "*.parquet"))
    return [t for part in sorted(select) for t in pq.read_table(part).column("text").to_pylist()]


def test_counts_reach_the_report_and_documents_add_up(corpus, ray_session):
    root, near_miss = corpus
    config, stats = load_prep_config(root / "prep.yaml"), PrepStats()
    report = run_prep(config, stats=stats, progress=False)
    live = stats.snapshot()["counters"]
    assert live["pii_email"] == 2 and live["removed_decontamination_qa"] == 3, "the live counters carry them too"
    removed = {n: s["removed"].get("decontamination_qa", 0) for n, s in report["sources"].items()}
    assert removed == {"prose": 2, "code": 1}
    assert report["decontamination"]["qa"] == {"file": str(root / "qa.jsonl"), "items": 5, "by_ngrams": 5,
                                               "whole": 0, "ignored": 0, "documents_removed": 3,
                                               "documents_masked": 0}
    assert report["totals"]["edits"] == {"pii_documents": 2, "pii_email": 2, "pii_ip": 1, "pii_phone": 1}
    assert report["sources"]["code"]["edits"] == {"pii_documents": 1, "pii_email": 1, "pii_ip": 1}
    table = format_table(report)
    assert "decontamination: qa (5 items, 0 too short) removed 3, masked 0" in table
    assert "edited: pii_documents 2, pii_email 2, pii_ip 1, pii_phone 1" in table
    assert report["conservation"]["ok"]
    for name, s in report["sources"].items():
        assert s["docs_in"] == s["docs_kept"] + sum(s["removed"].values()), name
    kept = "\n".join(_kept_texts(config))
    assert not any(value in kept for value in RAW_VALUES)
    assert kept.count("<EMAIL>") == 2 and kept.count("<PHONE>") == 1 and kept.count("<IP>") == 1
    assert f"NEARMISS {near_miss} NEARMISS" in kept, "12 shared words keep the document"

    manifest = read_manifest(config.output)
    fresh = run_prep(load_prep_config(root / "prep.yaml", [f"output={root}/again/shards"]), progress=False)
    assert read_manifest(f"{root}/again/shards") == manifest, "a run from scratch writes byte-identical shards"
    assert fresh["totals"] == report["totals"] and fresh["decontamination"] == report["decontamination"]
    ingest = glob.glob(os.path.join(config.work, "ingest-*"))
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(ingest[0], "*"))}
    run_prep(load_prep_config(root / "prep.yaml"), progress=False)
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(ingest[0], "*"))} == before, "resumed"
    assert read_manifest(config.output) == manifest


def test_changed_settings_and_eval_files_key_a_new_ingest(corpus):
    """The ingest stage's key holds the edit steps' settings and the evaluation files' content."""
    root, _ = corpus
    key = IngestStage(load_prep_config(root / "prep.yaml")).key
    base = key(None)
    assert IngestStage(load_prep_config(root / "prep.yaml")).key(None) == base
    for override in ("filters.pii.email_replacement=MAIL", "filters.pii.enabled=false",
                     "filters.decontamination.ngram=12", "filters.decontamination.action=mask"):
        assert IngestStage(load_prep_config(root / "prep.yaml", [override])).key(None) != base, override
    evals = root / "qa.jsonl"
    original = evals.read_text()
    try:
        evals.write_text(original + json.dumps({"text": "one more evaluation item of a few words"}) + "\n")
        assert IngestStage(load_prep_config(root / "prep.yaml")).key(None) != base
    finally:
        evals.write_text(original)
