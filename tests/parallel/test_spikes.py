"""Loss spikes: a batch whose loss is scaled (the test hook of `parallel.spikes`) is skipped or rewound over, and the
run ends exactly where a run that never read that data (`data.skip` set to the window the spike record names) ends.

Single-process runs of a tiny model on real shards, in this process (a gloo group of one).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest

from cluster.metrics import RankExporter
from orchestrator.errors import SpecError, UserError
from orchestrator.spec import SpikesConfig
from orchestrator.validate import parse_spec
from parallel.callbacks import read_history
from parallel.launch import RankEnv, shutdown_distributed
from parallel.spikes import INJECT_VARIABLE, SpikeDetector
from parallel.train import run
from tests.shards import write_shards

STEPS, BATCH = 12, 4  # global batch: micro_batch_size 4 × grad_accum 1 × dp 1


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("spikes") / "shards", seq_len=32, rows=160)


def train(shards: Path, out: Path, *, action: str, skip: str = "", backend: str = "native",
          callbacks=()) -> tuple[float, dict]:
    spec = parse_spec({
        "name": "spiky",
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "multiple_of": 16},
        "data": {"path": str(shards), "seq_len": 32, "prefetch": 0, "skip": skip},
        "parallel": {"backend": backend, "micro_batch_size": BATCH, "precision": "fp32"},
        "optim": {"lr": 3e-3, "min_lr": 3e-4},
        "schedule": {"steps": STEPS, "warmup_steps": 2, "eval_every": 0, "log_every": 100},
        "checkpoint": {"dir": str(out), "every": 4, "async_save": False},
        "spikes": {"action": action, "window": 4, "threshold": 1000.0, "min_steps_before_active": 4},
        "resources": {"device": "cpu", "gpus_per_node": 1},
    }, require_data=True)
    result = run(spec, RankEnv(master_port=0), callbacks=callbacks)
    return result.loss, read_history(str(out / "history.jsonl"))


def step_losses(history: dict) -> list[float]:
    return [record["loss"] for record in history["step"]]


def test_a_skipped_batch_ends_the_run_where_one_that_never_read_it_ends(shards, tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_VARIABLE, f"0:{6 * BATCH}:1000")  # the batch of step 7
    exporter = RankExporter("spiky", 0, host="127.0.0.1")
    loss, history = train(shards, tmp_path / "skip", action="skip", callbacks=[exporter])
    metrics = generate_latest(exporter.exporter.registry).decode()  # what the exporter served until run() closed it
    [spike] = history["spike"]
    assert (spike["step"], spike["action"], spike["skipped"]) == (7, "skip", f"0:{6 * BATCH}-{7 * BATCH}")
    assert spike["loss"] > 1000 * spike["loss_median"] / 2 and spike["grad_norm"] > spike["grad_norm_median"]
    assert re.search(r'pretrain_loss_spikes_total\{action="skip",run="spiky"\} 1\.0', metrics), metrics
    assert [r["step"] for r in history["step"]] == list(range(1, STEPS + 1))

    monkeypatch.delenv(INJECT_VARIABLE)
    clean_loss, clean = train(shards, tmp_path / "clean", action="skip", skip=spike["skipped"])
    assert "spike" not in clean
    assert loss == clean_loss and step_losses(history) == step_losses(clean)
    # Not vacuous: reading that batch and applying its update lands elsewhere.
    monkeypatch.setenv(INJECT_VARIABLE, f"0:{6 * BATCH}:1000")
    applied_loss, _ = train(shards, tmp_path / "applied", action="alert")
    assert applied_loss != loss


@pytest.mark.parametrize("backend", ["native", "deepspeed"])
def test_a_rewind_goes_back_to_the_checkpoint_and_skips_the_data_read_since(shards, tmp_path, monkeypatch, backend):
    monkeypatch.setenv(INJECT_VARIABLE, f"0:{6 * BATCH}:1000")
    loss, history = train(shards, tmp_path / "rewind", action="rewind", backend=backend)
    [spike] = history["spike"]
    # Step 7's update was applied, then undone: back to step_4, skipping steps 5 to 7's data.
    assert (spike["step"], spike["action"], spike["rewound_to"]) == (7, "rewind", 4)
    assert spike["skipped"] == f"0:{4 * BATCH}-{7 * BATCH}"

    monkeypatch.delenv(INJECT_VARIABLE)
    clean_loss, clean = train(shards, tmp_path / "clean", action="rewind", skip=spike["skipped"], backend=backend)
    assert "spike" not in clean
    assert loss == clean_loss and step_losses(history) == step_losses(clean)


def test_a_model_that_diverged_is_stopped_rather_than_skipped_through_the_data(shards, tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_VARIABLE, f"0:{6 * BATCH}:1000:{STEPS}")  # every batch from step 7's on
    with pytest.raises(UserError, match=r"spikes.action=skip: 11 batches in a row were spikes \(the last at step 7"):
        train(shards, tmp_path / "diverged", action="skip")
    shutdown_distributed()  # what the rank's process exiting would do
    assert [r["step"] for r in read_history(str(tmp_path / "diverged" / "history.jsonl"))["step"]] == list(range(1, 7))


def test_the_detector_judges_against_median_and_mad():
    detector = SpikeDetector(SpikesConfig(action="alert", window=4, threshold=5.0, min_steps_before_active=2))
    assert detector.measure(1, math.nan, 1.0)[0]  # not finite: a spike before detection is active
    for loss in (3.0, 3.1, 2.9, 3.0):
        assert not detector.measure(3, loss, 1.0)[0]
        detector.add(3, loss, 1.0)
    found, record = detector.measure(5, 3.6, 1.0)  # median 3.0, MAD 0.05: 12 MADs above
    assert found and (record.loss_median, record.loss_mad) == (3.0, pytest.approx(0.05))
    assert not detector.measure(5, 3.2, 1.0)[0] and not detector.measure(5, 1.0, 1.0)[0]  # 4 MADs; below


@pytest.mark.parametrize(("raw", "message"), [
    ({"parallel": {"backend": "deepspeed"}, "spikes": {"action": "skip"}},
     "spikes.action: skip needs parallel.backend=native.*use spikes.action=rewind"),
    ({"data": {"skip": "0:10-20,1:x-3"}}, r"data.skip: '1:x-3' is not EPOCH:START-END"),
    ({"data": {"skip": "0:20-10"}}, r"data.skip: '0:20-10': needs 0 ≤ START < END"),
    ({"spikes": {"action": "drop"}}, r"spikes.action: got 'drop', allowed: 'none', 'alert', 'skip', 'rewind'"),
])
def test_wrong_spike_settings_are_refused_naming_the_field(raw, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)
