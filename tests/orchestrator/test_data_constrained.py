"""The data-constrained law against the published formula and values (Muennighoff et al. 2023, and the losses and
allocation its released code prints), its warnings, and `pretrain plan` on a real shard manifest."""

from __future__ import annotations

import json
import math
import re

import pytest

from orchestrator.cli import main
from orchestrator.planner import data_constrained as dc
from tests.shards import write_job, write_shards

# The paper's fit as its released code writes it: log A, log B, log E, α, β, R_D*, R_N*.
LOG_A, LOG_B, LOG_E, ALPHA, BETA, RD_STAR, RN_STAR = 6.255414, 7.3049974, 0.6254804, 0.3526596, 0.3526596, \
    15.387756, 5.309743
U = 25e9


def test_effective_tokens_are_the_unique_ones_then_decay_towards_their_ceiling():
    law = dc.MUENNIGHOFF
    assert law.effective_tokens(10e9, U) == 10e9  # less than an epoch: nothing repeated
    assert law.effective_tokens(U, U) == U  # R_D = 0
    four_epochs = U + U * RD_STAR * (1 - math.exp(-3 / RD_STAR))
    assert law.effective_tokens(4 * U, U) == pytest.approx(four_epochs, rel=1e-12)
    assert four_epochs / (4 * U) > 0.9  # four epochs are nearly as good as unique data
    assert law.effective_tokens(U * (1 + RD_STAR), U) == pytest.approx(U + U * RD_STAR * (1 - math.exp(-1)),
                                                                        rel=1e-12)
    assert law.effective_tokens(1e6 * U, U) == pytest.approx(U * (1 + RD_STAR), rel=1e-9)


def test_parameters_beyond_what_the_unique_data_feeds_count_for_less():
    law = dc.MUENNIGHOFF
    a, b = math.exp(LOG_A), math.exp(LOG_B)
    g = (ALPHA * a / (BETA * b)) ** (1 / (ALPHA + BETA))
    n_opt = (U * g) ** (BETA / ALPHA) * g
    assert law.optimal_params(U) == pytest.approx(n_opt, rel=1e-12)
    assert law.effective_params(0.5 * n_opt, 100e9, U) == 0.5 * n_opt
    assert law.effective_params(3 * n_opt, 100e9, U) == pytest.approx(
        n_opt + n_opt * RN_STAR * (1 - math.exp(-2 / RN_STAR)), rel=1e-12)


def test_losses_are_the_published_ones():
    # The two models of the paper's Figure 1 (right), with the losses its released code prints for them.
    assert dc.MUENNIGHOFF.loss(6.34e9, 242e9, U) == pytest.approx(2.2256440889984477, rel=1e-12)
    assert dc.MUENNIGHOFF.loss(8.67e9, 178e9, U) == pytest.approx(2.2269634075087867, rel=1e-12)
    e, a, b = (math.exp(x) for x in (LOG_E, LOG_A, LOG_B))
    # with unique data to spare and no excess parameters it is the Chinchilla form
    assert dc.MUENNIGHOFF.loss(1e8, 2e9, 1e12) == pytest.approx(e + a / 1e8**ALPHA + b / 2e9**BETA, rel=1e-12)


def test_best_allocation_is_the_papers():
    # The released code's grid search over the compute of 8.67B parameters × 178B tokens with 25B unique tokens:
    # "227B tokens, 9.1 epochs, 6.8B parameters".
    plan = dc.plan(6 * 8.67e9 * 178e9, U)
    assert plan.best.tokens == pytest.approx(227e9, rel=0.01)
    assert plan.best.params == pytest.approx(6.8e9, rel=0.01)
    assert plan.best.epochs == pytest.approx(9.1, rel=0.01)
    assert plan.best.loss < min(plan.chinchilla.loss, dc.MUENNIGHOFF.loss(8.67e9, 178e9, U))
    assert "reads the unique data 9.1 times" in plan.warnings[0] and "returns fall off" in plan.warnings[0]


@pytest.mark.parametrize(("epochs", "said"), [(3.9, None), (8, "returns fall off"), (20, "buys almost nothing")])
def test_repetition_is_warned_about_past_4_and_16_epochs(epochs, said):
    warnings = dc.repetition_warnings(dc.allocate(1e9, epochs * U, U), "this spec")
    if said is None:
        assert warnings == []
    else:
        (line,) = warnings
        worth = math.exp(-(epochs - 1) / RD_STAR)
        assert f"this spec reads the unique data {epochs:.1f} times: its last epoch's tokens are worth " \
               f"{worth:.0%} of fresh ones" in line and said in line


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("dc")
    shards = write_shards(root / "shards", seq_len=64, rows=200)
    path = write_job(root / "job.yaml", shards, 64, name="small",
                     model={"dim": 64, "n_layers": 2, "n_heads": 2, "multiple_of": 32},
                     parallel={"micro_batch_size": 8, "precision": "fp32", "zero_stage": 0},
                     schedule={"steps": 1000, "warmup_steps": 10})
    return path, json.loads((shards / "manifest.json").read_text())


def test_plan_shows_the_specs_epochs_and_the_best_allocation(spec, capsys):
    path, manifest = spec
    unique = manifest["sources"]["corpus"]["tokens"]
    assert main(["plan", str(path), "--budget-flops", "3e12", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{unique / 1e3:.3g}K unique tokens ({path.parent}/shards/manifest.json)" in out
    epochs = 1000 * 8 * 64 / unique
    (own,) = re.findall(r"this spec .* = +([\d.]+) epochs", out)
    assert float(own) == pytest.approx(epochs, abs=0.01)
    assert f"warning: this spec reads the unique data {epochs:.1f} times" in out and "buys almost nothing" in out
    best = dc.plan(3e12, unique).best
    (line,) = [x for x in out.splitlines() if "best for 3e+12 FLOPs" in x]
    assert f"= {best.epochs:6.2f} epochs" in line and f"loss {best.loss:.4f}" in line

    assert main(["plan", str(path), "schedule.steps=20", "--unique-tokens", "1e9", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "1e+09" not in out and "1B unique tokens (--unique-tokens)" in out and "warning" not in out


def test_a_budget_without_unique_tokens_is_refused(spec, tmp_path, capsys):
    path, _ = spec
    assert main(["plan", str(path), f"data.path={tmp_path}", "model.vocab_size=512", "--budget-gpu-hours", "10",
                 "--top", "1"]) == 2
    assert f"--budget-gpu-hours: planning epochs needs the unique tokens: {tmp_path} has no manifest.json; give " \
           "--unique-tokens" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--budget-flops=-1e20"], "--budget-flops: -1e+20 is not a positive finite number"),
    (["--unique-tokens", "nan"], "--unique-tokens: nan is not a positive finite number"),
    (["--budget-gpu-hours", "0"], "a GPU-hour budget must be positive"),
])
def test_bad_budgets_are_named(spec, capsys, args, message):
    assert main(["plan", str(spec[0]), *args, "--top", "1"]) == 2
    assert message in capsys.readouterr().err
