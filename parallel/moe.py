"""Mixture of experts: the MLP of an MoE layer replaced by a router and many small SwiGLU experts, each token sent to
its `top_k` experts (token choice: Switch, Mixtral, DeepSeek-V3, Qwen3-MoE).

    MoE.forward(x [batch, seq, dim]):
      route    scores = softmax|sigmoid(gate(x)) in fp32; the top_k experts chosen by scores + expert_bias (the
               bias only chooses, DeepSeek-V3); the chosen scores, renormalised or not, weight the outputs
      sort     each token's copies grouped by expert (expert 0's first) and counted; past an expert's capacity the
               copies are dropped (zero output) and counted
      experts  `self.experts(x_sorted, counts)`: the one seam; expert parallelism wraps this call (all-to-all to
               the ranks owning the experts and back) and nothing else
      combine  each token's weighted expert outputs summed in fp32, plus the shared experts' output
      balance  the balancing loss and the router z-loss join the backward through `AddAuxiliaryLoss` (an
               identity on the output), so engines, pipeline schedules and loss functions need no change

Dropless by default: every token reaches its experts, and with `torch._grouped_mm` (CUDA) the whole forward runs
without a host sync. Two balancing methods, alone or together: the auxiliary loss coef·Σ_i f_i·P_i (f: the share of
token copies routed to expert i times E/top_k, P: its mean normalised score), per sequence or per micro-batch; and the
auxiliary-loss-free bias, moved by `update_expert_bias` after each optimizer step by ±bias_update_rate toward the
less loaded experts, from the step's counts summed over the data-parallel ranks.

Parameter names are Hugging Face's where they exist (`mlp.gate.weight`, `mlp.shared_experts.*`); the routed experts
are stacked into 3-D parameters (`mlp.experts.gate_proj` [E, ffn, dim], `up_proj` [E, ffn, dim], `down_proj`
[E, dim, ffn]) so one grouped GEMM serves all experts and expert parallelism shards them on dim 0.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from orchestrator.spec import MoEConfig


@dataclass(frozen=True)
class MoEDims:
    """`model.moe` with the expert width resolved (`ModelDims.moe`)."""

    num_experts: int
    top_k: int
    ffn_dim: int  # one expert's hidden size
    num_shared_experts: int = 0
    every_n_layers: int = 1
    first_dense_layers: int = 0
    score: str = "softmax"
    norm_topk: bool = True
    balance: str = "aux_free"
    aux_loss_coef: float = 1e-3
    aux_loss_per: str = "sequence"
    bias_update_rate: float = 1e-3
    capacity_factor: float = 0.0
    router_z_loss_coef: float = 0.0

    @classmethod
    def from_config(cls, config: MoEConfig, ffn_dim: int) -> MoEDims | None:
        """None for a dense model (num_experts 0); `ffn_dim` is the model's, an expert's when expert_ffn_dim is
        unset."""
        if not config.num_experts:
            return None
        return cls(num_experts=config.num_experts, top_k=config.top_k, ffn_dim=config.expert_ffn_dim or ffn_dim,
                   num_shared_experts=config.num_shared_experts, every_n_layers=config.every_n_layers,
                   first_dense_layers=config.first_dense_layers, score=config.score, norm_topk=config.norm_topk,
                   balance=config.balance, aux_loss_coef=config.aux_loss_coef, aux_loss_per=config.aux_loss_per,
                   bias_update_rate=config.bias_update_rate, capacity_factor=config.capacity_factor,
                   router_z_loss_coef=config.router_z_loss_coef)

    def is_moe(self, layer: int) -> bool:
        """Whether layer `layer` (from 0) has experts: past the first dense layers, every every_n_layers-th."""
        return layer >= self.first_dense_layers and (layer + 1) % self.every_n_layers == 0

    @property
    def uses_bias(self) -> bool:
        return self.balance != "aux_loss"

    @property
    def uses_aux_loss(self) -> bool:
        return self.balance != "aux_free"

    def capacity(self, tokens: int) -> int:
        """Copies an expert takes from a forward of `tokens` tokens: capacity_factor × the even share."""
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)


def gated(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) · up: SwiGLU (silu) or GeGLU (gelu_tanh), the MLP's and every expert's hidden activation."""
    act = F.gelu(gate, approximate="tanh") if activation == "gelu_tanh" else F.silu(gate)
    return act * up


