"""The dp × pp × tp grid: which coordinate each rank has, and the process groups along each axis.

Ranks are laid out as DeepSpeed's `PipeModelDataParallelTopology` does (axes pipe, data, model; model fastest):
rank = (pp_rank · dp + dp_rank) · tp + tp_rank. Tensor-parallel peers are neighbours (same node, fastest links),
and the pipeline engine's own groups line up with ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from orchestrator.errors import UserError
from orchestrator.spec import JobSpec


@dataclass
class ParallelDims:
    dp: int
    pp: int
    tp: int
    rank: int = 0
    groups: dict[str, dist.ProcessGroup | None] = field(default_factory=dict, repr=False)
    mesh: Any = field(default=None, repr=False)  # the native engine's DeviceMesh (pp, dp, tp), where one is built

    @classmethod
    def from_spec(cls, spec: JobSpec, world_size: int, rank: int) -> ParallelDims:
        p = spec.parallel
        dp = p.dp or world_size // (p.pp * p.tp)
        if dp * p.pp * p.tp != world_size:
            raise UserError(f"parallel: dp={p.dp or dp} × pp={p.pp} × tp={p.tp} = {dp * p.pp * p.tp}, "
                            f"but {world_size} ranks were started (WORLD_SIZE)")
        return cls(dp=dp, pp=p.pp, tp=p.tp, rank=rank)

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def build_groups(self) -> None:
        """Create the tp, dp and pp groups; every rank must call this, in the same order, after joining."""
        axes = {
            "tp": [[self.rank_of(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)],
            "dp": [[self.rank_of(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)],
            "pp": [[self.rank_of(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)],
        }
        for axis, all_ranks in axes.items():
            for ranks in all_ranks:
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    self.groups[axis] = group

    def group(self, axis: str) -> dist.ProcessGroup | None:
        if axis not in self.groups:
            raise RuntimeError("ParallelDims.build_groups() must run before the groups are used")
        return self.groups[axis]


class ModelParallelUnit:
    """The `mpu` DeepSpeed asks for when tensor parallelism is on without pipelining (Megatron's names).

    With pipelining, DeepSpeed takes the pipeline module's own grid instead, built from the same layout.
    """

    def __init__(self, dims: ParallelDims):
        self.dims = dims

    def get_model_parallel_group(self):
        return self.dims.group("tp")

    def get_model_parallel_rank(self) -> int:
        return self.dims.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tp

    def get_tensor_model_parallel_group(self):
        return self.dims.group("tp")

    def get_tensor_model_parallel_rank(self) -> int:
        return self.dims.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.dims.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.dims.rank - self.dims.tp_rank

    def get_data_parallel_group(self):
        return self.dims.group("dp")

    def get_data_parallel_rank(self) -> int:
        return self.dims.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0
