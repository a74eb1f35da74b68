"""Every ZeRO stage, dp, pp and tp alone and each pair of them train the same as one process: per-step losses and
final parameters. All three at once (eight ranks) run on the native engine, the default: under this engine that launch
took 133 s of this file's 351 s on a 2-core CPU.

The reference is a plain single-process PyTorch loop over the same model, data, AdamW and schedule (no DeepSpeed),
so the layouts are checked against the definition of the training step, not against each other. The layouts of one
process count share one torchrun launch (`layout_worker.py --cases`: real DeepSpeed engines over gloo, built one after
another on the same process group); rank 0 writes each layout's losses and gathered parameters.

Tolerance: 1e-5 relative on losses and 1e-5 absolute on parameters (values of order 0.02–1), every layout alike.
The runs are fp32; only the order of floating-point sums differs (tensor-parallel partial matmuls, data-parallel
all-reduce, ZeRO's flattened buckets): measured ≤ 2.1e-7 on losses and ≤ 1.3e-6 on parameters after 10 steps.
Adam's eps is 1e-6 here: with 1e-8 an element whose gradient is ~1e-8 turns rounding noise into lr-sized steps.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.helpers import assert_matches_single_process, cached_reference, launched_layouts

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
}
BF16 = (2, ["parallel.zero_stage=1", "parallel.precision=bf16"])

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("deepspeed-layouts")]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Callable[[str], dict]:
    return launched_layouts({**LAYOUTS, "bf16-zero1": BF16}, tmp_path_factory)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout: str, results) -> None:
    assert_matches_single_process(layout, results(layout), LAYOUTS[layout][1])


def test_bf16_with_zero1_tracks_the_fp32_run(results) -> None:
    """bf16 weights and activations with fp32 master weights and fp32 gradient accumulation (DeepSpeed's
    BF16_Optimizer): losses stay within 1e-2 relative of fp32 over 10 steps (bf16 keeps 8 bits of mantissa)."""
    got, fp32 = results("bf16-zero1"), cached_reference(())
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(fp32["losses"]), rtol=1e-2, atol=0)
    assert got["losses"] != fp32["losses"], "bf16 should not be bit-identical to fp32"
