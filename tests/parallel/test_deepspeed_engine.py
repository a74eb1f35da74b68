"""Every dp × pp × tp layout (and ZeRO stage) trains the same as one process: per-step losses and final parameters.

The reference is a plain single-process PyTorch loop over the same model, data, AdamW and schedule (no DeepSpeed),
so the layouts are checked against the definition of the training step, not against each other. Each layout runs
once under torchrun (real DeepSpeed engines over gloo); rank 0 writes losses and the gathered parameters.

Tolerance: 1e-5 relative on losses and 1e-5 absolute on parameters (values of order 0.02–1), every layout alike.
The runs are fp32; only the order of floating-point sums differs (tensor-parallel partial matmuls, data-parallel
all-reduce, ZeRO's flattened buckets): measured ≤ 2.1e-7 on losses and ≤ 1.3e-6 on parameters after 10 steps.
Adam's eps is 1e-6 here: with 1e-8 an element whose gradient is ~1e-8 turns rounding noise into lr-sized steps.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from layout_worker import TINY, fixed_tokens

from orchestrator.validate import parse_spec
from parallel.materialize import materialize_model
from parallel.model import build_model, cross_entropy
from parallel.optim import build_optimizer, build_param_groups, build_scheduler

WORKER = Path(__file__).with_name("layout_worker.py")
REPO = Path(__file__).resolve().parents[2]
RTOL = 1e-5
PARAM_ATOL = 1e-5

# name → (processes, spec overrides); features ride along where they are numerically neutral.
LAYOUTS = {
    "single": (1, []),
    "dp2-zero1": (2, ["parallel.zero_stage=1"]),
    "dp2-zero2": (2, ["parallel.zero_stage=2", "parallel.activation_checkpointing=full"]),
    "dp2-zero3": (2, ["parallel.zero_stage=3", "model.tie_embeddings=true",
                      "parallel.activation_checkpointing=selective"]),
    "tp2": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pp=2", "model.tie_embeddings=true"]),
    "dp2-tp2": (4, ["parallel.tp=2", "parallel.zero_stage=1"]),
    "dp2-pp2": (4, ["parallel.pp=2", "parallel.zero_stage=1"]),
    "pp2-tp2": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                    "model.tie_embeddings=true"]),
    "dp2-pp2-tp2": (8, ["parallel.pp=2", "parallel.tp=2", "parallel.zero_stage=1", "model.tie_embeddings=true"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(procs: int, overrides: list[str], out: Path, tmp: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TMPDIR": str(tmp),
           "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(WORKER), str(out), *overrides]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and out.exists(), result.stdout[-3000:] + result.stderr[-6000:]
    return torch.load(out, weights_only=False)


def reference_run(overrides: list[str]) -> dict:
    """The training step by definition: one process, the whole global batch, torch AdamW, clip, schedule."""
    spec = parse_spec(TINY, overrides=overrides)
    model = build_model(spec.model)
    materialize_model(model, spec.schedule.seed, torch.device("cpu"))
    optimizer = build_optimizer(build_param_groups(model.named_parameters(), spec.optim.weight_decay), spec.optim,
                                torch.device("cpu"))
    scheduler = build_scheduler(optimizer, spec.optim, spec.schedule)
    tokens = fixed_tokens(spec.schedule.steps, spec.data.seq_len, spec.model.vocab_size)
    losses = []
    for rows in tokens:
        loss = cross_entropy(model(rows[:, :-1]), rows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(loss.item())
    return {"losses": losses, "params": {n: p.detach() for n, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def references() -> dict[tuple[str, ...], dict]:
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout: str, references: dict, tmp_path: Path) -> None:
    procs, overrides = LAYOUTS[layout]
    assert_layout_matches(procs, overrides, references, tmp_path)


def assert_layout_matches(procs: int, overrides: list[str], references: dict, tmp_path: Path) -> None:
    """Run the layout and hold its losses, parameters, schedule and eval loss to the single-process reference."""
    model_overrides = tuple(o for o in overrides if o.startswith("model."))
    if model_overrides not in references:
        references[model_overrides] = reference_run(list(model_overrides))
    expected = references[model_overrides]
    got = run_layout(procs, overrides, tmp_path / "result.pt", tmp_path)

    assert expected["losses"][-1] < expected["losses"][0] - 0.1, "the reference run should learn something"
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(expected["losses"]), rtol=RTOL, atol=0)
    assert got["params"].keys() == expected["params"].keys()
    for name, value in expected["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=PARAM_ATOL,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert len(got["lrs"]) == 10 and got["lrs"][0] < got["lrs"][2]
    assert all(n > 0 for n in got["grad_norms"])
    assert got["eval_loss"] < expected["losses"][0] - 0.1, "eval of the first batch sees the trained weights"


@pytest.mark.slow
def test_bf16_with_zero1_tracks_the_fp32_run(references: dict, tmp_path: Path) -> None:
    """bf16 weights and activations with fp32 master weights and fp32 gradient accumulation (DeepSpeed's
    BF16_Optimizer): losses stay within 1e-2 relative of fp32 over 10 steps (bf16 keeps 8 bits of mantissa)."""
    if () not in references:
        references[()] = reference_run([])
    got = run_layout(2, ["parallel.zero_stage=1", "parallel.precision=bf16"], tmp_path / "result.pt", tmp_path)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(references[()]["losses"]), rtol=1e-2, atol=0)
    assert got["losses"] != references[()]["losses"], "bf16 should not be bit-identical to fp32"
