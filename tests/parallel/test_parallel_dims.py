"""Rank coordinates in the dp × pp × tp grid, laid out as DeepSpeed's pipeline topology lays them out."""

from __future__ import annotations

import pytest
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from orchestrator.errors import UserError
from orchestrator.validate import parse_spec
from parallel.parallel_dims import ParallelDims


def test_coordinates_match_deepspeeds_topology() -> None:
    topology = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=3)
    for rank in range(12):
        dims = ParallelDims(dp=3, pp=2, tp=2, rank=rank)
        coord = topology.get_coord(rank)
        assert (dims.pp_rank, dims.dp_rank, dims.tp_rank) == (coord.pipe, coord.data, coord.model)
        assert dims.rank_of(dims.pp_rank, dims.dp_rank, dims.tp_rank) == rank


def test_a_layout_that_does_not_fill_the_ranks_names_every_factor() -> None:
    spec = parse_spec({"model": {"vocab_size": 128}, "parallel": {"tp": 2}, "resources": {"gpus_per_node": 4}})
    assert ParallelDims.from_spec(spec, 4, 0).dp == 2
    with pytest.raises(UserError, match=r"parallel: dp=2 × pp=1 × tp=2 = 4, but 6 ranks were started \(WORLD_SIZE\)"):
        ParallelDims.from_spec(spec, 6, 0)


def test_groups_must_be_built_before_use() -> None:
    with pytest.raises(RuntimeError, match="build_groups"):
        ParallelDims(dp=1, pp=1, tp=1).group("tp")
