"""ShardLoader over real shards: order, rank slices, resume at another dp size, prefetch, epochs, corrupt files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dataprep.shards import open_shard, read_manifest, shard_paths
from orchestrator.errors import DataError
from parallel.loader import ShardLoader, sample_order
from tests.shards import write_shards

SEQ = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return str(write_shards(tmp_path_factory.mktemp("shards"), seq_len=SEQ, rows=300, rows_per_shard=50))


def _loader(path: str, **kw) -> ShardLoader:
    args = dict(seq_len=SEQ, micro_batch_size=2, grad_accum=2, seed=7, prefetch=0)
    return ShardLoader(path, **{**args, **kw})


def _step_ids(loader: ShardLoader) -> list[int]:
    return [int(i) for mb in loader.next_step() for i in mb.sample_ids]


@pytest.mark.parametrize("rows", [1, 2, 3, 97, 1000, 4096, 70001])
def test_sample_order_is_a_permutation_fixed_by_seed_and_epoch(rows):
    order = sample_order(np.arange(rows), rows, seed=5, epoch=0)
    assert sorted(order.tolist()) == list(range(rows))
    assert np.array_equal(order, sample_order(np.arange(rows), rows, seed=5, epoch=0))
    if rows >= 97:
        assert not np.array_equal(order, np.arange(rows))
        assert not np.array_equal(order, sample_order(np.arange(rows), rows, seed=5, epoch=1))
        assert not np.array_equal(order, sample_order(np.arange(rows), rows, seed=6, epoch=0))
    # any stretch of the order is computed directly, without the positions before it
    assert np.array_equal(sample_order(np.arange(rows // 2, rows), rows, 5, 0), order[rows // 2:])


def test_batches_are_the_shard_rows_shifted_by_one(shards):
    manifest = read_manifest(shards)
    rows = np.concatenate([open_shard(p) for p in shard_paths(shards, manifest, "train")])
    loader = _loader(shards)
    for mb in loader.next_step():
        assert mb.inputs.dtype == torch.int64 and mb.inputs.shape == (2, SEQ) and mb.inputs.is_contiguous()
        for ids, inputs, targets in zip(mb.sample_ids, mb.inputs, mb.targets, strict=True):
            assert inputs.tolist() == rows[ids, :SEQ].tolist()
            assert targets.tolist() == rows[ids, 1:SEQ + 1].tolist()


def test_dp_ranks_split_each_global_batch_into_disjoint_slices(shards):
    single = _loader(shards, micro_batch_size=4, grad_accum=2)
    ranks = [_loader(shards, micro_batch_size=2, grad_accum=2, dp_size=2, dp_rank=r) for r in range(2)]
    for _ in range(5):
        whole = _step_ids(single)
        parts = [_step_ids(r) for r in ranks]
        assert parts[0] + parts[1] == whole
        assert not set(parts[0]) & set(parts[1])


def test_resume_at_another_dp_size_reads_what_the_uninterrupted_run_reads_next(shards):
    straight = [_loader(shards, dp_size=2, dp_rank=r) for r in range(2)]
    expected = [sum((_step_ids(r) for r in straight), []) for _ in range(8)]

    first = [_loader(shards, dp_size=2, dp_rank=r, prefetch=3) for r in range(2)]
    for _ in range(3):
        for r in first:
            r.next_step()
    state = first[0].state_dict()
    assert state == first[1].state_dict()  # rank-independent
    for r in first:
        r.close()

    # same global batch (8) at dp4 × micro 2 × accum 1 and at dp1 × micro 4 × accum 2
    for dp, micro, accum in ((4, 2, 1), (1, 4, 2)):
        resumed = [_loader(shards, dp_size=dp, dp_rank=r, micro_batch_size=micro, grad_accum=accum)
                   for r in range(dp)]
        for r in resumed:
            r.load_state_dict(state)
        assert [sum((_step_ids(r) for r in resumed), []) for _ in range(5)] == expected[3:]


def test_prefetch_does_not_move_the_saved_position(shards):
    eager, lazy = _loader(shards, prefetch=4), _loader(shards, prefetch=0)
    for _ in range(3):
        assert _step_ids(eager) == _step_ids(lazy)
    assert eager.state_dict() == lazy.state_dict() == {"epoch": 0, "index": 12, "seed": 7, "rows": lazy.rows,
                                                       "split": "train"}
    eager.load_state_dict({"epoch": 0, "index": 4, "seed": 7})
    lazy.load_state_dict({"epoch": 0, "index": 4, "seed": 7})
    assert _step_ids(eager) == _step_ids(lazy)
    eager.close()


def test_each_epoch_reads_every_row_at_most_once_in_a_new_order(shards):
    loader = _loader(shards, micro_batch_size=8, grad_accum=1)
    epochs = []
    for _ in range(2):
        epochs.append(sum((_step_ids(loader) for _ in range(loader.steps_per_epoch)), []))
    assert loader.state_dict()["epoch"] == 1
    for ids in epochs:
        assert len(set(ids)) == len(ids) == loader.steps_per_epoch * 8
    assert epochs[0] != epochs[1]
    _step_ids(loader)
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["index"] == 8


def test_validation_reads_the_val_split_in_order_every_pass(shards):
    val = _loader(shards, split="val", shuffle=False)
    first = [_step_ids(val) for _ in range(3)]
    assert first[0] == [0, 1, 2, 3]
    val.rewind()
    assert [_step_ids(val) for _ in range(3)] == first


def _copy_shards(src: str, dst) -> str:
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(dst / name, "wb") as g:
            g.write(f.read())
    return str(dst)


def test_a_shard_with_flipped_bytes_is_named(shards, tmp_path):
    path = _copy_shards(shards, tmp_path)
    victim = tmp_path / "train-00002.arrow"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-00002\.arrow: sha256 .* does not match manifest\.json"):
        _loader(path)


def test_a_truncated_shard_is_named_even_without_checksums(shards, tmp_path):
    path = _copy_shards(shards, tmp_path)
    victim = tmp_path / "train-00001.arrow"
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"train-00001\.arrow: sha256"):
        _loader(path)
    with pytest.raises(DataError, match=r"train-00001\.arrow: not a readable Arrow IPC file"):
        _loader(path, verify=False)


def test_impossible_requests_name_the_limit(shards):
    with pytest.raises(DataError, match=rf"seq_len {SEQ}, shorter than the requested seq_len {SEQ + 1}"):
        _loader(shards, seq_len=SEQ + 1)
    with pytest.raises(DataError, match=r"fewer than one global batch of 4096"):
        _loader(shards, micro_batch_size=1024, grad_accum=4)
    with pytest.raises(DataError, match=r"has no 'test' split"):
        _loader(shards, split="test")

