"""prep.yaml: every problem at once with dotted paths, overrides of named sources, paths relative to the file."""

from __future__ import annotations

import re

import pytest

from dataprep.config import load_prep_config, parse_prep_config
from orchestrator.cli import main
from orchestrator.errors import SpecError


def test_demo_config_loads_with_paths_relative_to_it(repo_root):
    config = load_prep_config(repo_root / "examples" / "prep-demo.yaml", ["sources.kjv.share=0.3", "seq_len=256"])
    assert config.seq_len == 256 and config.sources["kjv"].share == 0.3
    assert config.sources["kjv"].path == str(repo_root / "examples" / "corpus" / "kjv.jsonl.gz")
    assert config.output == str(repo_root / "runs" / "demo" / "shards")
    assert config.sources["django_docs"].kind == "code"


def test_every_problem_is_reported_at_once_with_its_path(tmp_path):
    raw = {"output": str(tmp_path), "seq_len": 4, "dedup": {"bandz": 3},
           "sources": {"a": {"path": str(tmp_path / "nothing*.jsonl"), "share": 0.7},
                       "b": {"path": str(tmp_path), "share": 0.6, "kind": "poetry"}},
           "tokenizer": {"type": "file"}}
    with pytest.raises(SpecError) as error:
        parse_prep_config(raw, source="prep.yaml")
    text = str(error.value)
    for expected in ["prep.yaml: 6 problems", "seq_len: got 4, must be ≥ 8", "dedup.bandz: unknown key (did you "
                     "mean 'dedup.bands'?)", "sources.b.kind: got 'poetry', allowed: 'prose', 'code'",
                     "sources.a.path: '", "matches no file or directory",
                     "sources: shares add up to 1.3 (a=0.7, b=0.6); they must total at most 1",
                     "tokenizer.path: required with tokenizer.type='file'"]:
        assert expected in text, text


def test_cli_reports_a_bad_config_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "prep.yaml"
    path.write_text("output: out\nsources: {}\nmix: {temperature: 0}\n")
    assert main(["prep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "pretrain prep: " in err and "mix.temperature: got 0.0, must be ≥ 0.01" in err
    assert "sources: no sources; add at least one" in err


@pytest.mark.parametrize("override", ["sources=5", "sources.books=5", "sources..path=x", "sources.books"])
def test_an_override_of_sources_must_name_one_sources_key(tmp_path, override):
    with pytest.raises(SpecError, match=rf"override '{re.escape(override)}' does not set a key of one source, as in "
                                        r"sources.books.path=data/books.jsonl"):
        parse_prep_config({"output": str(tmp_path), "sources": {"books": {"path": str(tmp_path)}}},
                          overrides=[override])


def test_a_misspelt_key_is_answered_from_the_prep_configs_own_fields(tmp_path):
    with pytest.raises(SpecError) as error:
        parse_prep_config({"output": str(tmp_path), "bands": 3, "zero_stage": 2,
                           "sources": {"books": {"path": str(tmp_path), "sahre": 0.5}}})
    assert [str(p) for p in error.value.problems] == [
        "bands: unknown key (did you mean 'dedup.bands'?)",
        "zero_stage: unknown key; allowed here: name, output, work_dir, seq_len, pack, seed, strict, invalid_utf8, "
        "max_doc_bytes, part_bytes, span_bytes, rows_per_shard, examples, num_cpus, dedup, filters, mix, tokenizer, "
        "sources",
        "sources.books.sahre: unknown key (did you mean 'sources.books.share'?)",
    ]
