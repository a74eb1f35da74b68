"""The native backend (FSDP2, DTensor TP, torch.distributed.pipelining) trains every layout the same as one process.

The same harness as the DeepSpeed backend's equivalence tests: `layout_worker.py` under torchrun with
parallel.backend=native, one launch for the layouts of one process count, against the single-process reference loop,
same tolerances (fp32, gloo, 10 steps).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.helpers import assert_matches_single_process, launched_layouts

NATIVE = ["parallel.backend=native"]
# layout_worker sets grad_accum=2 after validation; the validator must see it to accept two stages.
PP2 = ["parallel.pp=2", "parallel.grad_accum=2"]

# name → (processes, spec overrides); features ride along where they are numerically neutral.
LAYOUTS = {
    "single": (1, ["model.tie_embeddings=true", "parallel.activation_checkpointing=selective"]),
    "dp2-reshard": (2, ["parallel.zero_stage=3", "model.tie_embeddings=true",
                        "parallel.activation_checkpointing=selective", "parallel.activation_offload=true",
                        "parallel.loss_chunks=4"]),
    "dp2-no-reshard": (2, ["parallel.zero_stage=2", "parallel.activation_checkpointing=full",
                           "parallel.activation_offload=true"]),
    "dp2-reduce-once": (2, ["parallel.zero_stage=1"]),
    "tp2": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.activation_checkpointing=selective",
                "parallel.activation_offload=true", "parallel.loss_chunks=2"]),
    "pp2-interleaved": (2, [*PP2, "parallel.pp_schedule=interleaved_1f1b", "parallel.loss_chunks=2"]),
    "pp2-zero-bubble": (2, [*PP2, "parallel.pp_schedule=zero_bubble"]),
    "dp2-tp2": (4, ["parallel.tp=2", "parallel.zero_stage=3", "model.tie_embeddings=true"]),
    "dp2-pp2": (4, [*PP2, "parallel.zero_stage=2", "parallel.loss_chunks=4"]),
    "pp2-tp2": (4, [*PP2, "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.loss_chunks=2"]),
    "dp2-pp2-tp2": (8, [*PP2, "parallel.tp=2", "parallel.zero_stage=3",
                        "parallel.pp_schedule=interleaved_1f1b"]),
}


pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("native-layouts")]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Callable[[str], dict]:
    return launched_layouts({name: (procs, [*NATIVE, *overrides]) for name, (procs, overrides) in LAYOUTS.items()},
                            tmp_path_factory)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_native_layout_matches_single_process(layout: str, results) -> None:
    assert_matches_single_process(layout, results(layout), [*NATIVE, *LAYOUTS[layout][1]])
