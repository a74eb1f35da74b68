"""Corrupt bytes in the files the project writes and reads back (checkpoint manifests and rank markers, loader.json,
a checkpoint's spec.yaml, results.jsonl, the Prometheus targets file, a safetensors index, a prep task's record)
and in the spec the controller is handed: one readable message naming the file, in the error class of its reader,
never a traceback.

The general refusals (alias bombs, depth, NaN, oversize) are `test_hostile_input`'s; here each reader is shown to go
through the bounded readers, and to name the shape it needs when the JSON is valid but not what it wrote.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.metrics import write_targets_file
from cluster.submission import SPEC_VARIABLE
from dataprep.executor import DONE_SUFFIX, read_done
from orchestrator.errors import CheckpointError, DataError, UserError
from orchestrator.planner.sweep import read_results
from orchestrator.spec import JobSpec
from parallel import checkpoint_layout as names
from parallel.checkpoint import Checkpointer, _SaveJob
from parallel.hf import open_hf_weights
from parallel.parallel_dims import ParallelDims
from parallel.restore import Opened, check_same_model, restore_rank_state

NOT_UTF8 = b'{"files": "caf\xe9"}'
NOT_UTF8_MESSAGE = r"not UTF-8 text: byte 0xe9 at line 1, column 15"


def _checkpointer(root: Path) -> Checkpointer:
    spec = JobSpec()
    spec.checkpoint = dataclasses.replace(spec.checkpoint, dir=str(root))
    return Checkpointer(spec, ParallelDims(dp=1, pp=1, tp=1))


@pytest.mark.parametrize(("content", "message"), [
    (NOT_UTF8, NOT_UTF8_MESSAGE),
    (b'{"files": {"a": {"sha256": "00"', r"not valid JSON at line 1, column 32: Expecting .,. delimiter"),
    (b'{"files": {"a": {"sha256": 1, "bytes": 2}}}', r'not a file list: it needs "files"'),
    (b"[]", r'not a file list: it needs "files"'),
])
def test_a_corrupt_manifest_is_named_and_skipped(tmp_path, content, message):
    step = tmp_path / "step_5"
    step.mkdir()
    (step / names.MANIFEST_FILE).write_bytes(content)
    reason = _checkpointer(tmp_path).verify("step_5")
    assert reason is not None
    assert re.match(f"{step}/manifest.json: {message}", reason), reason
    assert (step / names.MANIFEST_FILE).read_bytes() == content


def test_a_corrupt_rank_marker_stops_the_commit_with_its_name(tmp_path):
    checkpointer = _checkpointer(tmp_path)
    marker_dir = tmp_path / "step_7.partial" / names.RANKS_DIR
    marker_dir.mkdir(parents=True)
    (marker_dir / names.rank_file(0, ".json")).write_bytes(b'{"rank": 0, "files": {"engine/x": ')
    job = _SaveJob(step=7, name="step_7", write_dir="step_7.partial", local=str(tmp_path / "staging"), engine=None,
                   rng={}, loader_state=None)
    with pytest.raises(CheckpointError, match=r"step_7.partial/ranks/rank_00000.json: not valid JSON at line 1"):
        checkpointer._commit(job)
    assert not (tmp_path / "step_7.partial" / names.MANIFEST_FILE).exists()
    assert not (tmp_path / names.LATEST_FILE).exists()


@pytest.mark.parametrize(("content", "message"), [
    (NOT_UTF8, NOT_UTF8_MESSAGE),
    (b'{"epoch": 0, "index": NaN}', r"NaN is not a number JSON allows here"),
    (b"[0, 8]", r"expected a JSON object \(the loader position\), got list"),
])
def test_a_corrupt_loader_position_is_a_checkpoint_error(tmp_path, content, message):
    (tmp_path / names.LOADER_FILE).write_bytes(content)
    with pytest.raises(CheckpointError, match=f"^{tmp_path}/loader.json: {message}"):
        restore_rank_state(Opened(name="step_1", local=str(tmp_path), layout={}), rank=0)


@pytest.mark.parametrize(("content", "message"), [
    (b"model: {dim: caf\xe9}\n", r"not UTF-8 text: byte 0xe9 at line 1, column 17"),
    (b"model: {dim: 256\n", r"not valid YAML at line 2, column 1"),
    (b"- model\n", r"expected a job spec with a `model` section"),
    (b"model: 256\n", r"expected a job spec with a `model` section"),
])
def test_a_corrupt_saved_spec_is_a_checkpoint_error(tmp_path, content, message):
    path = tmp_path / names.SPEC_FILE
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"^{path}: {message}"):
        check_same_model(str(path), JobSpec())


@pytest.mark.parametrize(("line", "message"), [
    (b'{"name": "t-d32", "params": 1e6, "tokens": 5e3, "val_loss": 3.1, "seconds": 4', r"not valid JSON at line 1"),
    (b"caf\xe9", r"not UTF-8 text"),
    (b'{"name": "t-d32", "params": "many", "tokens": 5e3, "val_loss": 3.1, "seconds": 4}', r"not a finished run"),
])
def test_a_corrupt_results_line_is_named_with_its_number(tmp_path, line, message):
    path = tmp_path / "results.jsonl"
    good = b'{"name": "t-d16", "params": 1e5, "tokens": 5e3, "val_loss": null, "seconds": 2}\n'
    path.write_bytes(good + b"\n" + line + b"\n")
    with pytest.raises(UserError, match=f"^{path}(, line 3)?: {message}.*; delete the line and run the sweep again"):
        read_results(path)
    path.write_bytes(good)
    assert [r["name"] for r in read_results(path)] == ["t-d16"]


@pytest.mark.parametrize(("content", "message"), [
    (NOT_UTF8, r"not UTF-8 text: byte 0xe9"),
    (b'[{"targets": ["h:1"], "labels": ["run"]}]', r"each group is an object with targets and labels"),
])
def test_a_corrupt_targets_file_is_kept_and_named(tmp_path, content, message):
    path = tmp_path / "targets.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"^metrics.targets_file: {path} is not a Prometheus file_sd list of target "
                                        f"groups \\({message}"):
        write_targets_file(path, [{"targets": ["h:2"], "labels": {"run": "a"}}])
    assert path.read_bytes() == content


@pytest.mark.parametrize(("content", "message"), [
    (b'{"weight_map": {"a": "model-00001.safetensors"', r"not valid JSON at line 1, column 47"),
    (b'{"weight_map": {"a": "../../secrets.safetensors"}}', r"not a safetensors index: it needs \"weight_map\""),
    (b'{"weight_map": {"a": 1}}', r"not a safetensors index"),
])
def test_a_corrupt_safetensors_index_is_a_user_error(tmp_path, content, message):
    (tmp_path / "model.safetensors.index.json").write_bytes(content)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, '
                                          '"num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 256}')
    with pytest.raises(UserError, match=f"^{tmp_path}/model.safetensors.index.json: {message}"):
        open_hf_weights(str(tmp_path))


@pytest.mark.parametrize(("content", "message"), [
    (NOT_UTF8, NOT_UTF8_MESSAGE),
    (b"[3]", r"expected a JSON object \(the task's stats\), got list"),
])
def test_a_corrupt_prep_task_record_is_a_data_error(tmp_path, content, message):
    (tmp_path / f"part-0{DONE_SUFFIX}").write_bytes(content)
    with pytest.raises(DataError, match=f"^{tmp_path}/part-0{DONE_SUFFIX}: {message}.*; delete the file"):
        read_done(str(tmp_path), "part-0")


def test_the_controller_names_a_corrupt_spec_variable_with_exit_2():
    env = {**os.environ, SPEC_VARIABLE: "model: {dim: [\n"}
    done = subprocess.run([sys.executable, "-m", "orchestrator.controller"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(f"pretrain: {SPEC_VARIABLE}: 1 problem\n +not valid YAML at line 2, column 1: did not find "
                        "expected node content", done.stderr.strip()), done.stderr
    assert "Traceback" not in done.stderr

