"""The PyTorch-native backend: FSDP2, DTensor tensor parallelism, torch.distributed.pipelining and DCP checkpoints.

Order of construction:
  1. `build_model` on the meta device; a DeviceMesh (pp, dp, cp, tp) laid out as `ParallelDims` numbers ranks;
  2-5. `parallel.parallelize.parallelize_llama` with this engine's `TECHNIQUES`: `apply_dtensor_tp` shards the
     linears and the embedding (tp > 1); activation checkpointing and compile on the blocks; `prune_to_stages`
     keeps this rank's pipeline stages (pp > 1); `apply_fsdp` shards blocks, then the roots, over the dp axis
     (dp × cp > 1; see `parallel.fsdp` for the ZeRO mapping);
  6. every parameter materialised on the device from `init_parameter`, each rank keeping its shard;
  7. AdamW (fused on CUDA) and the LR schedule from `parallel.optim`, as the DeepSpeed backend uses them.

A step never waits for the host: losses and the gradient norm stay on the device (`StepResult`), clipping multiplies
by a device-side coefficient, and the only collectives are the ones the layout needs.

Checkpoints are DCP: each rank writes its own shards (asynchronously: state is staged in host memory, then written
by a background thread) under names that do not depend on the layout, so a checkpoint loads into any dp × pp × tp.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._pytree import tree_map_only

from orchestrator.errors import CheckpointError
from orchestrator.spec import JobSpec
from parallel.activation_offload import ActivationOffload
from parallel.chunked_loss import chunked_loss
from parallel.context_parallel import mean_over_cp, shard_pairs
from parallel.dtensor_tp import apply_dtensor_tp
from parallel.engine import (
    Accept,
    MakeOnce,
    StepResult,
    device_documents,
    device_pairs,
    gather_full_state,
    mean_over_dp,
)
from parallel.float8 import after_optimizer_step
from parallel.fsdp import shard_data_parallel
from parallel.launch import RankEnv
from parallel.lora import initial_value, is_adapter
from parallel.megatron_tp import VocabParallelLoss
from parallel.model import ModelDims, build_model, cross_entropy
from parallel.moe import materialize_buffers, moe_state, set_aux_loss_scale, set_sequence_group, update_expert_bias
from parallel.mup import hidden_lr_scale
from parallel.optim import build_optimizer, build_param_groups, build_scheduler, set_schedule_step
from parallel.parallel_dims import ParallelDims
from parallel.parallelize import Parallelized, Techniques, parallelize_model

DCP_DIR = "dcp"
ENGINE_STATE = "engine_state.pt"


def apply_dtensor_tensor_parallel(state: Parallelized, dims: ParallelDims, spec: JobSpec) -> None:
    """`parallelize_llama`'s tensor-parallel step: DTensor plans over the mesh's tp axis; logits stay
    vocabulary-sharded for `VocabParallelLoss`."""
    apply_dtensor_tp(state.model, state.blocks, dims.mesh["tp"], spec.parallel.sequence_parallel)
    state.loss_fn = VocabParallelLoss(dims.group("tp"), spec.parallel.compile)


def apply_torch_pipelining(state: Parallelized, dims: ParallelDims, spec: JobSpec) -> None:
    """`parallelize_llama`'s pipeline step: this rank's stages of `torch.distributed.pipelining`; the model keeps
    only their parts, and FSDP shards each stage as a root."""
    from parallel.native_pipeline import prune_to_stages

    state.stages = prune_to_stages(state.model, dims.pp_rank, dims.pp, spec.parallel.pp_schedule)
    state.blocks, state.roots = list(state.model.layers.values()), state.stages


TECHNIQUES = Techniques(tensor_parallel=apply_dtensor_tensor_parallel, pipeline=apply_torch_pipelining,
                        data_parallel=shard_data_parallel, compile_under_zero3=True)


class NativeEngine:
    def __init__(self, spec: JobSpec, env: RankEnv, device: torch.device):
        self.spec, self.device = spec, device
        p = spec.parallel
        self.dims = dims = ParallelDims.from_spec(spec, env.world_size, env.rank)
        dims.build_mesh(device.type)
        self.mesh = dims.mesh
        self.model_dims = ModelDims.from_config(spec.model)
        self.model = model = build_model(self.model_dims)
        self.pipelined = dims.pp > 1
        state = parallelize_model(model, dims, spec, TECHNIQUES, device)
        self.stages, self.loss_fn = state.stages, state.loss_fn
        if p.compile and dims.tp == 1:
            # Fuses the fp32 upcast of the logits into the loss instead of writing an fp32 copy of them.
            self.loss_fn = torch.compile(cross_entropy)
        bf16 = p.precision == "bf16"
        self.sharded = dims.dp_shard > 1
        # Without FSDP's mixed precision, bf16 is autocast over fp32 weights.
        # ZeRO-0/1: gradients accumulate unsharded in fp32 over the micro-batches and are reduced once per step
        # (the pipeline schedule does the same on its own).
        self.reduce_once_per_step = self.sharded and p.zero_stage <= 1 and not self.pipelined
        self._autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 and not self.sharded \
            else contextlib.nullcontext
        self._materialize(spec.schedule.seed)
        self._offload = ActivationOffload(model, device).forward if p.activation_offload else contextlib.nullcontext
        self.params = [q for q in model.parameters()]
        groups = build_param_groups(model.named_parameters(), spec.optim.weight_decay,
                                    hidden_lr_scale(self.model_dims))
        self.optimizer = build_optimizer(groups, spec.optim, device)
        self.scheduler = build_scheduler(self.optimizer, spec.optim, spec.schedule)
        if self.pipelined:
            from parallel.native_pipeline import build_schedule

            schedule_loss = self.loss_fn
            if p.loss_chunks > 1:  # the last stage computes the loss of its slices in its forward
                for stage in self.stages:
                    if stage.head is not None:
                        stage.slice_loss = functools.partial(chunked_loss, stage.head, self.loss_fn,
                                                             chunks=p.loss_chunks, sequence_shards=self._shards)
                schedule_loss = _passed_through
            self.schedule, self.first_stage, self.last_stage = build_schedule(
                self.stages, dims.pp_rank, dims.pp, p.pp_schedule, p.grad_accum, schedule_loss, device,
                dims.group("pp"))
        # MoE: the balancing loss is averaged over micro-batches as the loss is (the pipeline schedule scales
        # gradients after the backward instead) and counts whole rows under cp, and the step's routing counts are
        # summed over the ranks that saw the other tokens of the step (dp × cp) for the aux-free bias.
        set_aux_loss_scale(model, 1.0 if self.pipelined else 1.0 / p.grad_accum)
        set_sequence_group(model, dims.group("cp") if dims.cp > 1 else None)
        self._routing_group = dims.fsdp_mesh().get_group() if dims.dp_shard > 1 else None
        self._pending_save = None
        self._save_group = None
        # Under LoRA a checkpoint holds what trains (adapters and their optimizer state); the frozen model is
        # checkpoint.init_from's, reloaded on resume (`parallel.lora_base`).
        # (dcp.load fails on any adapter missing from the files, so loading need not insist on the frozen ones.)
        lora = spec.model.lora.rank > 0
        self._state_options = StateDictOptions(ignore_frozen_params=lora, strict=not lora)

    @torch.no_grad()
    def _materialize(self, seed: int) -> None:
        tied = self.model_dims.tie_embeddings
        self.model.to_empty(device=self.device)
        if tied and not self.sharded:
            self.model.lm_head.weight = self.model.embed_tokens.weight  # to_empty made two tensors of the one
        for name, param in self.model.named_parameters():
            value = initial_value(name, tuple(param.shape), self.model_dims, seed, self.device)
            if isinstance(param, DTensor):
                # Every rank computes the same full value and keeps its own shard: no communication.
                value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(value)
        materialize_buffers(self.model, self.device)

    # ------------------------------------------------------------------------------------------ steps

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, micro_batches: Sequence[Any], accept: Accept | None = None) -> StepResult:
        lr = self.lr
        docs = device_documents(micro_batches, self.device)
        pairs = shard_pairs(device_pairs(micro_batches, self.spec.parallel.grad_accum, self.device), docs, self.dims,
                            self.model_dims.attention_mask)
        if self.pipelined:
            loss = self._run_pipeline(pairs, train=True, documents=docs)
        else:
            losses = []
            for i, (inputs, targets) in enumerate(pairs):
                if self.reduce_once_per_step:
                    self.model.set_requires_gradient_sync(i == len(pairs) - 1)
                # The logits are the loss's alone: nothing here may hold them through the backward.
                with self._autocast(), self._offload():
                    loss = self._loss(inputs, targets, docs[i])
                (loss / len(pairs)).backward()
                losses.append(loss.detach())
            loss = torch.stack(losses).mean()
        grad_norm = self._clip_grad_norm()
        loss = mean_over_dp(mean_over_cp(loss, self.dims), self.dims)
        accepted = accept is None or accept(loss, grad_norm)
        if accepted:
            self.optimizer.step()
            if self.spec.parallel.float8 != "none":
                after_optimizer_step(self.model, self.spec.parallel.float8, fsdp=self.sharded)
            self.scheduler.step()
        if self.model_dims.moe is not None:
            update_expert_bias(self.model, self._routing_group, update=accepted)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr)

    @torch.no_grad()
    def eval_loss(self, micro_batches: Sequence[Any]) -> torch.Tensor:
        docs = device_documents(micro_batches, self.device)
        pairs = shard_pairs(device_pairs(micro_batches, None, self.device), docs, self.dims,
                            self.model_dims.attention_mask)
        if self.pipelined:
            n = self.spec.parallel.grad_accum
            if len(pairs) % n:
                raise ValueError(f"evaluation under pipelining takes a multiple of grad_accum={n} micro-batches, "
                                 f"got {len(pairs)}")
            loss = torch.stack([self._run_pipeline(pairs[i:i + n], train=False, documents=docs[i:i + n])
                                for i in range(0, len(pairs), n)]).mean()
        else:
            with self._autocast():
                loss = torch.stack([self._loss(x, y, d) for (x, y), d in zip(pairs, docs, strict=True)]).mean()
        self._reshard()
        return mean_over_dp(mean_over_cp(loss, self.dims), self.dims)

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor, documents: torch.Tensor | None) -> torch.Tensor:
        """One micro-batch's mean loss, its head and loss run a slice of the tokens at a time under
        `parallel.loss_chunks`."""
        chunks = self.spec.parallel.loss_chunks
        if chunks == 1:
            return self.loss_fn(self.model(inputs, documents=documents), targets)
        return chunked_loss(self.model.head, self.loss_fn, self.model(inputs, documents=documents, head=False),
                            targets, chunks, self._shards)

    @property
    def _shards(self) -> int:
        """The parts of a row the lm_head gathers over tp: tp under sequence parallelism, else 1."""
        return self.dims.tp if self.spec.parallel.sequence_parallel else 1

    @torch.no_grad()
    def forward_logits(self, tokens: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        """This rank's logits [batch, seq, vocab / tp] of a forward without gradients (downstream evaluation);
        `caches`: `KVCache`s of this rank's heads. Collective over tp, and over dp where parameters are sharded:
        every peer calls it as often. A pipeline runs a schedule, not a forward: refused."""
        if self.pipelined:
            raise ValueError("forward_logits: a pipelined layout has no single forward")
        if self.dims.cp > 1:
            raise ValueError("forward_logits: under parallel.cp > 1 a rank holds only chunks of each sequence")
        with self._autocast():
            return self.model(tokens, caches)

    def end_forwards(self) -> None:
        """Free what the forwards of `forward_logits` left gathered."""
        self._reshard()

    def _run_pipeline(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], train: bool,
                      documents: list[torch.Tensor | None]) -> torch.Tensor:
        """One pass of the schedule over the micro-batches; the mean loss, on every stage. Document ids go to every
        stage as a keyword input (the schedule splits it into micro-batches like the tokens)."""
        args = (torch.cat([x for x, _ in pairs]),) if self.first_stage else ()
        losses: list[torch.Tensor] = []
        kwargs = {"target": torch.cat([y for _, y in pairs]), "losses": losses} if self.last_stage else {}
        if self.last_stage and self.spec.parallel.loss_chunks > 1:
            kwargs["targets"] = kwargs["target"]  # to the last stage's forward, which slices the loss itself
        if documents[0] is not None:
            kwargs["documents"] = torch.cat(documents)
        with self._autocast():
            (self.schedule.step if train else self.schedule.eval)(*args, **kwargs)
        loss = torch.stack(losses).detach().mean() if self.last_stage else torch.zeros((), device=self.device)
        dist.all_reduce(loss, group=self.dims.group("pp"))  # the last stage's loss, everywhere
        return loss

    def _clip_grad_norm(self) -> torch.Tensor:
        """The global gradient norm (before clipping), and the gradients clipped to `optim.grad_clip` if set.

        Gradients live on different meshes (2-D for tensor-parallel weights under FSDP, 1-D for the rest, plain
        tensors without either): each group's norm is reduced over its own mesh, stages' squares are summed over pp.
        """
        groups: dict[Any, list[torch.Tensor]] = {}
        for param in self.params:
            if param.grad is not None:
                groups.setdefault(getattr(param.grad, "device_mesh", None), []).append(param)
        squares = torch.zeros((), device=self.device)
        for params in groups.values():
            norm = torch.nn.utils.get_total_norm([q.grad for q in params], foreach=True)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            squares = squares + norm.float() ** 2
        if self.pipelined:
            dist.all_reduce(squares, group=self.dims.group("pp"))
        total = squares.sqrt()
        if self.spec.optim.grad_clip:
            for params in groups.values():
                torch.nn.utils.clip_grads_with_norm_(params, self.spec.optim.grad_clip, total, foreach=True)
        return total

    def _reshard(self) -> None:
        """Free parameters a forward without backward left gathered (no-reshard FSDP keeps them for the backward)."""
        if self.sharded:
            for module in self.model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    # ------------------------------------------------------------------------------------------ state

    def save(self, directory: str, client_state: dict[str, Any] | None = None) -> None:
        """Stage this rank's shards in host memory and write them in the background (DCP); `wait_saved` joins."""
        self.wait_saved()
        os.makedirs(directory, exist_ok=True)
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self._state_options)
        state = {"model": model_state, "optim": optim_state}
        if self.device.type == "cpu":
            # DCP stages by copying to host memory, which for host tensors is no copy: training would overwrite them.
            state = tree_map_only(torch.Tensor, lambda t: t.detach().clone(), state)
        if self._save_group is None:
            # The writer thread's collectives get their own group, never interleaved with the training step's.
            self._save_group = dist.new_group(backend="gloo")
        future = dcp.async_save(state, checkpoint_id=os.path.join(directory, DCP_DIR), process_group=self._save_group)
        self._pending_save = directory, future
        if self.dims.rank == 0:
            torch.save({"scheduler": self.scheduler.state_dict(), "client_state": client_state or {}},
                       os.path.join(directory, ENGINE_STATE))

    def wait_saved(self) -> list[str]:
        """Block until the checkpoint being written in the background is complete (re-raises its error); the files
        of this rank: its own DCP shards (named `__<rank>_` by DCP), and on rank 0 the DCP metadata and the
        schedule's state as well."""
        if self._pending_save is None:
            return []
        (directory, future), self._pending_save = self._pending_save, None
        future.result()
        dcp_dir = os.path.join(directory, DCP_DIR)
        # Read from the directory, not from the returned metadata: torch 2.11 returns it without storage_data.
        names = os.listdir(dcp_dir)
        mine = {n for n in names if n.startswith(f"__{self.dims.rank}_")}
        if self.dims.rank == 0:
            mine |= {n for n in names if not n.startswith("__")}
        files = [os.path.join(dcp_dir, n) for n in sorted(mine)]
        return files + ([os.path.join(directory, ENGINE_STATE)] if self.dims.rank == 0 else [])

    def load(self, directory: str, saved_layout: dict[str, Any] | None = None,
             make_once: MakeOnce | None = None) -> dict[str, Any]:
        """Restore model, optimizer and schedule from a DCP checkpoint of any layout (DCP reshards on load, so
        `saved_layout` and `make_once` are not needed); returns its client_state."""
        self.wait_saved()
        path = os.path.join(directory, ENGINE_STATE)
        if not os.path.exists(path) or not os.path.isdir(os.path.join(directory, DCP_DIR)):
            raise CheckpointError(f"{directory}: no native checkpoint ({DCP_DIR}/ and {ENGINE_STATE}) to load")
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self._state_options)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=os.path.join(directory, DCP_DIR))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self._state_options)
        extra = torch.load(path, weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        return extra["client_state"]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        keep = self.dims.tp_rank == 0 and self.dims.dp_rank == 0 and self.dims.cp_rank == 0
        local: dict[str, torch.Tensor] = {}
        for name, param in [*self.model.named_parameters(), *moe_state(self.model).items()]:
            value = param.full_tensor() if isinstance(param, DTensor) else param
            if keep:
                local[name] = value.detach().float().cpu()
        return gather_full_state(local)

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor], step: int | None = None) -> None:
        for name, param in self.model.named_parameters():
            if name not in state and is_adapter(name):
                continue  # a model's weights without adapters (a LoRA run's base): the adapters stay as they are
            value = state[name].to(self.device, param.dtype)
            if isinstance(param, DTensor):
                value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(value)
        for name, buffer in moe_state(self.model).items():
            if name in state:  # a Hugging Face model has no aux-free bias: it stays at zero
                buffer.copy_(state[name])
        self.optimizer.state.clear()
        if step is not None:
            set_schedule_step(self.scheduler, step)


def _passed_through(loss: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The schedule's loss when the last stage's forward has computed it, [1] (`parallel.loss_chunks`)."""
    return loss.squeeze(0)
