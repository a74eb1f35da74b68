"""Experiment trackers: a CPU training run with an in-loop lm-eval task writes its scalars to Prometheus, TensorBoard,
an offline W&B run and an MLflow sqlite store, each read back with that tool's own reader (`tests.tracker_files`); a
resumed run continues the same tracker runs; replayed and rewound-over steps, a failed attempt, and the refusals.
The same through Ray, with a rank killed mid-run: tests/orchestrator/test_job_log.py.
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from cluster import metrics as prometheus
from orchestrator.cli import main as pretrain
from orchestrator.errors import SpecError, UserError
from orchestrator.validate import parse_spec
from parallel import trackers
from parallel.callbacks import EvalStats, SpikeStats, StepStats, read_history
from parallel.launch import RankEnv
from parallel.storage import Storage
from parallel.trackers import TrackerCallback, eval_scalars, read_ids, score_name, step_scalars
from parallel.train import run
from tests.helpers import TINY_RUN
from tests.parallel.test_hf_layouts import byte_tokenizer
from tests.shards import write_shards
from tests.tracker_files import mlflow_history, tensorboard_scalars, wandb_config, wandb_history

ALL = "metrics.loggers=[prometheus,tensorboard,wandb,mlflow]"
SCORES = {"hellaswag/acc_norm": 0.25, "arc_easy/acc,none": 0.5}


def tracker_spec(root: Path, *overrides: str):
    return parse_spec({"name": "tracked"}, overrides=[
        *TINY_RUN, f"checkpoint.dir={root / 'ckpt'}", "resources.device=cpu", "resources.gpus_per_node=1",
        "model.vocab_size=512", "parallel.precision=fp32", ALL, *overrides])


def mlflow_run(root: Path, run_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'ckpt' / 'mlflow.db'}")
    return client, client.get_run(run_id)


def assert_series(got: list[tuple[int, float]], want: list[tuple[int, float]], rel: float) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=rel)


# ---------------------------------------------------------------------------------------------- tests


@pytest.fixture
def rank_env(monkeypatch) -> RankEnv:
    """A single rank on a free port; the torchrun variables it exports are put back after the test."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")
    return RankEnv(master_port=0)


def multiple_choice_task(directory: Path) -> Path:
    """A local lm-eval task (YAML + JSONL): which continuation of a line of the corpus is likelier."""
    directory.mkdir()
    rows = [{"q": "In the beginning God created the", "c": [" heaven", " qzxv"]},
            {"q": "And God said, Let there be", "c": [" light", " zzkq"]},
            {"q": "import", "c": [" os", " qq"]}]
    (directory / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "tracked_mc.yaml").write_text(yaml.safe_dump({
        "task": "tracked_mc", "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
        "dataset_kwargs": {"data_files": {"test": str(directory / "mc.jsonl")}, "cache_dir": str(directory / "hf")},
        "doc_to_text": "{{q}}", "doc_to_choice": "{{c}}", "doc_to_target": 0, "metric_list": [{"metric": "acc"}]}))
    return directory


