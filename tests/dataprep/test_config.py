"""prep.yaml: every problem at once with dotted paths, overrides of named sources, paths relative to the file."""

from __future__ import annotations

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
