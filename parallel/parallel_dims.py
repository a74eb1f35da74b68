"""The dp × cp × pp × tp grid: which coordinate each rank has, and the process groups along each axis.

Ranks are laid out as DeepSpeed's `PipeModelDataParallelTopology` does (axes pipe, data, model; model fastest), with
the context-parallel axis between data and model as torchtitan's mesh ["pp", "dp", "cp", "tp"] has it:
rank = ((pp_rank · dp + dp_rank) · cp + cp_rank) · tp + tp_rank. Tensor-parallel peers are neighbours (same node,
fastest links), context-parallel ones next (they exchange keys and values every layer), and with cp = 1 (the
DeepSpeed engine's only value) the pipeline engine's own groups line up with ours.
"""

from __future__ import annotations

import itertools
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
    cp: int = 1
    ep: int = 1
    groups: dict[str, dist.ProcessGroup | None] = field(default_factory=dict, repr=False)
    # The native engine's DeviceMesh (pp, dp, cp, tp), or (pp, dp_out, dp_in, cp, tp) under ep > 1, where one is built.
    mesh: Any = field(default=None, repr=False)

    @classmethod
    def from_spec(cls, spec: JobSpec, world_size: int, rank: int) -> ParallelDims:
        p = spec.parallel
        dp = p.dp or world_size // (p.cp * p.pp * p.tp)
        if dp * p.cp * p.pp * p.tp != world_size:
            cp = f"cp={p.cp} × " if p.cp > 1 else ""
            raise UserError(f"parallel: dp={p.dp or dp} × {cp}pp={p.pp} × tp={p.tp} = {dp * p.cp * p.pp * p.tp}, "
                            f"but {world_size} ranks were started (WORLD_SIZE)")
        return cls(dp=dp, pp=p.pp, tp=p.tp, rank=rank, cp=p.cp, ep=p.ep)

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.pp * self.tp

    @property
    def dp_shard(self) -> int:
        """Ranks FSDP shards the weights over: dp × cp, since context-parallel peers hold the same weights and
        their gradients are reduced over cp too (torchtitan's "dp_shard_cp")."""
        return self.dp * self.cp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def cp_rank(self) -> int:
        return (self.rank // self.tp) % self.cp

    @property
    def dp_rank(self) -> int:
        return (self.rank // (self.tp * self.cp)) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.cp * self.dp)

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int, cp_rank: int = 0) -> int:
        return ((pp_rank * self.dp + dp_rank) * self.cp + cp_rank) * self.tp + tp_rank

    def build_groups(self) -> None:
        """Create the tp, dp and pp groups (and cp's where cp > 1); every rank must call this, in the same order,
        after joining."""
        sizes = {"pp": self.pp, "dp": self.dp, "cp": self.cp, "tp": self.tp}
        for axis in ("tp", "dp", "pp", "cp")[:4 if self.cp > 1 else 3]:
            others = [range(n) if a != axis else [0] for a, n in sizes.items()]
            for coords in itertools.product(*others):
                ranks = [self._rank_at({**dict(zip(sizes, coords, strict=True)), axis: i}) for i in range(sizes[axis])]
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    self.groups[axis] = group

    def _rank_at(self, coords: dict[str, int]) -> int:
        return self.rank_of(coords["pp"], coords["dp"], coords["tp"], coords["cp"])

    def build_mesh(self, device_type: str) -> None:
        """The native engine's DeviceMesh ["pp", "dp", "cp", "tp"] in this module's rank order, its groups, and
        under cp > 1 the flattened "dp_shard_cp" that FSDP shards over; collective.

        Under ep > 1 dp is split in two, ["pp", "dp_out", "dp_in", "cp", "tp"] (the same rank order): the ep group
        is dp_in × cp, ep consecutive ranks of dp × cp (validation makes ep a multiple of cp), and the ranks
        holding the same experts differ in dp_out (torchtitan's "dp_shard_mod_ep"); "dp" is dp_out × dp_in."""
        from torch.distributed.device_mesh import init_device_mesh

        if self.ep == 1:
            self.mesh = init_device_mesh(device_type, (self.pp, self.dp, self.cp, self.tp),
                                         mesh_dim_names=("pp", "dp", "cp", "tp"))
            dp_mesh = self.mesh["dp"]
        else:
            dp_in = self.ep // self.cp
            self.mesh = init_device_mesh(device_type, (self.pp, self.dp // dp_in, dp_in, self.cp, self.tp),
                                         mesh_dim_names=("pp", "dp_out", "dp_in", "cp", "tp"))
            dp_mesh = self.mesh["dp_out", "dp_in"]._flatten("dp")
            self._ep_mesh = self.mesh["dp_in", "cp"]._flatten("ep") if self.cp > 1 else self.mesh["dp_in"]
            self._expert_fsdp_mesh = self.mesh["dp_out"]
        # FSDP's meshes are kept here: slicing a flattened dimension from the root mesh is deprecated.
        data = ("dp",) if self.ep == 1 else ("dp_out", "dp_in")
        self._fsdp_mesh = self.mesh[(*data, "cp")]._flatten("dp_shard_cp") if self.cp > 1 else dp_mesh
        self.groups = {axis: self.mesh[axis].get_group() for axis in ("pp", "cp", "tp")} | {"dp": dp_mesh.get_group()}

    def fsdp_mesh(self) -> Any:
        """The mesh FSDP shards dense parameters over: dp, or dp × cp flattened (`dp_shard`)."""
        return self._fsdp_mesh

    def ep_mesh(self) -> Any:
        """The 1-D mesh an MoE layer's experts are split over (ep > 1): ep consecutive ranks of dp × cp."""
        return self._ep_mesh

    def expert_fsdp_mesh(self) -> Any:
        """The ranks holding the same experts (ep > 1), which FSDP shards expert parameters over: dp × cp / ep."""
        return self._expert_fsdp_mesh

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
