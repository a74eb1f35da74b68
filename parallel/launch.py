"""Where a rank is and how it joins the others: `RankEnv` from torchrun-style variables or explicit values.

    torchrun --nproc_per_node 2 -m orchestrator.cli train examples/tiny.yaml     # any launcher setting the env vars
    init_distributed(RankEnv(rank=1, world_size=2, local_rank=1, master_addr="10.0.0.3", master_port=29500))

The Ray controller passes explicit values and a rendezvous store rank 0 opened beforehand (`open_store`); nothing
here knows about Ray. NCCL is picked when CUDA is present, gloo otherwise (the spec's `resources.device` can force
CPU on a GPU machine).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from orchestrator.errors import UserError

_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
GROUP_TIMEOUT_S = 1800.0  # how long a collective, or a wait on the rendezvous store, may take before it fails


@dataclass(frozen=True)
class RankEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    local_world_size: int = 1
    store: dist.Store | None = field(default=None, compare=False, repr=False)
    """The group's rendezvous store, already opened (`open_store`, on rank 0 or in the process that starts the ranks;
    `connect_store` on the others); None: meet at master_addr:master_port, rank 0 binding it as the group forms."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RankEnv:
        """Read torchrun's variables; none set means a single process (rank 0 of 1), whose process group listens
        on a loopback port the system assigns as it binds (`master_port` 0): two single-process runs on one machine
        must not both claim torchrun's 29500, and a port found free beforehand may be taken by the time the group
        binds it."""
        environ = os.environ if environ is None else environ
        present = [k for k in _REQUIRED if k in environ]
        if not present:
            return cls(master_port=0)
        missing = [k for k in _REQUIRED if k not in environ]
        if missing:
            raise UserError(f"launch environment: {', '.join(present)} set but {', '.join(missing)} missing; "
                            "start ranks with torchrun or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
        try:
            values = {k: int(environ[k]) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
            local_rank = int(environ.get("LOCAL_RANK", "0"))
            local_world = int(environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError as e:
            raise UserError(f"launch environment: {e}; RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT are integers")\
                from None
        env = cls(values["RANK"], values["WORLD_SIZE"], local_rank, environ["MASTER_ADDR"], values["MASTER_PORT"],
                  local_world)
        if not 0 <= env.rank < env.world_size:
            raise UserError(f"launch environment: RANK={env.rank} is outside 0..WORLD_SIZE-1 ({env.world_size})")
        return env

    def export(self) -> None:
        """Set the torchrun variables in this process: DeepSpeed and PipelineModule read LOCAL_RANK and friends."""
        os.environ.update(
            RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size), MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def open_store(timeout_s: float = GROUP_TIMEOUT_S) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening on a port the system assigns as it binds (`.port`): held from the moment
    the port is known until the group forms, where a port merely found free could be taken in between (by another
    job's group, or a metrics exporter on port 0) and fail the attempt."""
    return dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def connect_store(master_addr: str, master_port: int, timeout_s: float = GROUP_TIMEOUT_S) -> dist.TCPStore:
    """Another rank's client of the store `open_store` opened on rank 0."""
    return dist.TCPStore(master_addr, master_port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def join_store(env: RankEnv) -> RankEnv:
    """`env` with a client of the store its launching process opened and holds at master_addr:master_port: every
    rank connects to it, none binds the port."""
    return replace(env, store=connect_store(env.master_addr, env.master_port))


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """cuda:<local_rank> when CUDA is there (or asked for), else cpu."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("resources.device: 'cuda' asked for, but this machine has no CUDA device; use 'auto' or 'cpu'")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(env: RankEnv, device: torch.device, timeout_s: float = GROUP_TIMEOUT_S) -> None:
    """Join the process group (NCCL for CUDA, gloo for CPU); the DeepSpeed engine adds DeepSpeed's handle to it."""
    env.export()
    if device.type == "cpu":
        # DeepSpeed, where the engine imports it, would otherwise pick its own accelerator from what it finds installed.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        meet = {"store": env.store} if env.store is not None else {
            "init_method": f"tcp://{env.master_addr}:{env.master_port}"}
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, **meet,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)


def barrier() -> None:
    """Wait for every rank of the process group; nothing to wait for without one, or alone in it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown_distributed() -> None:
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
