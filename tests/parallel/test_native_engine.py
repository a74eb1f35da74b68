"""The native backend (FSDP2, DTensor TP, torch.distributed.pipelining) trains every layout the same as one process.

The same harness as the DeepSpeed backend's equivalence tests: `layout_worker.py` under torchrun with
parallel.backend=native, against the single-process reference loop, same tolerances (fp32, gloo, 10 steps).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_deepspeed_engine import PARAM_ATOL, RTOL, reference_run, run_layout

NATIVE = ["parallel.backend=native"]
# layout_worker sets grad_accum=2 after validation; the validator must see it to accept two stages.
PP2 = ["parallel.pp=2", "parallel.grad_accum=2"]

# name → (processes, spec overrides); features ride along where they are numerically neutral.
LAYOUTS = {
    "single": (1, ["model.tie_embeddings=true"]),
    "dp2-reshard": (2, ["parallel.zero_stage=3", "model.tie_embeddings=true"]),
    "dp2-no-reshard": (2, ["parallel.zero_stage=2", "parallel.activation_checkpointing=true"]),
    "dp2-reduce-once": (2, ["parallel.zero_stage=1"]),
    "tp2": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2-interleaved": (2, [*PP2, "parallel.pp_schedule=interleaved_1f1b"]),
    "pp2-zero-bubble": (2, [*PP2, "parallel.pp_schedule=zero_bubble"]),
    "dp2-tp2": (4, ["parallel.tp=2", "parallel.zero_stage=3", "model.tie_embeddings=true"]),
    "dp2-pp2": (4, [*PP2, "parallel.zero_stage=2"]),
    "pp2-tp2": (4, [*PP2, "parallel.tp=2", "parallel.sequence_parallel=true"]),
    "dp2-pp2-tp2": (8, [*PP2, "parallel.tp=2", "parallel.zero_stage=3",
                        "parallel.pp_schedule=interleaved_1f1b"]),
}


@pytest.fixture(scope="module")
def references() -> dict[tuple[str, ...], dict]:
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_native_layout_matches_single_process(layout: str, references: dict, tmp_path: Path) -> None:
    procs, overrides = LAYOUTS[layout]
    model_overrides = tuple(o for o in overrides if o.startswith("model."))
    if model_overrides not in references:
        references[model_overrides] = reference_run(list(model_overrides))
    expected = references[model_overrides]
    got = run_layout(procs, [*NATIVE, *overrides], tmp_path / "result.pt", tmp_path)

    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(expected["losses"]), rtol=RTOL, atol=0)
    assert got["params"].keys() == expected["params"].keys()
    for name, value in expected["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=PARAM_ATOL,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert all(n > 0 for n in got["grad_norms"]) and got["lrs"][0] < got["lrs"][2]
    assert got["eval_loss"] < expected["losses"][0] - 0.1, "eval of the first batch sees the trained weights"
