"""Decontamination on real text: documents holding an n-gram of a planted evaluation item are removed (or the span
masked) and counted per set, near misses are kept, and every bad evaluation file is one readable error."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pytest

from dataprep.config import DecontaminationConfig, parse_prep_config
from dataprep.dedup.minhash import word_hashes
from dataprep.filters import filter_for
from dataprep.filters.decontaminate import DecontaminationFilter, words_of
from dataprep.normalize import normalize_text
from orchestrator.cli import main
from orchestrator.errors import SpecError


def _texts(sample_corpora, name, n):
    with gzip.open(sample_corpora[name], "rt", encoding="utf-8") as f:
        return [normalize_text(json.loads(line)["text"]) for line, _ in zip(f, range(n), strict=False)]


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory, sample_corpora):
    """Two evaluation sets of real sentences: a JSONL one (question + choices) and a plain text one."""
    root = tmp_path_factory.mktemp("evals")
    sentences = [s for doc in _texts(sample_corpora, "python_docs", 40) for s in re.split(r"(?<=\.)\s+", doc)
                 if 20 <= len(words_of(s)) <= 60 and not s.startswith((".", ":"))]
    jsonl, plain = sentences[:30], sentences[30:60]
    (root / "qa_val.jsonl").write_text("".join(json.dumps({"question": s, "choices": ["yes", "no"]}) + "\n"
                                               for s in jsonl))
    (root / "Lines.txt").write_text("\n".join(s.replace("\n", " ") for s in plain) + "\n")
    return root, jsonl, plain


def _filter(root, **keywords) -> DecontaminationFilter:
    return DecontaminationFilter(eval_files=(str(root / "qa_val.jsonl"), str(root / "Lines.txt")),
                                 text_fields=("question", "choices"), **keywords)


def _window(item: str, start: int, length: int) -> str:
    """`length` consecutive words of the item, re-cased and re-punctuated as another text would write them."""
    return ", ".join(words_of(item)[start:start + length]).upper()


def test_a_shared_13_gram_removes_and_12_shared_words_keep(sample_corpora, eval_sets):
    root, jsonl, plain = eval_sets
    docs = _texts(sample_corpora, "kjv", 8)
    planted = [
        f"{docs[0]}\nMARKER {_window(jsonl[3], 2, 13)} MARKER",  # 13 words of a JSONL item
        f"{docs[1]}\nMARKER {_window(plain[5], 0, 20)} MARKER",  # 20 words of a plain item
        f"{docs[2]}\nMARKER {_window(jsonl[7], 1, 12)} MARKER",  # a near miss: 12 words
        f"{docs[3]}\nMARKER {_window(plain[1], 4, 12)} MARKER {_window(plain[1], 17, 3)}",  # 12, a gap, 3
        f"{docs[4]}\nMARKER {_window(plain[2], 0, 13)} MARKER {_window(jsonl[4], 0, 13)}",  # both sets
        *docs[5:],
    ]
    verdicts = _filter(root).apply(planted)
    assert verdicts == ["decontamination_qa_val", "decontamination_lines", None, None, "decontamination_qa_val",
                        *[None] * len(docs[5:])]
    assert _filter(root, ngram=12).apply(planted)[2:4] == ["decontamination_qa_val", "decontamination_lines"]


def test_the_hashed_words_are_the_words(sample_corpora):
    """Hits are found on `word_hashes` and confirmed and cut on `words_of`: both must see the same words, in code
    and in text with accents, apostrophes and non-Latin scripts."""
    texts = [t for name in ("django_code", "wiki_vital_fr", "shakespeare_milton", "fortunes")
             for t in _texts(sample_corpora, name, 40)]
    texts += ["İstanbul ΣΊΣΥΦΟΣ straße", "snake_case, x1y2 -- ‘quoted’ “words” e.g. 1.5e-3\x1c!"]
    ids, owner = word_hashes(texts)
    assert np.bincount(owner, minlength=len(texts)).tolist() == [len(words_of(t)) for t in texts]
    assert ids.tolist() == word_hashes([" ".join(words_of(t)) for t in texts])[0].tolist()


def test_masking_cuts_exactly_the_shared_spans(sample_corpora, eval_sets):
    root, jsonl, plain = eval_sets
    doc = _texts(sample_corpora, "kjv", 1)[0]
    first, second = _window(jsonl[3], 0, 20), _window(plain[5], 2, 13)  # 8 overlapping 13-grams cut as one
    adjacent = f"{_window(plain[6], 0, 14)} {_window(plain[6], 10, 14)}"  # two runs: the space between stays
    text = f"{doc}\nA {first} B {second} C {adjacent} D {_window(jsonl[7], 1, 12)} E"
    verdict = _filter(root, action="mask", mask_replacement="[eval]").apply([text])[0]
    assert verdict == f"{doc}\nA [eval] B [eval] C [eval] [eval] D {_window(jsonl[7], 1, 12)} E"
    assert verdict.counts == {"decontamination_masked_qa_val": 1, "decontamination_masked_lines": 1}


def test_items_shorter_than_n_are_matched_whole_from_min_item_words(tmp_path):
    (tmp_path / "short.txt").write_text("What is the boiling point of water at sea level\nWho wrote it\n")
    f = DecontaminationFilter(eval_files=(str(tmp_path / "short.txt"),), min_item_words=8)
    assert f.index.summary["short"] == {"file": str(tmp_path / "short.txt"), "items": 2, "by_ngrams": 0, "whole": 1,
                                        "ignored": 1}
    assert f.apply(["Q: what is the boiling-point of WATER at sea level? A: 100 C", "what is the boiling point of "
                    "water at sea", "Who wrote it? Nobody knows."]) == ["decontamination_short", None, None]


def test_the_config_section_builds_the_filter_only_with_eval_files(eval_sets):
    root, _, _ = eval_sets
    assert not DecontaminationConfig().enabled
    built = filter_for(DecontaminationConfig(eval_files=f" {root}/qa_val.jsonl, {root}/Lines.txt ,",
                                             text_fields="question,choices", ngram=9, action="mask"))
    assert built == DecontaminationFilter(eval_files=(f"{root}/qa_val.jsonl", f"{root}/Lines.txt"),
                                          text_fields=("question", "choices"), ngram=9, action="mask")


def _bad_config(tmp_path, **decontamination):
    raw = {"output": str(tmp_path / "out"), "sources": {"s": {"path": str(tmp_path)}},
           "filters": {"decontamination": decontamination}}
    with pytest.raises(SpecError) as error:
        parse_prep_config(raw, source="prep.yaml")
    return str(error.value)


@pytest.mark.parametrize(("content", "message"), [
    (None, r"qa\.jsonl: no such file"),
    ("", r"qa\.jsonl: holds no items"),
    ('{"text": "fine"}\n[1, 2]\n', r"qa\.jsonl:2: a JSON list, expected an object"),
    ('{"text": "fine"}\n{"text": broken}\n', r"qa\.jsonl:2: not JSON \(Expecting value\)"),
    ('{"text": "fine"}\n{"body": "x"}\n', r"qa\.jsonl:2: none of the fields text \(filters\.decontamination\."
                                          r"text_fields\)"),
    ('{"text": {"a": 1}}\n', r"qa\.jsonl:1: field 'text' holds dict, expected text or a list of it"),
    (b"\xff\xfe bad\n", r"qa\.jsonl: not UTF-8 text"),
])
def test_a_bad_eval_file_is_one_error_naming_it(tmp_path, content, message):
    path = tmp_path / "qa.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    text = _bad_config(tmp_path, eval_files=str(path))
    assert re.search(r"prep\.yaml: 1 problem\n  filters\.decontamination\.eval_files: .*" + message, text), text


def test_bad_settings_and_clashing_names_name_their_field(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "qa.txt").write_text("an item\n")
    (tmp_path / "a" / "qa.jsonl").write_text('{"text": "an item"}\n')
    assert re.search(r"eval_files: .*/a: is a directory, expected a file", _bad_config(tmp_path,
                     eval_files=str(tmp_path / "a")))
    assert re.search(r"eval_files: .*qa\.txt and .*qa\.jsonl are both the evaluation set 'qa'; rename one",
                     _bad_config(tmp_path, eval_files=f"{tmp_path}/qa.txt,{tmp_path}/a/qa.jsonl"))
    text = _bad_config(tmp_path, eval_files=str(tmp_path / "qa.txt"), ngram=3, min_item_words=70, action="cut",
                       text_fields=" , ")
    for expected in ["filters.decontamination.ngram: got 3, must be ≥ 4",
                     "filters.decontamination.min_item_words: got 70, must be ≤ 64",
                     "filters.decontamination.action: got 'cut', allowed: 'remove', 'mask'",
                     "filters.decontamination.text_fields: empty; name the JSONL field of an item's text"]:
        assert expected in text, text
    assert "min_item_words: 9 is above filters.decontamination.ngram (8)" in _bad_config(
        tmp_path, eval_files=str(tmp_path / "qa.txt"), ngram=8, min_item_words=9)


def test_cli_exits_2_on_a_missing_eval_file(tmp_path, capsys):
    path = tmp_path / "prep.yaml"
    path.write_text(f"output: out\nsources: {{s: {{path: {tmp_path}}}}}\n"
                    "filters: {decontamination: {eval_files: evals/missing.jsonl}}\n")
    assert main(["prep", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"filters.decontamination.eval_files: {tmp_path}/evals/missing.jsonl: no such file" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()


def test_a_changed_eval_file_is_read_again(tmp_path):
    """Ray workers outlive a run: the index of an evaluation file follows its content."""
    path = tmp_path / "qa.txt"
    doc = "the answer is forty two and that is all there is to say about it"
    path.write_text("an item of other words, none of them in the document\n")  # and of another size
    f = DecontaminationFilter(eval_files=(str(path),))
    assert f.apply([doc]) == [None]
    path.write_text(doc + " today\n")
    assert f.apply([doc]) == ["decontamination_qa"]
