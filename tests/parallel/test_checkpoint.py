"""Checkpointer pieces that need no process group: finding a good checkpoint, retention, conversion patterns,
model checks, host snapshots and the pyarrow.fs storage."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator.errors import CheckpointError
from orchestrator.spec import JobSpec
from parallel.checkpoint import Checkpointer
from parallel.deepspeed_checkpoint import snapshot_to_host, universal_checkpoint_info
from parallel.megatron_tp import apply_tensor_parallel
from parallel.model import build_model
from parallel.parallel_dims import ParallelDims
from parallel.restore import check_same_model
from parallel.storage import Storage


def _checkpointer(root: Path, **config) -> Checkpointer:
    spec = JobSpec()
    spec.checkpoint = dataclasses.replace(spec.checkpoint, dir=str(root), **config)
    return Checkpointer(spec, ParallelDims(dp=1, pp=1, tp=1))


def _write_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    """A step directory laid out as `Checkpointer` commits one: files, then a manifest of their checksums."""
    d = root / f"step_{step}"
    (d / "engine").mkdir(parents=True)
    (d / "engine" / "mp_rank_00_model_states.pt").write_bytes(f"weights of step {step}".encode() * 100)
    (d / "loader.json").write_text(json.dumps({"epoch": 0, "index": step * 8, "seed": 1}))
    if complete:
        files = {str(p.relative_to(d)): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                         "bytes": p.stat().st_size} for p in d.rglob("*") if p.is_file()}
        (d / "manifest.json").write_text(json.dumps({"step": step, "files": files}))
    return d


def test_the_newest_intact_checkpoint_wins_and_broken_ones_are_named(tmp_path, caplog):
    for step in (10, 20, 30):
        _write_checkpoint(tmp_path, step)
    _write_checkpoint(tmp_path, 40, complete=False)
    victim = tmp_path / "step_30" / "engine" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:-1] + b"X")
    before = victim.read_bytes()
    assert _checkpointer(tmp_path).find_resumable() == "step_20"
    assert f"skipping checkpoint step_40: {tmp_path}/step_40: incomplete, it has no manifest.json" in caplog.text
    assert f"skipping checkpoint step_30: {victim}: sha256" in caplog.text
    assert victim.read_bytes() == before and (tmp_path / "step_40").is_dir()


def test_a_missing_file_is_named(tmp_path):
    _write_checkpoint(tmp_path, 5)
    (tmp_path / "step_5" / "loader.json").unlink()
    assert _checkpointer(tmp_path).verify("step_5") == \
        f"{tmp_path}/step_5/loader.json: missing, listed in manifest.json"


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    _write_checkpoint(tmp_path, 10, complete=False)
    (_write_checkpoint(tmp_path, 20) / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*\n  .*step_20/manifest.json: not valid JSON "
                                              r"at line 1"
                                              r".*\n  .*step_10: incomplete.*\nmove them away"):
        _checkpointer(tmp_path).find_resumable()


def test_an_empty_directory_means_a_fresh_start(tmp_path):
    assert _checkpointer(tmp_path / "new").find_resumable() is None


def test_retention_keeps_the_last_k_and_every_mth(tmp_path):
    for step in range(1, 10):
        _write_checkpoint(tmp_path, step)
    (tmp_path / ".universal" / "step_3").mkdir(parents=True)
    ckpt = _checkpointer(tmp_path, keep_last=2, keep_every=4)
    ckpt.apply_retention(9)
    assert ckpt.list_steps() == [4, 8, 9]
    assert not (tmp_path / ".universal" / "step_3").exists()


def test_universal_info_marks_row_parallel_weights_for_any_tp():
    spec = JobSpec()
    spec.model.vocab_size = 512
    model = build_model(spec.model)
    info = universal_checkpoint_info(model)
    rows = info["parameter_with_row_parallelism_patterns"]
    assert rows == [r"layers\.\d+\.mlp\.down_proj\.weight$", r"layers\.\d+\.self_attn\.o_proj\.weight$"]
    replicated = info["tp_replicated_parameter_patterns"]
    assert r"norm\.weight$" in replicated and r"layers\.\d+\.input_layernorm\.weight$" in replicated
    names = [n for n, _ in model.named_parameters()]
    for pattern in rows + replicated:
        assert any(re.match(pattern, n) for n in names), pattern
    assert not any(re.match(p, "layers.0.self_attn.q_proj.weight") for p in rows + replicated)
    # the tensor-parallel model has the same names, so a checkpoint of either layout converts into the other
    apply_tensor_parallel(model, None, 0, 2)
    assert universal_checkpoint_info(model)["parameter_with_row_parallelism_patterns"] == rows


def test_a_checkpoint_of_another_model_is_refused_by_field(tmp_path):
    saved = JobSpec()
    saved.model.vocab_size = 384
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(saved)))
    check_same_model(str(path), saved)
    now = JobSpec()
    now.model.vocab_size, now.model.dim = 512, 512
    with pytest.raises(CheckpointError, match=r"spec.yaml: the checkpoint's model differs from this run's: "
                                              r"model.vocab_size: 384 in the checkpoint, 512 now; "
                                              r"model.dim: 256 in the checkpoint, 512 now; set"):
        check_same_model(str(path), now)


def test_a_host_snapshot_does_not_follow_later_updates():
    weights = torch.ones(4)
    state = {"module": {"w": weights}, "groups": [{"lr": 0.1, "params": [weights[:2]]}], "step": 3}
    copy = snapshot_to_host(state)
    weights.add_(1)
    assert copy["module"]["w"].tolist() == [1.0] * 4 and copy["groups"][0]["params"][0].tolist() == [1.0, 1.0]
    assert copy["step"] == 3 and copy["groups"][0]["lr"] == 0.1


def test_storage_writes_atomically_and_lists_and_hashes(tmp_path):
    store = Storage(str(tmp_path / "root"))
    store.write_bytes(b"step_3\n", "latest")
    store.write_bytes(b"abc", "step_3", "ranks", "rank_00000.json")
    assert store.read_bytes("latest") == b"step_3\n"
    assert store.list_dir() == ["latest", "step_3"]
    assert store.list_files("step_3") == ["ranks/rank_00000.json"]
    assert store.sha256("step_3", "ranks", "rank_00000.json") == (hashlib.sha256(b"abc").hexdigest(), 3)
    assert not [p for p in (tmp_path / "root").rglob("*.tmp-*")]
    uri = Storage(f"file://{tmp_path / 'root'}")
    assert uri.is_local and uri.read_bytes("latest") == b"step_3\n"


def test_an_unknown_storage_scheme_is_named():
    with pytest.raises(CheckpointError, match=r"checkpoint.dir 'nosuch://bucket/x': not a usable filesystem URI"):
        Storage("nosuch://bucket/x")


def test_the_checkpointer_imports_neither_a_backend_nor_consolidation():
    """The commit protocol and the training loop import no DeepSpeed; consolidation sits above the checkpointer."""
    code = ("import sys, parallel.checkpoint, parallel.restore\n"
            "print(sorted(m for m in ('parallel.consolidate', 'parallel.resume') if m in sys.modules))\n"
            "import parallel.train\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "[]"]
