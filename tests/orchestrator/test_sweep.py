"""`pretrain sweep`: the config's problems reported at once, the grid as validated job specs, fit and plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from orchestrator.cli import main
from orchestrator.errors import SpecError
from orchestrator.planner.scaling import CHINCHILLA
from orchestrator.planner.sweep import load_sweep, plan_runs, summarize, train_one
from tests.shards import write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("sweep") / "shards", seq_len=64, rows=200)


def write_sweep(directory, shards, **changes) -> str:
    raw = {"name": "t", "base": "base.yaml", "data": str(shards), "output": "out", "sizes": "32x1, 64x2",
           "head_dim": 32, "tokens": "2e4, 4e4", "batch_size": 8, "seq_len": 64, **changes}
    (directory / "base.yaml").write_text(yaml.safe_dump({
        "model": {"vocab_size": 384, "multiple_of": 32}, "parallel": {"precision": "fp32", "zero_stage": 0},
        "resources": {"device": "cpu"}}))
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_grid_is_every_size_times_every_budget(tmp_path, shards):
    config = load_sweep(write_sweep(tmp_path, shards))
    assert config.base == str(tmp_path / "base.yaml") and config.output == str(tmp_path / "out")
    runs = plan_runs(config)
    assert [(r.dim, r.n_layers) for r in runs] == [(32, 1), (32, 1), (64, 2), (64, 2)]
    assert [r.tokens for r in runs] == [19968, 39936, 19968, 39936]  # whole steps of 8 × 64 tokens
    assert "model.n_heads=2" in runs[2].overrides and "schedule.steps=78" in runs[3].overrides


def test_config_problems_are_reported_together(tmp_path, shards):
    path = write_sweep(tmp_path, shards, sizes="32x1, wide, 48x2", tokens="1e5, lots, -3", cpus_per_run=0)
    with pytest.raises(SpecError) as info:
        load_sweep(path)
    assert [str(p) for p in info.value.problems] == [
        "cpus_per_run: got 0.0, must be ≥ 0.01",
        "sizes: 'wide' is not dim x n_layers (e.g. 128x4)",
        "sizes: dim 48 is not a multiple of head_dim=32",
        "tokens: 'lots' is not a number",
        "tokens: -3 must be positive",
    ]


def test_missing_base_is_named(tmp_path, shards):
    path = write_sweep(tmp_path, shards, base="nope.yaml")
    with pytest.raises(SpecError, match=r"base: .*nope.yaml is not a file"):
        load_sweep(path)


def test_runs_the_base_spec_refuses_are_named(tmp_path, shards):
    path = write_sweep(tmp_path, shards, seq_len=4096)
    with pytest.raises(SpecError, match=r"t-d32-l1-t20000: data.seq_len: 4096 is longer than the shards' seq_len 64"):
        plan_runs(load_sweep(path))


def test_summary_fits_predicts_and_draws(tmp_path, shards):
    config = load_sweep(write_sweep(tmp_path, shards, target_params=1e9))
    rng = np.random.default_rng(3)
    results = [{"name": f"r{i}", "params": n, "tokens": d, "val_loss": float(CHINCHILLA.loss(n, d)) *
                float(np.exp(rng.normal(0, 1e-3)))}
               for i, (n, d) in enumerate((n, d) for n in np.logspace(7, 9, 4) for d in np.logspace(9, 11, 3))]
    results.append({"name": "diverged", "params": 1e8, "tokens": 1e10, "val_loss": float("nan")})
    (tmp_path / "out").mkdir()
    summary = summarize(config, results, log=lambda *_: None)
    assert summary["runs"] == 12
    assert summary["target"]["tokens"] == 2e10
    assert summary["target"]["predicted_loss"] == pytest.approx(float(CHINCHILLA.loss(1e9, 2e10)), rel=0.01)
    assert summary["mean_abs_relative_residual"] < 0.01
    assert json.loads((tmp_path / "out" / "fit.json").read_text())["law"]["E"] == summary["law"]["E"]
    assert (tmp_path / "out" / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_a_bad_sweep_with_exit_2(tmp_path, shards, capsys):
    assert main(["sweep", write_sweep(tmp_path, shards, sizes="")]) == 2
    assert "sizes: no sizes given; list them as dim x n_layers" in capsys.readouterr().err


@pytest.mark.slow
def test_one_run_trains_through_the_real_loop(tmp_path, shards):
    config = load_sweep(write_sweep(tmp_path, shards, sizes="32x1", tokens="5e3", eval_batches=2))
    (run,) = plan_runs(config)
    outcome = train_one(config.base, list(run.overrides))
    assert "error" not in outcome, outcome.get("error")
    assert outcome["params"] == 32 * 384 * 2 + 4 * 32 * 32 + 3 * 32 * 96 + 3 * 32
    assert 0 < outcome["val_loss"] < np.log(384)  # learned something beyond uniform over the vocab
    assert (tmp_path / "out" / "runs" / run.name / "checkpoints").is_dir()


@pytest.mark.slow
def test_a_failing_run_returns_its_output(tmp_path, shards):
    config = load_sweep(write_sweep(tmp_path, shards))
    outcome = train_one(config.base, ["model.dim=wide"])
    assert "model.dim: got 'wide', expected an integer" in outcome["error"]
