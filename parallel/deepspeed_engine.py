"""The DeepSpeed backend: the model built, parallelised and initialised per the spec, wrapped in a DeepSpeed engine.

Order of construction:
  1. `build_model` on the meta device (no memory);
  2. `parallel.parallelize.parallelize_llama` with this engine's `TECHNIQUES`: Megatron-style tensor parallelism
     (`parallel.megatron_tp`), activation checkpointing, compile (not under ZeRO-3), and DeepSpeed's
     PipelineModule (`parallel.deepspeed_pipeline`), which materialises this rank's stage (pp > 1);
  3. `materialize_model` the whole model (pp = 1);
  4. AdamW + LR schedule from `parallel.optim`, handed to `deepspeed.initialize` with the `build_ds_config` config
     (ZeRO, the data-parallel step) and, for tensor parallelism without pipelining, our `ModelParallelUnit` (the
     pipeline module brings its own).

Checkpoints are DeepSpeed's own files (`parallel.deepspeed_checkpoint`); a change of layout on load goes through its
universal checkpoint. DeepSpeed is imported here and in the modules only this one imports (`deepspeed_checkpoint`,
`deepspeed_pipeline`), so only a run of this backend imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.utils import clip_grad_norm_

from orchestrator.errors import UserError
from orchestrator.spec import JobSpec
from parallel.checkpoint_layout import layout_changes, run_layout
from parallel.deepspeed_checkpoint import load_converted, load_deepspeed, save_recorded, write_deferred
from parallel.deepspeed_config import build_ds_config
from parallel.deepspeed_pipeline import apply_deepspeed_pipeline
from parallel.engine import (
    Accept,
    MakeOnce,
    StepResult,
    device_documents,
    device_pairs,
    gather_full_state,
    mean_over_dp,
)
from parallel.launch import RankEnv
from parallel.materialize import materialize_model
from parallel.megatron_tp import apply_megatron_tp
from parallel.model import ModelDims, build_model
from parallel.mup import hidden_lr_scale
from parallel.optim import build_optimizer, build_param_groups, build_scheduler, set_schedule_step
from parallel.parallel_dims import ModelParallelUnit, ParallelDims
from parallel.parallelize import Techniques, parallelize_model


def mark_norm_owners(module: torch.nn.Module, dims: ParallelDims) -> None:
    """Tell DeepSpeed's gradient-norm code which rank counts each parameter, so the clipping norm is global.

    DeepSpeed counts a parameter marked `model_parallel` on every rank of the model-parallel group, and an unmarked
    one only on that group's rank 0. Under pipelining that group spans all stages, so unmarked parameters of later
    stages would never be counted. So: a parameter is marked when this rank is its one owner: tensor-parallel
    shards always, replicated ones (norms) on tp rank 0, never the last stage's copy of a tied embedding.
    """
    for param in module.parameters():
        sharded = getattr(param, "tensor_model_parallel", False)
        replica = getattr(param, "ds_pipe_replicated", False)
        param.model_parallel = (sharded or dims.tp_rank == 0) and not replica


def init_deepspeed_comm(device: torch.device) -> None:
    """DeepSpeed's own communication handle over the process group `parallel.launch.init_distributed` started.

    DeepSpeed 0.19 gathers and reduce-scatters ZeRO partitions through `torch.distributed.all_gather_into_tensor`
    and `reduce_scatter_tensor`, which torch 2.13 deprecates (a FutureWarning in every run) for `all_gather_single`
    and `reduce_scatter_single`, the same collectives under their new names: its backend is pointed at those where
    torch has them.
    """
    if device.type == "cpu":
        # Its CPU backend JIT-compiles a shared-memory all-reduce at init, used only by inference_all_reduce:
        # tens of seconds and a build lock shared by every process of the machine, for nothing training calls.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    backend = deepspeed.comm.comm.cdb
    if hasattr(dist, "all_gather_single") and backend.all_gather_function is not None:
        backend.all_gather_function = dist.all_gather_single
    if hasattr(dist, "reduce_scatter_single") and backend.reduce_scatter_function is not None:
        backend.reduce_scatter_function = dist.reduce_scatter_single


# ZeRO-3 gathers each block's weights in module hooks that a compiled block would trace through; its
# `engine.compile()` (hooks kept out of the graphs) measured 10% slower than no compile (2 H200s, 1.15B), so blocks
# are compiled only under ZeRO 0-2.
TECHNIQUES = Techniques(tensor_parallel=apply_megatron_tp, pipeline=apply_deepspeed_pipeline, data_parallel=None,
                        compile_under_zero3=False)


class DeepSpeedEngine:
    def __init__(self, spec: JobSpec, env: RankEnv, device: torch.device):
        self.spec, self.device = spec, device
        init_deepspeed_comm(device)
        self.dims = ParallelDims.from_spec(spec, env.world_size, env.rank)
        self.dims.build_groups()
        self.model_dims = ModelDims.from_config(spec.model)
        model = build_model(self.model_dims)
        state = parallelize_model(model, self.dims, spec, TECHNIQUES, device)
        if self.dims.pp == 1:
            materialize_model(model, spec.schedule.seed, device)
        module, self.loss_fn = state.module, state.loss_fn
        self.model = model  # under pp, the parts of other stages stay on the meta device
        mark_norm_owners(module, self.dims)
        named = [(n, q) for n, q in model.named_parameters() if not q.is_meta]
        groups = build_param_groups(named, spec.optim.weight_decay, hidden_lr_scale(self.model_dims))
        self.optimizer = build_optimizer(groups, spec.optim, device)
        self.scheduler = build_scheduler(self.optimizer, spec.optim, spec.schedule)
        self.ds_config = build_ds_config(spec, self.dims)
        # parallelize_model's data-parallel step for this engine: ZeRO, applied here with the optimizer.
        self.ds, _, _, _ = deepspeed.initialize(
            model=module, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=self.ds_config,
            mpu=None if self.dims.pp > 1 else ModelParallelUnit(self.dims),
        )
        self.pipelined = self.dims.pp > 1
        self._fp32_grad_norm: torch.Tensor | None = None
        self._pending_save: tuple[str, list[tuple[str, Any]]] | None = None
        self.ds.clip_fp32_gradients = self._clip_fp32_gradients

    def _clip_fp32_gradients(self) -> None:
        """Replaces DeepSpeed's clipping without ZeRO or bf16, which drops the norm it computes and counts the last
        stage's copy of a tied embedding a second time (ZeRO's own norm skips it, as here)."""
        params = [q for q in self.ds.module.parameters() if q.grad is not None]
        counted = [q for q in params if not getattr(q, "ds_pipe_replicated", False)]
        norm = clip_grad_norm_(parameters=counted, max_norm=float("inf"), mpu=self.ds.mpu)  # the norm only
        coef = torch.clamp(self.ds.gradient_clipping() / (norm + 1e-6), max=1.0)
        for q in params:
            q.grad.mul_(coef)
        self._fp32_grad_norm = norm

    def _grad_norm(self) -> torch.Tensor | float:
        norm = self.ds.get_global_grad_norm()
        return norm if norm is not None else self._fp32_grad_norm

    # ------------------------------------------------------------------------------------------ steps

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, micro_batches: Sequence[Any], accept: Accept | None = None) -> StepResult:
        if accept is not None:
            raise UserError("spikes.action: skip needs parallel.backend=native (DeepSpeed applies an update inside "
                            "its own step); use spikes.action=rewind")
        pairs = device_pairs(micro_batches, self.spec.parallel.grad_accum, self.device)
        lr = self.lr
        self.ds.train()
        if self.pipelined:
            loss = self.ds.train_batch(iter(pairs))
        else:
            losses = []
            for (inputs, targets), docs in zip(pairs, device_documents(micro_batches, self.device), strict=True):
                loss = self.loss_fn(self.ds(inputs, documents=docs), targets)
                self.ds.backward(loss)
                self.ds.step()
                losses.append(loss.detach())
            loss = mean_over_dp(torch.stack(losses).mean(), self.dims)
        return StepResult(loss=loss, grad_norm=self._grad_norm(), lr=lr)

    @torch.no_grad()
    def eval_loss(self, micro_batches: Sequence[Any]) -> torch.Tensor:
        self.ds.eval()
        pairs = device_pairs(micro_batches, None, self.device)
        if self.pipelined:
            loss = self.ds.eval_batch(iter(pairs), num_micro_batches=len(pairs))
        else:
            docs = device_documents(micro_batches, self.device)
            loss = mean_over_dp(torch.stack([self.loss_fn(self.ds(x, documents=d), y)
                                             for (x, y), d in zip(pairs, docs, strict=True)]).mean(), self.dims)
        self.ds.train()
        return loss

    @torch.no_grad()
    def forward_logits(self, tokens: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        """This rank's logits [batch, seq, vocab / tp] of a forward without gradients (downstream evaluation);
        `caches`: `KVCache`s of this rank's heads. Collective over tp, and over dp under ZeRO-3: every peer calls
        it as often. The pipeline engine runs a schedule, not a forward: refused."""
        if self.pipelined:
            raise ValueError("forward_logits: a pipelined layout has no single forward")
        self.ds.eval()
        logits = self.ds(tokens, caches)
        self.ds.train()
        return logits

    def end_forwards(self) -> None:
        """Nothing stays gathered after a forward here (ZeRO-3 releases each module's parameters itself)."""

    # ------------------------------------------------------------------------------------------ state

    def save(self, directory: str, client_state: dict[str, Any] | None = None) -> None:
        """DeepSpeed's files of this rank into `directory`: with `checkpoint.async_save`, host copies now and the
        writes in `wait_saved` (on the checkpointer's writer thread); otherwise written before this returns."""
        self.wait_saved()
        self._pending_save = directory, save_recorded(self.ds, directory, self.spec.checkpoint.async_save,
                                                      client_state or {})

    def wait_saved(self) -> list[str]:
        if self._pending_save is None:
            return []
        (directory, pending), self._pending_save = self._pending_save, None
        return write_deferred(pending, directory, self.dims.rank)

    def load(self, directory: str, saved_layout: dict[str, Any] | None = None,
             make_once: MakeOnce | None = None) -> dict[str, Any]:
        """DeepSpeed's files in `directory`; written in another dp, pp, tp or ZeRO stage, they are converted to a
        universal checkpoint first (once, through `make_once`)."""
        self.wait_saved()
        changes = layout_changes(saved_layout, run_layout(self.spec, self.dims)) if saved_layout else {}
        if not changes:
            return load_deepspeed(self.ds, directory, universal=False)
        if make_once is None:
            raise UserError(f"{directory}: written with {changes} (saved, now); converting it needs the checkpoint "
                            "directory it belongs to")
        return load_converted(self.ds, directory, make_once)

    def _local_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """This rank's real parameters under the model's names; on the last stage of a tied pipeline the embedding
        is a copy of the first stage's and is left out."""
        params = [(n, q) for n, q in self.model.named_parameters() if not q.is_meta]
        if self.pipelined and self.model_dims.tie_embeddings and self.dims.pp_rank > 0:
            params = [(n, q) for n, q in params if n != "embed_tokens.weight"]
        return params

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        zero3 = self.spec.parallel.zero_stage == 3
        keep = self.dims.tp_rank == 0 and self.dims.dp_rank == 0
        local: dict[str, torch.Tensor] = {}
        for name, param in self._local_params():
            with deepspeed.zero.GatheredParameters([param], enabled=zero3):
                value = param.detach().clone()
            if getattr(param, "tensor_model_parallel", False):
                parts = [torch.empty_like(value) for _ in range(self.dims.tp)]
                dist.all_gather(parts, value.contiguous(), group=self.dims.group("tp"))
                value = torch.cat(parts, dim=param.partition_dim)
            if keep:
                local[name] = value.float().cpu()
        return gather_full_state(local)

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor], step: int | None = None) -> None:
        zero3 = self.spec.parallel.zero_stage == 3
        for name, param in self._local_params():
            value = state[name]
            if getattr(param, "tensor_model_parallel", False):
                value = value.chunk(self.dims.tp, dim=param.partition_dim)[self.dims.tp_rank]
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=zero3):
                param.copy_(value.to(param.dtype))
        if self.pipelined and self.model_dims.tie_embeddings and self.dims.pp_rank > 0:
            self.model.embed_tokens.weight.copy_(state["embed_tokens.weight"].chunk(self.dims.tp)[self.dims.tp_rank]
                                                 .to(self.model.embed_tokens.weight.dtype))
        refresh = getattr(self.ds.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()
        if step is not None:
            set_schedule_step(self.scheduler, step)
