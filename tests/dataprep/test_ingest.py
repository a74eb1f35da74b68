"""Reading real corpora in every supported format, and every kind of bad input: counted with file and line, or
(strict mode) a readable error naming them."""

from __future__ import annotations

import gzip
import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprep.config import parse_prep_config
from dataprep.ingest import ingest_file, merge_span_stats
from dataprep.readers import BadInput
from dataprep.readers.base import WHOLE_FILE, split_file


def _config(tmp_path, **top):
    raw = {"output": str(tmp_path / "out"), "sources": {"s": {"path": str(tmp_path)}}, **top}
    return parse_prep_config(raw, source="test")


def _task(path, fmt="jsonl", kind="code"):
    return {"name": "s-00000-x", "source": "s", "source_rank": 0, "file_index": 0, "path": str(path),
            "kind": kind, "fmt": fmt, "text_field": "text", "id_field": "id"}


def _real_lines(demo_corpus, n=5):
    with gzip.open(demo_corpus / "wiki_vital_en.jsonl.gz", "rb") as f:
        return [next(f) for _ in range(n)]


@pytest.fixture
def bad_jsonl(tmp_path, demo_corpus):
    lines = _real_lines(demo_corpus)
    body = lines[0] + b'{"id": "x", "text": "unterminated\n' + lines[1] + b'{"id": "y", "body": "no text"}\n' \
        + b'{"id": "z", "text": "caf\xe9 latin-1"}\n' + lines[2] + b'{"id": "big", "text": "' + b"a" * 3000 + b'"}\n'
    path = tmp_path / "bad.jsonl"
    path.write_bytes(body)
    return path


def test_bad_records_are_counted_with_file_and_line(tmp_path, bad_jsonl):
    stats = ingest_file(_task(bad_jsonl), str(tmp_path), _config(tmp_path, max_doc_bytes=2000))
    assert stats["docs_in"] == 7
    assert stats["removed"] == {"malformed_json": 1, "missing_field": 1, "too_large": 1}
    assert stats["repaired_utf8"] == 1 and stats["docs_out"] == 4
    where = {(b["line"], b["reason"]) for b in stats["bad"]}
    assert where == {(2, "malformed_json"), (4, "missing_field"), (7, "too_large")}
    assert all(b["file"] == str(bad_jsonl) for b in stats["bad"])
    table = pq.read_table(tmp_path / "s-00000-x-0000.parquet")
    assert "café latin-1" not in table.column("text").to_pylist() and table.num_rows == 4


def test_invalid_utf8_can_be_dropped_instead(tmp_path, bad_jsonl):
    stats = ingest_file(_task(bad_jsonl), str(tmp_path), _config(tmp_path, invalid_utf8="drop"))
    assert stats["removed"]["invalid_utf8"] == 1 and stats["repaired_utf8"] == 0


@pytest.mark.parametrize(("strict_cut", "message"), [
    (2, r"bad\.jsonl:2: malformed json: Invalid control character at \(column \d+\) \(strict mode\)"),
    (4, r"bad\.jsonl:4: missing field: no string field 'text' \(strict mode\)"),
    (5, r"bad\.jsonl:5: invalid UTF-8 \(strict mode\)"),
])
def test_strict_mode_stops_at_the_first_bad_record(tmp_path, bad_jsonl, strict_cut, message):
    lines = bad_jsonl.read_bytes().split(b"\n")
    keep = [line for i, line in enumerate(lines, 1) if i == strict_cut or i in (1, 3, 6)]
    bad_jsonl.write_bytes(b"\n".join(sorted(keep, key=lines.index)) + b"\n")
    line = sorted(keep, key=lines.index).index(lines[strict_cut - 1]) + 1
    with pytest.raises(BadInput, match=message.replace(f":{strict_cut}:", f":{line}:")):
        ingest_file(_task(bad_jsonl), str(tmp_path), _config(tmp_path, strict=True))


