"""The run history: rank 0 writes it, a resumed run appends to it, the reader keeps the last record of each step."""

from __future__ import annotations

from parallel.callbacks import CheckpointStats, EvalStats, HistoryCallback, StepStats, read_history


def step(n: int, loss: float, rank: int = 0) -> StepStats:
    return StepStats(step=n, loss=loss, lr=1e-3, grad_norm=1.0, tokens=256, step_seconds=0.1,
                     tokens_per_second=2560.0, mfu=0.0, rank=rank)


def test_history_survives_a_resume(tmp_path):
    path = str(tmp_path / "run" / "history.jsonl")
    first = HistoryCallback(path)
    for n, loss in [(1, 9.0), (2, 8.0), (3, 7.5)]:
        first.on_step(step(n, loss))
        first.on_step(step(n, loss + 100, rank=1))
    first.on_eval(EvalStats(step=2, loss=7.9, batches=2, seconds=0.1))
    first.on_checkpoint(CheckpointStats(step=2, path="step_2", seconds=0.01))
    first.close()
    resumed = HistoryCallback(path)  # the crash lost step 3; it is trained again from the checkpoint at step 2
    resumed.on_step(step(3, 7.4))
    resumed.on_eval(EvalStats(step=3, loss=7.2, batches=2, seconds=0.1))
    resumed.close()

    history = read_history(path)
    assert [(r["step"], r["loss"]) for r in history["step"]] == [(1, 9.0), (2, 8.0), (3, 7.4)]
    assert [(r["step"], r["loss"]) for r in history["eval"]] == [(2, 7.9), (3, 7.2)]
    assert [r["path"] for r in history["checkpoint"]] == ["step_2"]


def test_only_rank_0_writes(tmp_path):
    path = tmp_path / "history.jsonl"
    callback = HistoryCallback(str(path))
    callback.on_step(step(1, 5.0, rank=1))
    callback.close()
    assert not path.exists()
