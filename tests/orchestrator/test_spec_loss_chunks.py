"""parallel.loss_chunks: the head and loss over equal slices of what a rank holds of a row (native engine).
The engine's runs with it are held to one process in test_native_engine and test_context_parallel."""

from __future__ import annotations

import pytest

from orchestrator.errors import SpecError
from orchestrator.validate import parse_spec


def test_slices_that_divide_a_ranks_part_of_a_row_are_accepted() -> None:
    spec = parse_spec({}, overrides=["parallel.loss_chunks=8", "parallel.backend=native", "data.seq_len=4096",
                                     "parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                                     "parallel.pp=2", "parallel.grad_accum=2", "resources.gpus_per_node=8"])
    assert spec.parallel.loss_chunks == 8


@pytest.mark.parametrize(("overrides", "message"), [
    (["parallel.backend=deepspeed"], r"parallel\.loss_chunks: needs parallel\.backend=native"),
    (["data.seq_len=1000"],
     r"parallel\.loss_chunks: 16 slices do not divide a rank's part of a row, data\.seq_len / cp = 1000 tokens"),
    (["data.seq_len=2400", "parallel.cp=4", "parallel.tp=2", "parallel.sequence_parallel=true",
      "resources.gpus_per_node=8"],
     r"parallel\.loss_chunks: 16 slices do not divide a rank's part of a row, data\.seq_len / cp / tp = 300 tokens"),
    (["parallel.loss_chunks=0"], r"parallel\.loss_chunks"),
])
def test_slices_where_they_cannot_run_are_refused_naming_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec({}, overrides=["parallel.loss_chunks=16", "parallel.backend=native", *overrides])