def test_empty_and_unreadable_files_are_reported(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    stats = ingest_file(_task(empty), str(tmp_path), _config(tmp_path))
    assert stats["bad_files"] == [{"file": str(empty), "reason": "empty_file", "detail": "no documents"}]
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00garbage")
    stats = ingest_file(_task(broken), str(tmp_path), _config(tmp_path))
    assert stats["bad_files"][0]["reason"] == "unreadable_file" and stats["docs_in"] == 0
    with pytest.raises(BadInput, match=r"broken\.jsonl\.gz: unreadable file: .* \(strict mode\)"):
        ingest_file(_task(broken), str(tmp_path), _config(tmp_path, strict=True))


def test_zstd_parquet_and_text_directories_read_the_same_documents(tmp_path, demo_corpus):
    lines = _real_lines(demo_corpus, 8)
    docs = [json.loads(line) for line in lines]
    zst = tmp_path / "docs.jsonl.zst"
    with pa.CompressedOutputStream(str(zst), "zstd") as f:
        f.write(b"".join(lines))
    pq.write_table(pa.table({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs]}),
                   tmp_path / "docs.parquet")
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    for i, d in enumerate(docs):
        (text_dir / f"{i:02d}.txt").write_text(d["text"], encoding="utf-8")
    config = _config(tmp_path)
    outputs = []
    for path, fmt in ((zst, "jsonl"), (tmp_path / "docs.parquet", "parquet")):
        task = {**_task(path, fmt), "name": fmt}
        assert ingest_file(task, str(tmp_path), config)["docs_out"] == 8
        outputs.append(pq.read_table(tmp_path / f"{fmt}-0000.parquet").column("text").to_pylist())
    texts = []
    for i in range(8):
        task = {**_task(text_dir / f"{i:02d}.txt", "text"), "name": f"t{i}"}
        ingest_file(task, str(tmp_path), config)
        texts += pq.read_table(tmp_path / f"t{i}-0000.parquet").column("text").to_pylist()
    assert outputs[0] == outputs[1] == texts and len(set(texts)) == 8


def _spans_stats(tmp_path, path, fmt, config, spans):
    stats = []
    for k, (start, stop, first_index) in enumerate(spans):
        task = {**_task(path, fmt), "name": f"span{k:03d}", "start": start, "stop": stop, "first_index": first_index}
        stats.append(ingest_file(task, str(tmp_path), config))
    table = pa.concat_tables(pq.read_table(p) for p in sorted(tmp_path.glob("span*.parquet")))
    return merge_span_stats(stats, config.examples), table


def test_a_file_read_as_spans_gives_what_one_reader_gives(tmp_path, bad_jsonl, demo_corpus):
    bad_jsonl.write_bytes(b"".join(_real_lines(demo_corpus, 30)) + bad_jsonl.read_bytes() + b"\n"
                          + b"".join(_real_lines(demo_corpus, 12)))
    config = _config(tmp_path, max_doc_bytes=2000, examples=2)
    whole = ingest_file({**_task(bad_jsonl), "name": "whole"}, str(tmp_path), config)
    spans = split_file(str(bad_jsonl), "jsonl", "text", 700)
    assert len(spans) > 10 and spans[0][2] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)) and spans[-1][1] == bad_jsonl.stat().st_size
    merged, table = _spans_stats(tmp_path, bad_jsonl, "jsonl", config, spans)
    assert merged.pop("parts") == len(spans) and whole.pop("parts") == 1
    assert merged == whole and {(b["line"], b["reason"]) for b in whole["bad"]} == {
        (32, "malformed_json"), (34, "missing_field"), (37, "too_large"), (38, "malformed_json")}
    assert table.equals(pq.read_table(tmp_path / "whole-0000.parquet"))


def test_parquet_is_split_by_row_groups_and_compressed_files_stay_whole(tmp_path, demo_corpus):
    docs = [json.loads(line) for line in _real_lines(demo_corpus, 40)]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs]}), path,
                   row_group_size=6)
    config = _config(tmp_path)
    whole = ingest_file({**_task(path, "parquet"), "name": "whole"}, str(tmp_path), config)
    spans = split_file(str(path), "parquet", "text", 1)
    assert [s[2] for s in spans] == list(range(0, 40, 6))
    merged, table = _spans_stats(tmp_path, path, "parquet", config, spans)
    merged.pop("parts"), whole.pop("parts")
    assert merged == whole and table.equals(pq.read_table(tmp_path / "whole-0000.parquet"))
    assert split_file(str(path), "parquet", "body", 1) == [WHOLE_FILE]
    zst = tmp_path / "docs.jsonl.zst"
    with pa.CompressedOutputStream(str(zst), "zstd") as f:
        f.write(b"".join(_real_lines(demo_corpus, 40)))
    assert split_file(str(zst), "auto", "text", 1) == [WHOLE_FILE]
