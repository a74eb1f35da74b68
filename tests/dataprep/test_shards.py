"""The shard format: written by prep, memory-mapped by the loader, checked on the way in."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from dataprep.shards import (
    ShardWriter,
    open_shard,
    read_manifest,
    shard_paths,
    verify_shard,
    write_manifest,
)
from orchestrator.errors import DataError

SEQ = 16


def _manifest(entries: list[dict], val: list[dict] | None = None) -> dict:
    def split(shards):
        rows = sum(e["rows"] for e in shards)
        return {"rows": rows, "tokens": rows * SEQ, "shards": shards}

    splits = {"train": split(entries)}
    if val is not None:
        splits["val"] = split(val)
    return {
        "format_version": 1, "seq_len": SEQ,
        "tokenizer": {"file": "tokenizer.json", "vocab_size": 1000, "eos_id": 0},
        "config_hash": "0" * 64, "sources": {"kjv": {"documents": 3, "tokens": 99}}, "splits": splits,
    }


@pytest.fixture
def shard_dir(tmp_path):
    rows = np.arange(50 * (SEQ + 1), dtype=np.int64).reshape(50, SEQ + 1) % 1000
    with ShardWriter(tmp_path, "train", SEQ, rows_per_shard=20) as writer:
        writer.write(rows[:7])
        writer.write(rows[7:])
    write_manifest(tmp_path, _manifest(writer.entries))
    return tmp_path, rows


def test_rows_round_trip_in_order_across_rotated_shards(shard_dir):
    directory, rows = shard_dir
    manifest = read_manifest(directory)
    assert [e["rows"] for e in manifest["splits"]["train"]["shards"]] == [20, 20, 10]
    arrays = [open_shard(p, SEQ) for p in shard_paths(directory, manifest, "train")]
    assert all(a.dtype == np.int32 and a.shape[1] == SEQ + 1 for a in arrays)
    np.testing.assert_array_equal(np.concatenate(arrays), rows)
    for entry in manifest["splits"]["train"]["shards"]:
        verify_shard(directory, entry)
    assert not [f for f in os.listdir(directory) if ".tmp-" in f]


def test_open_shard_is_a_read_only_memory_map(shard_dir):
    directory, _ = shard_dir
    array = open_shard(directory / "train-00000.arrow")
    assert not array.flags.writeable and not array.flags.owndata
    with pytest.raises(ValueError):
        array[0, 0] = 1


def test_corrupt_shard_fails_its_checksum(shard_dir):
    directory, _ = shard_dir
    entry = read_manifest(directory)["splits"]["train"]["shards"][1]
    path = directory / entry["file"]
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-00001\.arrow: sha256 .* does not match manifest\.json"):
        verify_shard(directory, entry)
    path.unlink()
    with pytest.raises(DataError, match=r"train-00001\.arrow: shard listed in manifest\.json is missing"):
        verify_shard(directory, entry)


def test_wrong_seq_len_and_non_arrow_files_are_named(shard_dir, tmp_path):
    directory, _ = shard_dir
    with pytest.raises(DataError, match=r"train-00000\.arrow: column 'tokens' should be fixed_size_list<int32>\[33\]"):
        open_shard(directory / "train-00000.arrow", seq_len=32)
    junk = tmp_path / "junk.arrow"
    junk.write_text("not arrow")
    with pytest.raises(DataError, match=r"junk\.arrow: not a readable Arrow IPC file"):
        open_shard(junk)


def _write_tokens(path, column) -> None:
    batch = pa.record_batch([column], names=["tokens"])
    with pa.ipc.new_file(str(path), batch.schema) as writer:
        writer.write_batch(batch)


@pytest.mark.parametrize("column", [
    pa.FixedSizeListArray.from_arrays(pa.array([1, None, 3, 4], pa.int32()), 2),
    pa.FixedSizeListArray.from_arrays(pa.array([1, 2, 3, 4], pa.int32()), 2, mask=pa.array([False, True])),
], ids=["null-token", "null-row"])
def test_a_shard_with_nulls_is_named(tmp_path, column):
    path = tmp_path / "odd.arrow"
    _write_tokens(path, column)
    with pytest.raises(DataError, match=r"odd\.arrow: column 'tokens' has nulls or an offset"):
        open_shard(path, seq_len=1)


def test_open_shard_reads_the_rows_of_a_sliced_batch(tmp_path):
    """A batch written from a slice: the rows read are the slice's, not its parent's first ones."""
    rows = np.arange(12, dtype=np.int32).reshape(4, 3)
    path = tmp_path / "rows.arrow"
    _write_tokens(path, pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), 3).slice(1, 2))
    np.testing.assert_array_equal(open_shard(path, seq_len=2), rows[1:3])


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(format_version=2), r"format_version is 2, this version of pretrain reads 1"),
    (lambda m: m.update(seq_len="x"), r"seq_len is 'x', expected an integer from 1 to 1048576"),
    (lambda m: m["tokenizer"].update(eos_id=5000), r"tokenizer\.eos_id is 5000, expected an integer below vocab_size"),
    (lambda m: m["splits"].pop("train"), r"splits\.train is missing"),
    (lambda m: m["splits"]["train"].update(rows=3), r"splits\.train\.rows is 3, but its shards hold 50 rows"),
    (lambda m: m["splits"]["train"]["shards"][0].update(file="../x.arrow"), r"must be a plain file name"),
    (lambda m: m["splits"]["train"]["shards"][0].pop("sha256"), r"splits\.train\.shards\[0\]: expected"),
])
def test_bad_manifest_names_file_and_field(shard_dir, edit, message):
    directory, _ = shard_dir
    manifest = json.loads((directory / "manifest.json").read_text())
    edit(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest\.json: .*" + message):
        read_manifest(directory)


def test_missing_or_unparsable_manifest(tmp_path):
    with pytest.raises(DataError, match=r"manifest\.json: no such file; is .* a directory written by `pretrain prep`"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{\n  oops")
    with pytest.raises(DataError, match=r"manifest\.json: not valid JSON at line 2"):
        read_manifest(tmp_path)


def test_write_manifest_refuses_an_invalid_one_and_keeps_the_old(shard_dir):
    directory, _ = shard_dir
    before = (directory / "manifest.json").read_bytes()
    with pytest.raises(DataError, match="seq_len"):
        write_manifest(directory, {**_manifest([]), "seq_len": 0})
    assert (directory / "manifest.json").read_bytes() == before


def test_writer_rejects_rows_of_the_wrong_width(tmp_path):
    writer = ShardWriter(tmp_path, "val", SEQ)
    with pytest.raises(ValueError, match=r"rows must have shape \[n, 17\], got \[2, 16\]"):
        writer.write(np.zeros((2, SEQ), dtype=np.int32))
    assert writer.close() == []