def test_a_run_and_its_resume_write_the_same_scalars_to_every_tracker(tmp_path, rank_env, one_thread, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    shards = write_shards(tmp_path / "shards", seq_len=64, rows=200)
    byte_tokenizer(shards / "tokenizer.json")
    tasks = multiple_choice_task(tmp_path / "tasks")
    common = (f"data.path={shards}", "eval.tasks=tracked_mc", f"eval.include_path={tasks}", "eval.every=0")
    run(tracker_spec(tmp_path, *common, "schedule.steps=4"), rank_env)
    resumed = tracker_spec(tmp_path, *common, "schedule.steps=6", "schedule.eval_every=3")
    exporter = prometheus.RankExporter.from_spec(resumed, 0, 0, advertise_host="127.0.0.1")
    run(resumed, RankEnv(master_port=0), callbacks=[exporter])

    history = read_history(str(tmp_path / "ckpt" / "history.jsonl"))
    losses = [(r["step"], r["loss"]) for r in history["step"]]
    evals = [(r["step"], r["loss"]) for r in history["eval"]]
    scores = [(r["step"], r["scores"]["tracked_mc/acc"]) for r in history["eval"]]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6] and [s for s, _ in evals] == [4, 6]
    assert {score for _, score in scores} <= {0.0, 1 / 3, 2 / 3, 1.0}

    scraped = generate_latest(exporter.exporter.registry).decode()
    assert f'pretrain_eval_loss{{run="tracked"}} {evals[-1][1]!r}' in scraped
    assert f'pretrain_eval_score{{metric="acc",run="tracked",task="tracked_mc"}} {scores[-1][1]!r}' in scraped

    board = tensorboard_scalars(tmp_path / "ckpt" / "tensorboard")
    assert_series(board["pretrain_loss"], losses, rel=1e-6)  # TensorBoard keeps float32
    assert_series(board["pretrain_eval_loss"], evals, rel=1e-6)
    assert_series(board["pretrain_eval_score/tracked_mc/acc"], scores, rel=1e-6)
    assert [s for s, _ in board["pretrain_learning_rate"]] == [1, 2, 3, 4, 5, 6]

    ids = read_ids(Storage(str(tmp_path / "ckpt")))
    runs = sorted((tmp_path / "ckpt" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one directory per attempt, both the same W&B run
    seen = [wandb_history(r) for r in runs]
    assert {run_id for run_id, _ in seen} == {ids["wandb"]}
    assert [wandb_config(r)["schedule"]["steps"] for r in runs] == [4, 6]  # each attempt's resolved spec
    assert wandb_config(runs[0])["name"] == "tracked"
    assert seen[0][1]["pretrain_loss"] + seen[1][1]["pretrain_loss"] == losses
    assert seen[0][1]["pretrain_eval_loss"] + seen[1][1]["pretrain_eval_loss"] == evals
    assert seen[0][1]["pretrain_eval_score/tracked_mc/acc"] + seen[1][1]["pretrain_eval_score/tracked_mc/acc"] == scores

    client, mlflow = mlflow_run(tmp_path, ids["mlflow"])
    assert mlflow.info.run_name == "tracked" and mlflow.info.status == "FINISHED"
    assert mlflow.data.params["schedule.steps"] == "4"  # the first attempt's spec; later ones add new keys only
    assert mlflow.data.params["metrics.loggers"] == "prometheus,tensorboard,wandb,mlflow"
    assert mlflow_history(client, ids["mlflow"], "pretrain_loss") == losses
    assert mlflow_history(client, ids["mlflow"], "pretrain_eval_loss") == evals
    assert mlflow_history(client, ids["mlflow"], "pretrain_eval_score/tracked_mc/acc") == scores


def test_replayed_steps_and_scores_after_a_resume(tmp_path):
    """A crash after step 3 (the MLflow run marked failed), resumed from the checkpoint at step 2, then a spike at step
    5 rewound over: TensorBoard keeps each step's last values, MLflow and W&B the first they received (W&B offline
    writes the replay after the crash into the attempt's own directory). Downstream scores and spikes go everywhere."""
    spec = tracker_spec(tmp_path)
    first = TrackerCallback(spec)
    first.on_train_start(0, 0)
    for n in (1, 2, 3):
        first.on_step(step(n, 10.0 - n))
        if n == 2:
            first.on_eval(EvalStats(step=2, loss=math.nan, batches=0, seconds=1.0, scores=SCORES))
    with pytest.raises(RuntimeError, match="the loop broke"):
        try:
            raise RuntimeError("the loop broke")
        finally:  # as `parallel.train.run` closes its callbacks
            first.close()
    ids = read_ids(Storage(str(tmp_path / "ckpt")))
    client, crashed = mlflow_run(tmp_path, ids["mlflow"])
    assert crashed.info.status == "FAILED"
    again = TrackerCallback(spec)
    again.on_train_start(2, 0)
    for n in (3, 4):
        again.on_step(step(n, 5.0 - n))
    again.on_spike(SpikeStats(step=5, action="rewind", loss=9.0, grad_norm=1.0, loss_median=1.5, loss_mad=0.1,
                              grad_norm_median=1.0, grad_norm_mad=0.1, rewound_to=3))
    for n, loss in ((4, 0.5), (5, 0.25)):  # back to the checkpoint of step 3, the spike's data skipped
        again.on_step(step(n, loss))
    again.close()

    board = tensorboard_scalars(tmp_path / "ckpt" / "tensorboard")
    assert board["pretrain_loss"] == [(1, 9.0), (2, 8.0), (3, 2.0), (4, 0.5), (5, 0.25)]
    assert board["pretrain_eval_score/hellaswag/acc_norm"] == [(2, 0.25)]
    assert board["pretrain_eval_score/arc_easy/acc_none"] == [(2, 0.5)]
    assert "pretrain_eval_loss" not in board  # a downstream-only evaluation has no held-out loss
    assert board[f"{prometheus.LOSS_SPIKES.name}/rewind"] == [(5, 1.0)]

    assert read_ids(Storage(str(tmp_path / "ckpt"))) == ids
    assert client.get_run(ids["mlflow"]).info.status == "FINISHED"
    assert mlflow_history(client, ids["mlflow"], "pretrain_loss") == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 1.0),
                                                                      (5, 0.25)]
    assert mlflow_history(client, ids["mlflow"], "pretrain_eval_score/hellaswag/acc_norm") == [(2, 0.25)]

    first_run, second_run = sorted((tmp_path / "ckpt" / "wandb").glob("offline-run-*"))
    assert wandb_history(first_run)[1]["pretrain_eval_score/arc_easy/acc_none"] == [(2, 0.5)]
    run_id, replayed = wandb_history(second_run)
    assert run_id == ids["wandb"] and replayed["pretrain_loss"] == [(3, 2.0), (4, 1.0), (5, 0.25)]


