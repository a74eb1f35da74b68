"""WSD branches: one stable run and three decays from its checkpoints against three dedicated runs of those budgets,
all through the real training loop on real shards, in this process; and the refusals of `pretrain branch`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from orchestrator.cli import main
from orchestrator.planner.scaling import TokenLaw
from orchestrator.validate import load_spec
from parallel import train
from parallel.launch import RankEnv
from tests.shards import write_job, write_shards

BUDGETS = (40, 80, 120)  # decay_fraction 0.25: the branches start from steps 30, 60 and 90


@pytest.fixture(scope="module")
def stable(tmp_path_factory):
    """A 160-step wsd run (stable until step 120) checkpointing every 10 steps, kept; and its base spec."""
    root = tmp_path_factory.mktemp("wsd")
    shards = write_shards(root / "shards", seq_len=32, rows=300)
    base = write_job(
        root / "base.yaml", shards, 32, name="long", model={"dim": 32, "n_layers": 1, "n_heads": 2, "multiple_of": 32},
        parallel={"backend": "native", "precision": "fp32", "micro_batch_size": 4, "zero_stage": 0},
        optim={"lr": 3e-3, "min_lr": 3e-4},
        schedule={"steps": 160, "lr_schedule": "wsd", "decay_fraction": 0.25, "warmup_steps": 2, "eval_every": 0,
                  "eval_batches": 2, "log_every": 100},
        checkpoint={"every": 10, "keep_every": 10, "async_save": False})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_run(base, root / "long")
    yield base, root / "long"
    torch.set_num_threads(threads)


def train_run(base: Path, directory: Path, *overrides: str) -> None:
    train.run(load_spec(base, [f"checkpoint.dir={directory}", *overrides], require_data=True), RankEnv(master_port=0))


def final_losses(history: Path, step: int) -> tuple[float, float]:
    records = [json.loads(line) for line in history.read_text().splitlines()]
    (val,) = [r["loss"] for r in records if r["kind"] == "eval" and r["step"] == step]
    (loss,) = [r["loss"] for r in records if r["kind"] == "step" and r["step"] == step]
    return val, loss


def fingerprint(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_branches_end_where_dedicated_runs_of_their_budgets_end(stable, tmp_path, capsys):
    base, long = stable
    before = fingerprint(long)
    out = tmp_path / "branches"
    assert main(["branch", str(long), "--steps", ",".join(map(str, BUDGETS)), "-o", str(out)]) == 0
    assert fingerprint(long) == before  # the stable run is only read
    summary = json.loads((out / "branches.json").read_text())
    assert [b["start_step"] for b in summary["branches"]] == [30, 60, 90]
    assert summary["loss"] == "val_loss"
    for budget, branch in zip(BUDGETS, summary["branches"], strict=True):
        dedicated = tmp_path / f"dedicated-{budget}"
        train_run(base, dedicated, f"schedule.steps={budget}", f"schedule.eval_every={budget}")
        val, loss = final_losses(dedicated / "history.jsonl", budget)
        print(f"budget {budget}: branch val {branch['val_loss']!r} train {branch['train_loss']!r}, "
              f"dedicated val {val!r} train {loss!r}")
        # Same weights, moments, batches and learning rates step for step, in fp32 on one CPU thread: the same
        # floating-point operations in the same order, so the same numbers, not merely close ones.
        assert branch["val_loss"] == pytest.approx(val, rel=1e-6)
        assert branch["train_loss"] == pytest.approx(loss, rel=1e-6)
        assert branch["tokens"] == budget * 4 * 32
    law = TokenLaw(**summary["fit"])
    assert law.beta > 0 and law.B > 0 and law.E >= 0  # loss falls with tokens, towards a floor of at least 0
    for branch in summary["branches"]:
        assert float(law.loss(branch["tokens"])) == pytest.approx(branch["val_loss"], rel=0.02)
    assert (out / "branches.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "results.jsonl").read_text().splitlines()) == 3

    # A second call trains nothing and refits the same points.
    capsys.readouterr()
    assert main(["branch", str(long), "--steps", "40,80,120", "-o", str(out)]) == 0
    assert "3 branches (3 already trained)" in capsys.readouterr().out
    assert json.loads((out / "branches.json").read_text())["branches"] == summary["branches"]

    # A damaged record in a branch's history is named, and nothing written before is touched.
    history = out / "b40" / "checkpoints" / "history.jsonl"
    lines = history.read_text().splitlines()
    history.write_text("\n".join([*lines, '{"kind": "eval", "step": 40}']) + "\n")
    assert main(["branch", str(long), "--steps", "40,80,120", "-o", str(out), "--fit-only"]) == 2
    assert f"{history}, line {len(lines) + 1}: its eval record needs step, loss (numbers); delete the line" in \
        capsys.readouterr().err
    assert json.loads((out / "branches.json").read_text())["branches"] == summary["branches"]


def test_budgets_the_stable_run_cannot_serve_are_named_with_the_checkpoints_needed(stable, tmp_path, capsys):
    _, long = stable
    out = tmp_path / "branches"
    assert main(["branch", str(long), "--steps", "50,80,168", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    # 50 decays over round(12.5) = 12 steps from step 38, which the stable run did not keep; 168 needs the learning
    # rate held to step 126, and the stable run decays from step 120.
    assert "budget 168: a dedicated run holds its learning rate until step 126, but the stable run's differs from " \
           "step 121" in err
    assert "the branches start from the stable run's steps 38, 60 (decay_fraction 0.25)" in err
    assert "has no complete checkpoint at step 38 (it has 10, 20, 30" in err
    assert "checkpoint.every=2 checkpoint.keep_every=2" in err
    # what its checkpoints at 10, 20, ..., 120 (its stable phase) serve: a B-step branch decays from B − round(B/4)
    served = [b for b in range(1, 200) if b - round(b / 4) in range(10, 121, 10)]
    assert f"budgets its checkpoints serve as they are: {', '.join(map(str, served[:12]))}, ...\n" in err
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "12,x"], "--steps: 'x' is not a positive whole number of steps"),
    (["--steps", "12", "--decay-fraction", "1.5"], "--decay-fraction: 1.5 must be between 0 and 1"),
    (["--steps", "12", "--address", "ray://h:10001"], "--address: only with --ray"),
])
def test_bad_arguments_are_one_line_and_exit_2(stable, tmp_path, capsys, args, message):
    assert main(["branch", str(stable[1]), *args, "-o", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_a_directory_without_checkpoints_and_an_output_inside_the_stable_run_are_refused(stable, tmp_path, capsys):
    assert main(["branch", str(tmp_path), "--steps", "12"]) == 2
    assert "no complete checkpoint (a step_<N>/ with manifest.json); name the stable run's checkpoint.dir" in \
        capsys.readouterr().err
    assert main(["branch", str(stable[1]), "--steps", "12", "-o", str(stable[1] / "b")]) == 2
    assert "is inside the stable run's checkpoint directory" in capsys.readouterr().err