def _local(weight: torch.Tensor) -> torch.Tensor:
    """A DTensor parameter's local shard (expert parallelism's experts on this rank), a plain tensor as it is. An
    isinstance test, which torch.compile traces; a hasattr test on a DTensor came out False inside the compiled
    graph, and the DTensor then reached `_grouped_mm` (`tests/parallel/test_moe.py` holds the compiled path)."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


class GroupedExperts(nn.Module):
    """E SwiGLU experts as three 3-D parameters, applied to tokens already grouped by expert.

    `forward(x_sorted [T, dim], counts [E] int)`: the first counts[0] rows go through expert 0, the next counts[1]
    through expert 1, … On CUDA one `torch._grouped_mm` per projection runs every expert at once (no host sync);
    elsewhere a loop of per-expert matmuls, which gives the same numbers (the tests hold both to a per-token
    reference). `grouped_mm` forces either path (None: by device).
    """

    def __init__(self, num_experts: int, dim: int, ffn_dim: int, activation: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))
        self.activation = activation
        self.grouped_mm: bool | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default per expert, U(±1/sqrt(fan_in)), as the dense layers get on construction: a model
        built on a real device and run before `init_weights` must not compute with uninitialised memory (NaN there
        sends every token to the same experts)."""
        for weight in (self.gate_proj, self.up_proj, self.down_proj):
            bound = weight.shape[-1] ** -0.5
            weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gate, up, down = _local(self.gate_proj), _local(self.up_proj), _local(self.down_proj)
        grouped = self.grouped_mm if self.grouped_mm is not None else x.is_cuda and hasattr(torch, "_grouped_mm")
        if grouped:
            return self._grouped(x, counts, gate, up, down)
        return self._looped(x, counts, gate, up, down)

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                 down: torch.Tensor) -> torch.Tensor:
        # _grouped_mm is not an autocast op: cast by hand to what autocast would compute in (its fast kernel is
        # bf16's). The offsets are the cumulative counts, read on the device.
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        x = x.to(dtype)

        def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch._grouped_mm(a, w.to(dtype).transpose(-2, -1), offs=offsets)

        return mm(gated(mm(x, gate), mm(x, up), self.activation), down)

    def _looped(self, x: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
        outputs = []
        for e, rows in enumerate(torch.split(x, counts.tolist())):
            hidden = gated(F.linear(rows, gate[e]), F.linear(rows, up[e]), self.activation)
            outputs.append(F.linear(hidden, down[e]))
        return torch.cat(outputs)


class AddAuxiliaryLoss(torch.autograd.Function):
    """The identity on `x` whose backward also starts `loss`'s gradient at `scale` (DeepSeek's AddAuxiliaryLoss):
    the balancing loss trains the router without being added to the loss anyone computes or reports.

    `scale` is what the engine divides each micro-batch's loss by (1/grad_accum), so that the balancing loss is
    averaged over micro-batches as the language-model loss is."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.loss_like = (loss.shape, loss.dtype, loss.device)
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        shape, dtype, device = ctx.loss_like
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class Routing(NamedTuple):
    """One forward's routing of T tokens: experts [T, top_k] chosen, weights [T, top_k] of their outputs,
    probabilities [T, E] (scores normalised per token) and logits [T, E] of the router, in fp32."""

    experts: torch.Tensor
    weights: torch.Tensor
    probabilities: torch.Tensor
    logits: torch.Tensor


# (name, shape from E, persistent) of each MoE buffer, in the order `MoE.statistics` concatenates them.
BUFFERS = (("expert_bias", lambda e: (e,), True), ("tokens_per_expert", lambda e: (e,), False),
           ("dropped_per_expert", lambda e: (e,), False), ("entropy_sum", lambda e: (), False),
           ("balance_sum", lambda e: (), False), ("forwards", lambda e: (), False))


class MoE(nn.Module):
    """The MLP of an MoE layer (`Block.mlp`): router `gate`, routed `experts`, optional `shared_experts`.

    Buffers: `expert_bias` [E] (persistent: a resume routes as the uninterrupted run would) and the routing
    statistics since the last `update_expert_bias` (not saved): `tokens_per_expert` [E] (token copies routed to each
    expert, before capacity), `dropped_per_expert` [E], `entropy_sum` (router entropy summed over tokens) and
    `balance_sum` (the unweighted balancing loss summed over forwards), with `forwards`. They count training forwards
    only: not forwards without gradients (evaluation, generation), activation checkpointing's recomputation, or
    forwards run `uncounted`.
    """

    def __init__(self, dim: int, moe: MoEDims, activation: str = "silu", shared: nn.Module | None = None):
        super().__init__()
        self.moe = moe
        self.gate = nn.Linear(dim, moe.num_experts, bias=False)
        self.experts = GroupedExperts(moe.num_experts, dim, moe.ffn_dim, activation)
        self.shared_experts = shared
        for name, shape, persistent in BUFFERS:
            self.register_buffer(name, torch.zeros(shape(moe.num_experts)), persistent=persistent)
        self.aux_grad_scale = 1.0
        self.counting = True  # off inside `uncounted`
        self.sequence_group: dist.ProcessGroup | None = None  # context parallelism: the ranks holding the same rows
        self.last_step: torch.Tensor | None = None  # the statistics `update_expert_bias` closed, reduced over ranks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        routing = self.route(flat)
        k, tokens = self.moe.top_k, flat.shape[0]
        choices = routing.experts.flatten()  # token t's j-th choice at t·k + j
        order = torch.argsort(choices, stable=True)
        # A histogram of fixed size (bincount's output size depends on the data, a graph break under compile).
        counts = torch.zeros(self.moe.num_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, choices, torch.ones_like(choices))
        kept, routed = order, counts
        if self.moe.capacity_factor:
            capacity = self.moe.capacity(tokens)
            # A copy's place in its expert's queue (token order, as Switch): past the capacity it is dropped.
            place = torch.arange(len(order), device=x.device) - (torch.cumsum(counts, 0) - counts)[choices[order]]
            kept, routed = order[place < capacity], counts.clamp(max=capacity)
        out = self.experts(flat[kept // k], routed)
        weighted = out.float() * routing.weights.flatten()[kept, None]
        combined = weighted.new_zeros(tokens * k, dim).index_copy(0, kept, weighted)
        y = combined.view(tokens, k, dim).sum(1).to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        y = y.view(batch, seq, dim)
        if not torch.is_grad_enabled():
            return y
        balance = self.balance_loss(routing, batch)
        self._record(counts, counts - routed, routing.probabilities, balance)
        aux = self.moe.aux_loss_coef * balance if self.moe.uses_aux_loss else None
        if self.moe.router_z_loss_coef:
            z = self.moe.router_z_loss_coef * torch.logsumexp(routing.logits, -1).square().mean()
            aux = z if aux is None else aux + z
        return y if aux is None else AddAuxiliaryLoss.apply(y, aux, self.aux_grad_scale)

    def route(self, x: torch.Tensor) -> Routing:
        """Choose each token's experts (by score + bias) and weigh them (by score); in fp32, outside autocast, so
        near-ties are decided the same way in every precision setting."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())
        scores = logits.softmax(-1) if self.moe.score == "softmax" else logits.sigmoid()
        choice = scores + self.expert_bias if self.moe.uses_bias else scores
        experts = choice.topk(self.moe.top_k, dim=-1).indices
        weights = scores.gather(-1, experts)
        if self.moe.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        probabilities = scores if self.moe.score == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)
        return Routing(experts, weights, probabilities, logits)

    def balance_loss(self, routing: Routing, batch: int) -> torch.Tensor:
        """Σ_i f_i·P_i averaged over groups of tokens (each sequence, or the whole micro-batch): f_i the share of
        the group's token copies routed to expert i times E/top_k, P_i expert i's mean probability. 1 when the
        load is even, up to E when one expert takes everything; only P carries a gradient.

        Under context parallelism a rank holds 1/cp of each row: f is taken over the whole rows (its counts summed
        over `sequence_group`), P over this rank's tokens, so the loss is linear in them and its gradients, averaged
        over the cp ranks as every gradient is, are the whole rows' loss's."""
        n = self.moe.num_experts
        groups = batch if self.moe.aux_loss_per == "sequence" else 1
        experts = routing.experts.view(groups, -1)
        counts = torch.zeros(groups, n, device=experts.device).scatter_add_(
            1, experts, torch.ones_like(experts, dtype=torch.float32))
        copies = experts.shape[1]
        if self.sequence_group is not None:
            dist.all_reduce(counts, group=self.sequence_group)
            copies *= dist.get_world_size(self.sequence_group)
        share = counts * n / copies
        mean_probability = routing.probabilities.view(groups, -1, n).mean(1)
        return (share * mean_probability).sum(1).mean()

    @torch.no_grad()
    def _record(self, counts: torch.Tensor, dropped: torch.Tensor, probabilities: torch.Tensor,
                balance: torch.Tensor) -> None:
        # Eager non-reentrant activation checkpointing reruns this forward inside the backward (a graph task is then
        # running): the tokens were counted the first time. Compiled, the updates are traced into the block's graph
        # (a graph break here would leave a checkpointed block uncompiled altogether) and checkpointing's
        # recomputation does not replay them.
        if not self.counting or (not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1):
            return
        self.tokens_per_expert += counts
        self.dropped_per_expert += dropped
        self.entropy_sum -= (probabilities * probabilities.clamp_min(1e-20).log()).sum()
        self.balance_sum += balance.detach()
        self.forwards += 1

    def statistics(self) -> torch.Tensor:
        """The routing statistics since the last reset as one vector (what `update_expert_bias` all-reduces)."""
        return torch.cat([getattr(self, name).flatten() for name, _, persistent in BUFFERS if not persistent])

    @torch.no_grad()
    def reset_statistics(self) -> None:
        for name, _, persistent in BUFFERS:
            if not persistent:
                getattr(self, name).zero_()


