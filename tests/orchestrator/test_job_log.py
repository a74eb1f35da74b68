"""What a submitted job's log and history tell: each rank's lines as printed (never folded by Ray), the checkpoint and
data position every attempt resumed from, a user error (a corrupt shard) as one message without a traceback, and a
history.jsonl with one record per step after a replay; the experiment trackers (TensorBoard, W&B offline, MLflow) hold
both attempts in one tracker run each, with the in-loop downstream scores of both, which a real Prometheus also scraped.

The jobs go through the Jobs API of the shared simulated two-node cluster with the real training loop; a rank is made
to exit mid-run by the worker's fault injection (`PRETRAIN_TEST_EXIT`).
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from parallel.callbacks import CheckpointStats, HistoryCallback, StepStats, read_history

STEPS = 6
TASK, METRIC = "tracked_mc", "acc"  # the killed-rank run's downstream score: a local task, every 2 steps
SCORE = f"{TASK}/{METRIC}"


def _step(n: int, loss: float) -> StepStats:
    return StepStats(step=n, loss=loss, lr=1e-3, grad_norm=1.0, tokens=256, step_seconds=0.1,
                     tokens_per_second=2560.0, mfu=0.0)


def _records(path) -> list[tuple[str, int, float | str]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["kind"], r["step"], r.get("loss", r.get("path"))) for r in lines]


def test_history_replaces_the_records_of_replayed_steps(tmp_path):
    path = tmp_path / "run" / "history.jsonl"
    first = HistoryCallback(str(path))
    first.on_train_start(0, 0)
    for n in (1, 2, 3):
        first.on_step(_step(n, 10.0 - n))
        if n == 2:
            first.on_checkpoint(CheckpointStats(step=2, path="step_2", seconds=0.01))
    first.close()
    with open(path, "a") as f:
        f.write('{"kind": "step", "step": 4, "lo')  # the crash cut the last line off
    resumed = HistoryCallback(str(path))
    resumed.on_train_start(2, 1)  # only rank 0 rewrites the file
    assert path.read_text().count("\n") == 4
    resumed.on_train_start(2, 0)  # steps 3 and 4 are trained again, from the checkpoint of step 2
    for n in (3, 4):
        resumed.on_step(_step(n, 5.0 - n))
    resumed.close()
    assert _records(path) == [("step", 1, 9.0), ("step", 2, 8.0), ("checkpoint", 2, "step_2"), ("step", 3, 2.0),
                              ("step", 4, 1.0)]
    assert not list(path.parent.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------- submitted jobs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tests.parallel.test_hf_layouts import byte_tokenizer
    from tests.shards import write_shards

    directory = write_shards(tmp_path_factory.mktemp("joblog") / "shards", seq_len=64, rows=200)
    byte_tokenizer(directory / "tokenizer.json")  # what downstream evaluation tokenizes its tasks with
    return directory


def _spec(tmp_path, shards, name: str):
    from orchestrator.validate import parse_spec

    return parse_spec({
        "name": name,
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "multiple_of": 16},
        "data": {"path": str(shards), "seq_len": 64},
        "parallel": {"backend": "native", "zero_stage": 1, "micro_batch_size": 2, "precision": "fp32"},
        "schedule": {"steps": STEPS, "warmup_steps": 2, "eval_every": 0, "log_every": 1, "seed": 3},
        "checkpoint": {"dir": str(tmp_path / "checkpoints"), "every": 2, "keep_last": 2, "async_save": False},
        "resources": {"num_nodes": 2, "gpus_per_node": 1, "cpus_per_rank": 0.5, "max_restarts": 2,
                      "restart_backoff_s": 0.2, "hang_timeout_s": 120},
    })


def _run_to_end(cluster, spec, job: str, env: dict[str, str] | None = None, timeout: float = 420.0) -> tuple:
    from cluster import submission

    submission.submit(cluster.jobs_url, spec, env=env, submission_id=job)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = submission.job_info(cluster.jobs_url, job)
        if submission.status_name(info) in ("SUCCEEDED", "FAILED", "STOPPED"):
            return info, submission.logs(cluster.jobs_url, job)
        time.sleep(1.0)
    raise AssertionError(f"job {job} still running after {timeout:g} s")


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_job_log_of_a_killed_rank_names_the_resume_point_and_folds_nothing(ray_cluster, shards, tmp_path):
    from tests.cluster.prometheus_server import PrometheusServer
    from tests.parallel.test_trackers import multiple_choice_task

    spec = _spec(tmp_path, shards, "joblog")
    spec.metrics.loggers = ("prometheus", "tensorboard", "wandb", "mlflow")
    # Scored at step 2 by the first attempt, at 4 and 6 (the last) by the one resumed from step 2.
    spec.eval.tasks, spec.eval.every = TASK, 2
    spec.eval.include_path = str(multiple_choice_task(tmp_path / "tasks"))
    # Ray would fold lines alike but for their numbers that come from several ranks within its window (5 s); a window
    # as long as the job puts the four start lines of the two attempts in one, where folding would show.
    # Rank 0 stays after step 5 (its exporter showing step 4's score) until Prometheus has scraped a score, if it
    # has not by then.
    scraped_once = tmp_path / "scraped"
    env = {"PRETRAIN_TEST_EXIT": f"1:3:{tmp_path / 'exited'}", "PRETRAIN_TEST_HOLD": f"0:5:{scraped_once}",
           "RAY_DEDUP_LOGS_AGG_WINDOW_S": "600", "HF_DATASETS_OFFLINE": "1"}
    prometheus = PrometheusServer(tmp_path / "prometheus", tmp_path / "targets.json")  # the run's default targets

    def release_once_scraped() -> None:
        deadline = time.monotonic() + 120
        while not prometheus.query('pretrain_eval_score{run="joblog"}') and time.monotonic() < deadline:
            time.sleep(0.5)
        scraped_once.touch()

    threading.Thread(target=release_once_scraped, daemon=True).start()
    try:
        info, log = _run_to_end(ray_cluster, spec, "joblog", env=env)
        scraped = [prometheus.query(f'{over}(pretrain_eval_score{{run="joblog"}}[10m])')
                   for over in ("min_over_time", "max_over_time")]
    finally:
        prometheus.stop()
    assert info.status == "SUCCEEDED", log[-4000:]
    assert "injected exit after step 3" in log
    assert "across cluster]" not in log  # Ray's mark of folded lines: "[repeated 2x across cluster]"
    for rank in (0, 1):  # the line every rank prints at the start of each of the two attempts, each one as printed
        assert len(re.findall(rf"\(rank{rank} pid=\d+[^)]*\) rank {rank} of 2: ", log)) == 2, log[-4000:]
    assert f"starting at step 0 with fresh weights (no checkpoint in {spec.checkpoint.dir})" in log
    # Rank 1 exited after step 3: the next attempt resumes from the checkpoint of step 2, at the data read by then
    # (2 steps × 2 ranks × micro-batch 2 = sample 8).
    resumed = f"resumed from checkpoint {spec.checkpoint.dir}/step_2 (step 2); data position: epoch 0, sample 8 of "
    assert resumed in log, log[-4000:]
    history = read_history(str(tmp_path / "checkpoints" / "history.jsonl"))
    assert [r["step"] for r in history["step"]] == list(range(1, STEPS + 1))
    scores = [(r["step"], r["scores"][SCORE]) for r in history["eval"]]
    assert [s for s, _ in scores] == [2, 4, 6], history["eval"]
    assert not (tmp_path / "targets.json").exists()  # the finished run's exporters are out of Prometheus's targets
    assert_trackers_continued(tmp_path / "checkpoints", scores)
    samples = [sample for found in scraped for sample in found]
    labels = {(s["metric"]["task"], s["metric"]["metric"], s["metric"]["role"]) for s in samples}
    assert labels == {(TASK, METRIC, "rank")}, samples
    assert {float(s["value"][1]) for s in samples} <= {score for _, score in scores}, samples


def assert_trackers_continued(checkpoints, scores: list[tuple[int, float]]) -> None:
    """Both attempts wrote to the same tracker runs, the replayed step is in each once, and so is each downstream
    score (`scores`: history.jsonl's)."""
    from mlflow.tracking import MlflowClient

    from parallel.trackers import score_name
    from tests.tracker_files import mlflow_history, tensorboard_scalars, wandb_history

    ids, every_step = json.loads((checkpoints / "trackers.json").read_text()), list(range(1, STEPS + 1))
    name = score_name(SCORE)
    client = MlflowClient(tracking_uri=f"sqlite:///{checkpoints / 'mlflow.db'}")
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
    assert [s for s, _ in mlflow_history(client, ids["mlflow"], "pretrain_loss")] == every_step
    assert mlflow_history(client, ids["mlflow"], name) == scores
    board = tensorboard_scalars(checkpoints / "tensorboard")
    assert [s for s, _ in board["pretrain_loss"]] == every_step
    assert [s for s, _ in board[name]] == [s for s, _ in scores]
    assert [v for _, v in board[name]] == pytest.approx([v for _, v in scores], rel=1e-6)  # TensorBoard's float32
    # W&B writes through a service process of its own, which the gang restart kills with the first attempt's rank 0:
    # what it had written by then stays (its run record first, when any), the rest of that attempt is lost.
    (first_id, first), (last_id, last) = [wandb_history(d) for d in
                                          sorted((checkpoints / "wandb").glob("offline-run-*"))]
    assert last_id == ids["wandb"] and first_id in ("", ids["wandb"])
    assert [s for s, _ in last["pretrain_loss"]][-1] == STEPS
    assert first.get(name, []) in ([], scores[:1]) and last[name] == scores[1:]  # each attempt's own scores


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_corrupt_shard_is_one_message_without_traceback(ray_cluster, tmp_path):
    from tests.shards import write_shards

    shards = write_shards(tmp_path / "shards", seq_len=64, rows=200)
    shard = sorted(shards.glob("**/*.arrow"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    info, log = _run_to_end(ray_cluster, _spec(tmp_path, shards, "corrupt"), "corrupt")
    assert (info.status, info.driver_exit_code) == ("FAILED", 2), log[-4000:]
    assert "Traceback" not in log, log[-6000:]
    errors = [line for line in log.splitlines() if "DataError" in line]
    assert len(errors) == 1, log[-6000:]
    assert errors[0].startswith("pretrain: every rank: DataError: ") and shard.name in errors[0], errors
    assert not (tmp_path / "targets.json").exists()  # nor a failed run's
