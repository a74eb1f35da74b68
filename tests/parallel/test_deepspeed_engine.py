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

from pathlib import Path

import pytest
import torch

from tests.helpers import assert_layout_matches, reference_run, run_layout

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


@pytest.fixture(scope="module")
def references() -> dict[tuple[str, ...], dict]:
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout: str, references: dict, tmp_path: Path) -> None:
    procs, overrides = LAYOUTS[layout]
    assert_layout_matches(procs, overrides, references, tmp_path)


@pytest.mark.slow
def test_bf16_with_zero1_tracks_the_fp32_run(references: dict, tmp_path: Path) -> None:
    """bf16 weights and activations with fp32 master weights and fp32 gradient accumulation (DeepSpeed's
    BF16_Optimizer): losses stay within 1e-2 relative of fp32 over 10 steps (bf16 keeps 8 bits of mantissa)."""
    if () not in references:
        references[()] = reference_run([])
    got = run_layout(2, ["parallel.zero_stage=1", "parallel.precision=bf16"], tmp_path / "result.pt", tmp_path)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(references[()]["losses"]), rtol=1e-2, atol=0)
    assert got["losses"] != references[()]["losses"], "bf16 should not be bit-identical to fp32"