def step(n: int, loss: float) -> StepStats:
    return StepStats(step=n, loss=loss, lr=1e-3, grad_norm=1.0, tokens=256, step_seconds=0.1,
                     tokens_per_second=2560.0, mfu=None)


def test_a_stuck_tracker_loses_its_oldest_records_not_the_steps_time(tmp_path, monkeypatch):
    """MLflow's database held locked by another connection: the steps go on at once, the queue keeps the newest
    records, and what it dropped is counted; once the lock goes, MLflow has the first batch and the newest records."""
    monkeypatch.setattr(trackers, "QUEUE_RECORDS", 4)
    callback = TrackerCallback(tracker_spec(tmp_path, "metrics.loggers=[mlflow]"))
    callback.on_train_start(0, 0)
    lock = sqlite3.connect(tmp_path / "ckpt" / "mlflow.db", isolation_level=None, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(30.0, lambda: lock.execute("ROLLBACK"))  # only if the steps wait for the lock
    release.start()
    begin = time.perf_counter()
    for n in range(1, 12):
        callback.on_step(step(n, float(n)))
    took = time.perf_counter() - begin
    release.cancel()
    release.join()
    if lock.in_transaction:
        lock.execute("ROLLBACK")
    assert took < 1.0, f"the steps took {took:.1f} s behind the lock"
    callback.close()
    lock.close()
    run_id = read_ids(Storage(str(tmp_path / "ckpt")))["mlflow"]
    client, _ = mlflow_run(tmp_path, run_id)
    kept = [s for s, _ in mlflow_history(client, run_id, "pretrain_loss")]
    assert kept[-4:] == [8, 9, 10, 11] and callback.dropped == 11 - len(kept) > 0


def test_tracker_names_are_the_prometheus_names():
    names = {metric.name for metric in prometheus.CATALOGUE}
    stats = StepStats(step=1, loss=1.0, lr=1e-3, grad_norm=1.0, tokens=1, step_seconds=1.0, tokens_per_second=1.0,
                      mfu=0.5, busy_seconds=0.5)
    assert set(step_scalars(stats)) <= names
    assert set(eval_scalars(EvalStats(step=1, loss=1.0, batches=1, seconds=1.0))) <= names
    assert score_name("hellaswag/acc_norm") == f"{prometheus.EVAL_SCORE.name}/hellaswag/acc_norm"
    assert score_name("../x/acc,none") == "pretrain_eval_score/_x/acc_none"


def test_a_tracker_that_cannot_write_is_named_before_the_first_step(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    spec = tracker_spec(tmp_path, f"metrics.tensorboard.dir={tmp_path / 'file' / 'tb'}")
    with pytest.raises(UserError, match=r"metrics.tensorboard.dir: cannot write in .*/file/tb \(Not a directory\)"):
        TrackerCallback(spec).on_train_start(0, 0)
    assert (tmp_path / "file").read_text() == "not a directory"


def test_a_tracker_not_installed_is_refused_at_validation(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what importlib finds when a package is not there
    with pytest.raises(SpecError, match=r"metrics.loggers: mlflow named but not installed here: "
                                        r"pip install 'pretrain\[trackers\]'"):
        parse_spec({}, overrides=[ALL])
    assert parse_spec({}, overrides=[ALL, "metrics.enabled=false"]).metrics.missing_trackers() == []
    (tmp_path / "job.yaml").write_text("metrics: {loggers: [prometheus, mlflow]}\n")
    assert pretrain(["validate", str(tmp_path / "job.yaml")]) == 2
    assert capsys.readouterr().err.splitlines()[1:] == [
        "  metrics.loggers: mlflow named but not installed here: pip install 'pretrain[trackers]', or take it out of "
        "the list"]


def test_a_tracker_named_wrongly_or_twice_is_refused(tmp_path, capsys):
    (tmp_path / "job.yaml").write_text("metrics: {loggers: [prometheus, tensorbord, wandb, wandb]}\n")
    assert pretrain(["validate", str(tmp_path / "job.yaml"), "metrics.wandb.mode=shared"]) == 2
    assert capsys.readouterr().err.splitlines()[1:] == [
        "  metrics.loggers: got 'tensorbord', allowed: 'prometheus', 'tensorboard', 'wandb', 'mlflow'",
        "  metrics.wandb.mode: got 'shared', allowed: 'offline', 'online'"]
    (tmp_path / "job.yaml").write_text("metrics: {loggers: [wandb, wandb]}\n")
    assert pretrain(["validate", str(tmp_path / "job.yaml")]) == 2
    assert "  metrics.loggers: 'wandb' is named twice" in capsys.readouterr().err
