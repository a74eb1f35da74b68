"""The one interface between the training loop and a parallel backend (DeepSpeed today; PyTorch-native beside it).

A micro-batch is a LongTensor [micro_batch_size, seq_len + 1] of packed token rows, as the loader yields them:
inputs are `[:, :-1]`, targets `[:, 1:]`. One `train_step` is one optimizer step over `grad_accum` micro-batches
(pipeline micro-batches when pp > 1). Losses come back as 0-dim tensors averaged over the whole step and every
data-parallel rank, left on the device, so the loop reads them (a host sync) only when it logs.

State for checkpoints: each engine owns its format. `save(directory)` starts writing this rank's part of the
model, optimizer and schedule state into `directory` (it may return once the state is copied to host memory);
`wait_saved()` blocks until those files are written and names them, so the checkpointer (`parallel.checkpoint`) can
checksum and commit them; `load(directory, saved_layout, make_once)` restores them, also when they were written in
another layout of the same backend (`make_once` keeps what a conversion derives beside the checkpoint). Across
backends, `full_state_dict()` gathers the whole model under the Hugging Face-style names of `parallel.model` and
`load_full_state_dict()` scatters one back into any layout (`parallel.resume` does that).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from orchestrator.errors import UserError
from orchestrator.spec import JobSpec
from parallel.launch import RankEnv
from parallel.model import ModelDims
from parallel.parallel_dims import ParallelDims

# make_once(product, what, make): the local path of `product` in the checkpoint's cache of derived state, made by
# make(path) on one rank and visible to every rank when it returns (collective); `what` names it in errors.
MakeOnce = Callable[[str, str, Callable[[str], None]], str]
# accept(loss, grad_norm): asked after the backward pass, before the optimizer step, which happens only if it says
# True (on every rank alike); the step then does not count for the LR schedule. How a loss spike's update is dropped.
Accept = Callable[[torch.Tensor, "torch.Tensor | float"], bool]


@dataclass
class StepResult:
    loss: torch.Tensor  # 0-dim, on the device; float(loss) syncs
    grad_norm: torch.Tensor | float  # global norm before clipping
    lr: float


class Engine(Protocol):
    dims: ParallelDims  # the layout and this rank's place in it
    model_dims: ModelDims
    device: torch.device
    scheduler: torch.optim.lr_scheduler.LambdaLR  # the LR schedule (`parallel.optim.build_scheduler`)

    def train_step(self, micro_batches: list[torch.Tensor], accept: Accept | None = None) -> StepResult: ...

    def eval_loss(self, micro_batches: list[torch.Tensor]) -> torch.Tensor: ...

    def forward_logits(self, tokens: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        """This rank's logits of a forward without gradients, vocabulary-sharded under tp (downstream evaluation,
        `parallel.lm_eval_adapter`); collective, so every peer calls it as often. Not under pipelining."""
        ...

    def end_forwards(self) -> None:
        """Free what `forward_logits` left gathered."""
        ...

    def save(self, directory: str, client_state: dict[str, Any] | None = None) -> None:
        """Start writing this rank's state (and `client_state`) into `directory`; collective."""
        ...

    def wait_saved(self) -> list[str]:
        """Block until the last `save`'s files are written; the paths of those this rank wrote (re-raises its
        error). Nothing pending: an empty list."""
        ...

    def load(self, directory: str, saved_layout: dict[str, Any] | None = None,
             make_once: MakeOnce | None = None) -> dict[str, Any]:
        """Restore what `save` wrote into `directory`, in `saved_layout` (None: this run's); its client_state."""
        ...

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter, unsharded, on CPU, on global rank 0 (an empty dict elsewhere); collective."""
        ...

    def load_full_state_dict(self, state: dict[str, torch.Tensor], step: int | None = None) -> None:
        """Set the weights from a full state dict present on every rank (optimizer state starts fresh); with
        `step`, the LR schedule goes on from there."""
        ...

    @property
    def lr(self) -> float: ...


def device_pairs(micro_batches: Sequence[Any], grad_accum: int | None,
                 device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of each micro-batch on `device`, copied without blocking the host; a training step must
    bring exactly `grad_accum` of them (None: any number, for evaluation)."""
    if grad_accum is not None and len(micro_batches) != grad_accum:
        raise ValueError(f"a step takes grad_accum={grad_accum} micro-batches, got {len(micro_batches)}")
    return [(mb.inputs.to(device, non_blocking=True), mb.targets.to(device, non_blocking=True))
            for mb in micro_batches]


def device_documents(micro_batches: Sequence[Any], device: torch.device) -> list[torch.Tensor | None]:
    """Each micro-batch's document ids [rows, seq] on `device` (`parallel.documents`); None where the loader gave
    none, which the model reads as plain causal attention over the row."""
    return [None if getattr(mb, "documents", None) is None else mb.documents.to(device, non_blocking=True)
            for mb in micro_batches]


def mean_over_dp(loss: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """A rank's loss averaged over its data-parallel peers, in place and without a host sync."""
    if dims.dp > 1:
        dist.all_reduce(loss, group=dims.group("dp"))
        loss = loss / dims.dp
    return loss


def gather_full_state(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's part of the full state (empty where a rank holds only copies) merged on global rank 0, sorted by
    name; an empty dict elsewhere. Collective."""
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if dist.get_rank() != 0:
        return {}
    full: dict[str, torch.Tensor] = {}
    for part in gathered:
        full.update(part)
    return dict(sorted(full.items()))


def build_engine(spec: JobSpec, env: RankEnv, device: torch.device) -> Engine:
    """The engine `spec.parallel.backend` names, with the model built, sharded and initialised from the schedule's seed.

    The process group must already be up (`parallel.launch.init_distributed`).
    """
    if spec.parallel.backend == "deepspeed":
        return deepspeed_engine_class()(spec, env, device)
    if spec.parallel.backend == "native":
        from parallel.native_engine import NativeEngine

        return NativeEngine(spec, env, device)
    raise UserError(f"parallel.backend: {spec.parallel.backend!r} is not available; use 'deepspeed' or 'native'")


def deepspeed_engine_class() -> type[Engine]:
    """`parallel.deepspeed_engine.DeepSpeedEngine`, imported with MLflow hidden from DeepSpeed.

    Importing DeepSpeed imports its autotuner, which imports MLflow when it is installed (the trackers extra) only to
    log autotuning trials, which no run starts: 3 of the 7 CPU-seconds of `import deepspeed` on a 2-core CPU, paid by
    every rank at every start. MLflow stays importable afterwards, for the mlflow tracker.
    """
    hidden = "mlflow" not in sys.modules
    if hidden:
        sys.modules["mlflow"] = None  # an import of it raises ImportError, which DeepSpeed's autotuner expects
    try:
        from parallel.deepspeed_engine import DeepSpeedEngine
    finally:
        if hidden:
            del sys.modules["mlflow"]
    return DeepSpeedEngine
