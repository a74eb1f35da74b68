"""`pretrain train` end to end: torchrun ranks, real shards of the demo corpus, eval, checkpoints, resume."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import losses, pretrain_train
from tests.shards import write_shards

REPO = Path(__file__).resolve().parents[2]
@pytest.mark.slow
def test_train_learns_checkpoints_and_resumes_where_it_stopped(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", seq_len=64, rows=400)
    common = [f"data.path={shards}", f"checkpoint.dir={tmp_path / 'ckpt'}", "parallel.pp=2"]
    first = pretrain_train(2, tmp_path, *common, "schedule.steps=8")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    seen = losses(first.stdout)
    assert sorted(seen) == list(range(1, 9)) and seen[8] < seen[1] - 0.5
    assert "val loss" in first.stdout and "checkpoint" in first.stdout
    assert {"latest", "step_4", "step_8"} <= set(os.listdir(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_8"

    second = pretrain_train(2, tmp_path, *common, "schedule.steps=10")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert sorted(losses(second.stdout)) == [9, 10]
    assert "finished step 10" in second.stdout


def test_a_layout_that_does_not_fit_the_launched_ranks_is_one_readable_error(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", seq_len=64, rows=100)
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(REPO / "examples" / "tiny.yaml"),
                             f"data.path={shards}", "parallel.dp=2"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 2
    assert "parallel: dp=2 × pp=1 × tp=1 = 2, but the run has 1 ranks" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_native_checkpoints_resume_exactly_and_cross_to_deepspeed_and_back(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", seq_len=64, rows=400)
    # a constant LR after warmup, so the runs that go on to 11 steps below train as the 10-step ones
    native = [f"data.path={shards}", "parallel.backend=native", "parallel.zero_stage=3",
              "checkpoint.async_save=true", "schedule.lr_schedule=constant"]
    straight = pretrain_train(2, tmp_path, *native, f"checkpoint.dir={tmp_path / 'straight'}", "schedule.steps=10",
                              "checkpoint.every=4")
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    manifest = (tmp_path / "straight" / "step_8" / "manifest.json").read_text()
    assert "engine/dcp/.metadata" in manifest and ".distcp" in manifest and "engine/engine_state.pt" in manifest

    # a new run from a copy of its step_8 (saved in the background while training went on) trains steps 9 and 10 as it
    shutil.copytree(tmp_path / "straight" / "step_8", tmp_path / "resumed" / "step_8")
    second = pretrain_train(2, tmp_path, *native, f"checkpoint.dir={tmp_path / 'resumed'}", "schedule.steps=10")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = losses(second.stdout)
    assert sorted(after) == [9, 10]
    assert after == {step: loss for step, loss in losses(straight.stdout).items() if step > 8}

    # The other backend (examples/tiny.yaml's deepspeed) goes on from a copy of the native step_8: its step 9 is a
    # forward pass of the same weights over the same batch (optimizer moments restart, they shape only the updates).
    shutil.copytree(tmp_path / "resumed" / "step_8", tmp_path / "crossed" / "step_8")
    other = pretrain_train(2, tmp_path, f"data.path={shards}", f"checkpoint.dir={tmp_path / 'crossed'}",
                           "schedule.steps=11", "schedule.lr_schedule=constant", "checkpoint.every=1")
    assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
    assert "was written by the native backend, this run uses deepspeed" in other.stdout + other.stderr
    crossed = losses(other.stdout)
    assert sorted(crossed) == [9, 10, 11]
    assert crossed[9] == pytest.approx(after[9], abs=2e-4)

    # And back: native goes on from DeepSpeed's step_10, its step 11 the DeepSpeed run's.
    shutil.copytree(tmp_path / "crossed" / "step_10", tmp_path / "back" / "step_10")
    back = pretrain_train(2, tmp_path, *native, f"checkpoint.dir={tmp_path / 'back'}", "schedule.steps=11")
    assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-3000:]
    assert "was written by the deepspeed backend, this run uses native" in back.stdout + back.stderr
    assert losses(back.stdout) == {11: pytest.approx(crossed[11], abs=2e-4)}


@pytest.mark.slow
def test_native_tensor_parallel_trains_through_the_loop(tmp_path: Path) -> None:
    """DTensor (sharded) and plain (replicated) parameters share one fused/foreach AdamW."""
    shards = write_shards(tmp_path / "shards", seq_len=64, rows=200)
    result = pretrain_train(2, tmp_path, f"data.path={shards}", "parallel.backend=native", "parallel.tp=2",
                            f"checkpoint.dir={tmp_path / 'ckpt'}", "schedule.steps=4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = losses(result.stdout)
    assert sorted(seen) == [1, 2, 3, 4] and seen[4] < seen[1]


@pytest.mark.slow
def test_a_rank_slow_between_steps_is_the_busy_one_not_the_ones_waiting_for_it(tmp_path: Path) -> None:
    """Rank 1 sleeps 0.3 s in a callback after each step. The whole step is as long on every rank (rank 0 even looks
    slower: it waits for rank 1 at the next step's start); the busy time names rank 1, as the controller needs."""
    from busy_worker import SLOW_S

    from orchestrator.stragglers import find_stragglers

    shards = write_shards(tmp_path / "shards", seq_len=64, rows=200)
    result = pretrain_train(2, tmp_path, f"data.path={shards}", "parallel.backend=native", "schedule.steps=6",
                            f"checkpoint.dir={tmp_path / 'ckpt'}", "schedule.eval_every=0", "checkpoint.every=0",
                            program=(str(Path(__file__).with_name("busy_worker.py")), str(tmp_path)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())[1:] for r in (0, 1)]  # step 1 follows setup
    busy = [statistics.median(s["busy_seconds"] for s in steps) for steps in ranks]
    wall = [statistics.median(s["step_seconds"] for s in steps) for steps in ranks]
    assert busy[1] - busy[0] > 0.8 * SLOW_S, (busy, wall)
    assert wall[0] - busy[0] > 0.8 * SLOW_S, (busy, wall)  # rank 0 spent it waiting
    assert set(find_stragglers(dict(enumerate(busy)), 1.0)) == {1}
    assert set(find_stragglers(dict(enumerate(wall)), 1.0)) == {0}  # what the whole step alone would blame