def moe_layers(model: nn.Module) -> list[tuple[int, MoE]]:
    """(layer index, MoE) of every MoE layer `model` holds (a pipeline stage's only), by layer."""
    found = []
    for name, module in model.named_modules():
        match = re.search(r"layers\.(\d+)\.mlp$", name)
        if match and isinstance(module, MoE):
            found.append((int(match.group(1)), module))
    return sorted(found, key=lambda item: item[0])


@torch.no_grad()
def materialize_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Give every MoE buffer its starting value (zeros) on `device`: after `to_empty` or on a model built on meta,
    whose buffers hold no numbers yet."""
    for _, moe in moe_layers(model):
        for name, shape, _ in BUFFERS:
            setattr(moe, name, torch.zeros(shape(moe.moe.num_experts), device=device))


def moe_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent MoE buffers under their model names (`layers.3.mlp.expert_bias`): what a full state dict
    holds beside the parameters."""
    return {f"layers.{i}.mlp.{name}": getattr(moe, name)
            for i, moe in moe_layers(model) for name, _, persistent in BUFFERS if persistent}


@contextlib.contextmanager
def uncounted(model: nn.Module) -> Iterator[None]:
    """Forwards of `model` inside this block leave the routing statistics alone (a pipeline stage's shape
    inference, which runs a first micro-batch, or empty tensors, through the stage before the schedule starts)."""
    layers = [moe for _, moe in moe_layers(model)]
    for moe in layers:
        moe.counting = False
    try:
        yield
    finally:
        for moe in layers:
            moe.counting = True


