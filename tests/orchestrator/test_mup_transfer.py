"""μP's promise on real shards: activation scales flat in width (the coordinate check), and a learning rate tuned at
width 64 still the best at width 256, which the standard parametrization breaks; and `pretrain sweep`'s transfer
section (the grid at the base size, the choice, the larger sizes, transfer.json and coord_check.png).

Every model here trains in this process on one thread (`mup_check.train_probe`: the real model, optimizer groups,
schedule and loader, no engine), 2 blocks, sequences of 32 byte tokens, batches of 8.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from orchestrator.cli import main
from orchestrator.errors import SpecError
from orchestrator.planner.counting import count_params
from orchestrator.planner.mup_check import at_width, coord_check, plot_coord_check, spread, train_probe
from orchestrator.planner.sweep import load_sweep, results_of
from orchestrator.planner.transfer import choose, plan_transfer, summarize_transfer
from orchestrator.validate import load_spec, parse_spec
from tests.shards import write_shards

VOCAB = 320
HEAD_DIM = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("mup") / "shards", seq_len=64, rows=2000)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def probe_spec(shards, parametrization: str, lr: float, steps: int, base_dim: int = 64):
    return parse_spec({
        "model": {"vocab_size": VOCAB, "dim": base_dim, "n_layers": 2, "n_heads": base_dim // HEAD_DIM,
                  "multiple_of": 32, "init_std": 0.1, "parametrization": parametrization,
                  "mup_base_dim": base_dim if parametrization == "mup" else 0},
        "data": {"path": str(shards), "seq_len": 32},
        "parallel": {"precision": "fp32", "micro_batch_size": 8},
        "optim": {"lr": lr, "min_lr": lr / 10, "weight_decay": 0.0},
        "schedule": {"steps": steps, "warmup_steps": steps // 10},
        "resources": {"device": "cpu"}}, require_data=True)


def test_coordinate_check_is_flat_under_mup_and_grows_under_standard(shards, tmp_path) -> None:
    """5 steps at lr 2^-7 at widths 32…256: every layer's activation RMS within 1.5× under μP; under the standard
    parametrization the blocks' outputs grow with width, several-fold."""
    widths = (32, 64, 128, 256)
    checks = {p: coord_check(probe_spec(shards, p, 2**-7, 5, base_dim=32), widths, 5, head_dim=16)
              for p in ("standard", "mup")}
    mup, standard = spread(checks["mup"]), spread(checks["standard"])
    assert set(mup) == {"embedding", "block 0", "block 1", "logits"}
    assert max(mup.values()) < 1.5, mup
    for block in ("block 0", "block 1"):
        grown = [checks["standard"][w][block] for w in widths]
        assert grown == sorted(grown) and standard[block] > 5, (block, grown)
    plot_coord_check(tmp_path / "coord.png", checks)
    assert (tmp_path / "coord.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# The learning-rate grid, log2: from 2^-10 to 2^-5 in steps of 2×.
GRID = range(-10, -4)


def best_log2_lr(shards, parametrization: str, width: int) -> tuple[float, list[float]]:
    """The best learning rate (log2) of a sweep over GRID: the vertex of a parabola fitted by least squares to the
    validation losses of the five grid points centred on the lowest. Neighbouring learning rates near the optimum
    differ by about the runs' noise (a few hundredths), so the argmin alone jumps by a grid step from seed to seed;
    the fit does not (docs/planner.md has both)."""
    losses = []
    for k in GRID:
        spec = at_width(probe_spec(shards, parametrization, 2.0**k, steps=50), width, HEAD_DIM)
        losses.append(train_probe(spec, 50, eval_batches=32).val_loss)
    lowest = losses.index(min(losses))
    start = min(max(0, lowest - 2), len(GRID) - 5)
    a, b, _ = np.polyfit(GRID[start:start + 5], losses[start:start + 5], 2)
    assert a > 0, f"no minimum inside the grid: {losses}"
    return -b / (2 * a), losses


@pytest.mark.slow
def test_best_learning_rate_transfers_from_width_64_to_256_under_mup_only(shards) -> None:
    """Measured: μP's best moves by less than 0.1 of a grid step from width 64 to 256, the standard one's by 1.3 to
    1.6 steps (to smaller learning rates), over two seeds."""
    best = {(p, w): best_log2_lr(shards, p, w) for p in ("mup", "standard") for w in (64, 256)}
    table = {key: (round(b, 2), [round(v, 3) for v in losses]) for key, (b, losses) in best.items()}
    shift = {p: best[p, 64][0] - best[p, 256][0] for p in ("mup", "standard")}
    assert abs(shift["mup"]) <= 1, table
    assert shift["standard"] > 1, table
    assert all(math.isfinite(v) for _, losses in best.values() for v in losses)


def write_transfer(directory, shards, **transfer) -> str:
    (directory / "base.yaml").write_text(yaml.safe_dump({
        "model": {"vocab_size": VOCAB, "multiple_of": 32}, "parallel": {"precision": "fp32", "zero_stage": 0},
        "optim": {"lr": 1e-3, "min_lr": 1e-4}, "resources": {"device": "cpu"}}))
    raw = {"name": "x", "base": "base.yaml", "data": str(shards), "output": "out", "sizes": "32x1, 64x1, 128x1",
           "head_dim": 16, "tokens": "4e3", "batch_size": 4, "seq_len": 32, "eval_batches": 2,
           "transfer": {"lrs": "1e-3, 4e-3", "init_stds": "0.05, 0.1", **transfer}}
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_transfer_plans_the_grid_at_the_base_width_then_the_larger_sizes(tmp_path, shards) -> None:
    config = load_sweep(write_transfer(tmp_path, shards))
    grid = plan_transfer(config)
    assert [(r.dim, dict(r.settings)["lr"], dict(r.settings)["init_std"]) for r in grid] == [
        (32, 1e-3, 0.05), (32, 1e-3, 0.1), (32, 4e-3, 0.05), (32, 4e-3, 0.1)]
    assert {"model.parametrization=mup", "model.mup_base_dim=32", "optim.min_lr=0.0004"} <= set(grid[3].overrides)
    results = [{"name": r.name, **dict(r.settings), "val_loss": loss} for r, loss in
               zip(grid, (4.0, float("nan"), 3.5, 3.9), strict=True)]
    best = choose(results)
    assert (best["lr"], best["init_std"]) == (4e-3, 0.05)
    larger = plan_transfer(config, best)
    assert [(r.dim, r.n_layers) for r in larger] == [(64, 1), (128, 1)]
    assert all({"optim.lr=0.004", "model.init_std=0.05", "model.mup_base_dim=32"} <= set(r.overrides)
               for r in larger)


def test_transfer_config_problems_name_their_field(tmp_path, shards, capsys) -> None:
    with pytest.raises(SpecError, match=r"transfer.lrs: 'fast' is not a number"):
        plan_transfer(load_sweep(write_transfer(tmp_path, shards, lrs="1e-3, fast")))
    with pytest.raises(SpecError, match=r"transfer.parametrization: got 'mu', allowed: 'standard', 'mup'"):
        load_sweep(write_transfer(tmp_path, shards, parametrization="mu"))
    with pytest.raises(SpecError, match=r"transfer.lrs: no run of the grid finished"):
        choose([{"name": "a", "val_loss": None}])
    assert main(["sweep", write_transfer(tmp_path, shards, lrs="0")]) == 2
    assert "transfer.lrs: 0 must be positive" in capsys.readouterr().err


def test_transfer_summary_chooses_trains_larger_and_draws(tmp_path, shards) -> None:
    """results.jsonl as the sweep's Ray tasks write it, each run trained here (`train_probe` on its own spec, as
    `train_one` runs it through the loop in a child process): the choice, the larger size trained with it,
    transfer.json, the printed table and coord_check.png."""
    config = load_sweep(write_transfer(tmp_path, shards, lrs="1e-3, 1e-2", init_stds="", coord_check_steps=2),
                        ["sizes=32x1, 64x1"])
    (tmp_path / "out").mkdir()

    def train(runs) -> None:
        with open(tmp_path / "out" / "results.jsonl", "a", encoding="utf-8") as f:
            for run in runs:
                spec = load_spec(config.base, run.overrides, require_data=True)
                loss = train_probe(spec, spec.schedule.steps, eval_batches=config.eval_batches).val_loss
                f.write(json.dumps({"name": run.name, "dim": run.dim, "n_layers": run.n_layers, "tokens": run.tokens,
                                    "params": count_params(spec.model).total, "seconds": 0.0, "val_loss": loss,
                                    **dict(run.settings)}) + "\n")

    grid = plan_transfer(config)
    train(grid)
    best = choose(results_of(config, grid))
    train(plan_transfer(config, best))
    printed: list[str] = []
    summary = summarize_transfer(config, log=printed.append)
    assert json.loads((tmp_path / "out" / "transfer.json").read_text()) == summary
    assert [r["lr"] for r in summary["grid"]] == [1e-3, 1e-2] and summary["base_dim"] == 32
    assert summary["best"]["name"] == best["name"] and any(best["name"] in line and "best" in line
                                                           for line in printed)
    (transferred,) = summary["transferred"]
    assert (transferred["dim"], transferred["lr"], transferred["init_std"]) == (64, best["lr"], 0.02)
    assert 0 < transferred["val_loss"] < math.log(VOCAB)
    assert set(summary["coord_check"]) == {"standard", "mup"}
    assert (tmp_path / "out" / "coord_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