def set_sequence_group(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """The context-parallel group whose ranks hold the other chunks of this rank's rows (None: whole rows here), for
    the balancing loss's per-row (or per-micro-batch) counts."""
    for _, moe in moe_layers(model):
        moe.sequence_group = group


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """The factor each micro-batch's loss is scaled by before its backward (1/grad_accum), for `AddAuxiliaryLoss`."""
    for _, moe in moe_layers(model):
        moe.aux_grad_scale = scale


@torch.no_grad()
def update_expert_bias(model: nn.Module, group: dist.ProcessGroup | None, update: bool = True) -> None:
    """Close a step's routing: sum every MoE layer's statistics over `group` (the ranks that saw the step's other
    tokens: data parallel × context parallel; None: this process alone) in one all-reduce, keep them for
    `routing_stats`, move the aux-free bias of each layer (with `update`, and a balance method that uses it) and
    reset the statistics.

    The bias moves by bias_update_rate·sign(mean load − load), centred to sum to zero (DeepSeek-V3; torchtitan
    centres it the same way): overloaded experts become less likely to be chosen. The counts are identical on every
    rank after the all-reduce, so is the bias.
    """
    layers = moe_layers(model)
    if not layers:
        return
    sums = torch.stack([moe.statistics() for _, moe in layers])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
    for (_, moe), row in zip(layers, sums, strict=True):
        moe.last_step = row
        load = row[:moe.moe.num_experts]
        if update and moe.moe.uses_bias and load.sum() > 0:
            delta = moe.moe.bias_update_rate * torch.sign(load.mean() - load)
            moe.expert_bias += delta - delta.mean()
        moe.reset_statistics()


@dataclass(frozen=True)
class LayerRouting:
    """One MoE layer's routing over the last step (summed over the data-parallel ranks)."""

    layer: int
    tokens_per_expert: tuple[float, ...]  # token copies routed to each expert, before capacity
    dropped_tokens: float  # copies dropped at capacity
    router_entropy: float  # mean entropy of a token's expert probabilities, in nats (ln E: uniform)
    aux_loss: float  # the balancing loss Σ f·P, unweighted (1: even load, E: one expert takes all), mean of forwards

    @property
    def max_load(self) -> float:
        return max(self.tokens_per_expert)

    @property
    def mean_load(self) -> float:
        return sum(self.tokens_per_expert) / len(self.tokens_per_expert)


def routing_stats(model: nn.Module) -> list[LayerRouting]:
    """Every MoE layer's routing of the step `update_expert_bias` last closed (before any: what was counted since
    the start); one host sync for all layers."""
    layers = moe_layers(model)
    if not layers:
        return []
    rows = torch.stack([moe.last_step if moe.last_step is not None else moe.statistics() for _, moe in layers])
    out = []
    for (layer, moe), row in zip(layers, rows.cpu().tolist(), strict=True):
        n = moe.moe.num_experts
        load, dropped = row[:n], row[n:2 * n]
        entropy, balance, forwards = row[2 * n:]
        tokens = sum(load) / moe.moe.top_k
        out.append(LayerRouting(layer, tuple(load), sum(dropped), entropy / tokens if tokens else 0.0,
                                balance / forwards if forwards else 0.0))
    return out
