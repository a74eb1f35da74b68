"""LoRA (Hu et al., 2021): the model's weights frozen, a trained low-rank update beside each targeted projection.

    apply_lora(model, spec.model.lora)     # on the meta-device model, first in `parallel.parallelize`'s order
    freeze_base(model)                      # after tensor parallelism, whose plans replace parameters

A targeted `nn.Linear` (q/k/v/o_proj, gate/up/down_proj, as `model.lora.targets` names them) becomes a `LoraLinear`:
the same module class family (still an `nn.Linear`, so tensor-parallel plans and FSDP treat it as one), the same
`weight` and `bias` under the same names, and two adapters beside them, `lora_A` (rank × in) and `lora_B`
(out × rank), computing W·x + b + (alpha/rank)·B·A·dropout(x) as PEFT's `lora.Linear` does. Parameter names are
PEFT's without its prefix (`layers.0.self_attn.q_proj.lora_A.weight`), so an adapter exports by renaming
(`parallel.lora_export`). The model definition (`parallel.model`) does not change.

A starts as PEFT's (Kaiming-uniform, bound 1/sqrt(in)) and B at zero, so training starts from the imported model
exactly; each draws from its own generator seeded by (seed, name), as `init_parameter` does, so every layout starts
from the same adapters.

Under tensor parallelism the adapters are split like their projection (`lora_tp_plan`): a column-parallel projection
(q/k/v, gate/up: output features split) keeps A whole and splits B's rows with the weight's, so B·(A·x) is this
rank's slice of the output; a row-parallel one (o_proj, down_proj: input features split) splits A's columns with the
weight's and keeps B whole, so its output is a partial sum reduced with the projection's. DTensor derives the
gradients' reductions (A's over the column-parallel ranks, B's over the row-parallel ones).
"""

from __future__ import annotations

import logging
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.distributed.tensor.parallel.style import ParallelStyle

from orchestrator.spec import LORA_TARGETS, LoraConfig
from parallel.model import ModelDims, init_parameter

log = logging.getLogger(__name__)
ADAPTERS = ("lora_A", "lora_B")


def target_names(config: LoraConfig) -> list[str]:
    """The projections `model.lora.targets` names, in the model's order (validation refuses unknown ones)."""
    wanted = {t.strip() for t in config.targets.split(",") if t.strip()}
    return [t for t in LORA_TARGETS if t in wanted]


def is_adapter(name: str) -> bool:
    """Whether parameter `name` is an adapter's (`...q_proj.lora_A.weight`) rather than the model's."""
    return any(f".{a}." in f".{name}" for a in ADAPTERS)


class LoraLinear(nn.Linear):
    """A frozen linear layer with a trained low-rank update: W·x + b + scaling·B·A·dropout(x)."""

    def __init__(self, base: nn.Linear, config: LoraConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, config.rank, bias=False, device=device)
        self.lora_B = nn.Linear(config.rank, base.out_features, bias=False, device=device)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.scaling = config.alpha / config.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def apply_lora(model: nn.Module, config: LoraConfig, init_from: str = "") -> None:
    """Put adapters on the targeted projections of every block of `model` (on any device, meta included)."""
    if not init_from:
        log.warning("model.lora.rank=%d without checkpoint.init_from: the adapters train on top of randomly "
                    "initialised, frozen weights", config.rank)
    targets = set(target_names(config))
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if name in targets and type(child) is nn.Linear:
                    setattr(parent, name, LoraLinear(child, config))


def freeze_base(model: nn.Module) -> None:
    """Only the adapters train: the model's own parameters get no gradients and so no optimizer state."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))


def initial_value(name: str, shape: tuple[int, ...], dims: ModelDims, seed: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """`init_parameter` for the model's parameters; for adapters, A as PEFT draws it (Kaiming-uniform with a=√5:
    U(±1/sqrt(in))) from a generator seeded by (seed, name), B zero."""
    if not is_adapter(name):
        return init_parameter(name, shape, dims, seed, device)
    if ".lora_B." in f".{name}":
        return torch.zeros(shape, device=device)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1 / math.sqrt(shape[1])
    return torch.empty(shape, device=device).uniform_(-bound, bound, generator=generator)


def _shard(module: nn.Module, name: str, placement: Shard, mesh) -> None:
    param = getattr(module, name)
    if param is not None:
        module.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [placement], src_data_rank=None),
                                                     requires_grad=param.requires_grad))


class LoraColwise(ColwiseParallel):
    """ColwiseParallel for a `LoraLinear`: weight, bias and B split over output features, A replicated."""

    def _partition_linear_fn(self, name, module, device_mesh):
        if name:  # distribute_module visits the adapters too; the root placed them, the rest is replicated
            return
        for target, param in ((module, "weight"), (module, "bias"), (module.lora_B, "weight")):
            _shard(target, param, Shard(0), device_mesh)


class LoraRowwise(RowwiseParallel):
    """RowwiseParallel for a `LoraLinear`: weight and A split over input features, bias and B replicated."""

    def _partition_linear_fn(self, name, module, device_mesh):
        if name:
            return
        super()._partition_linear_fn(name, module, device_mesh)
        _shard(module.lora_A, "weight", Shard(1), device_mesh)


def lora_tp_plan(block: nn.Module, plan: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    """`plan` with each adapted projection's column- or row-wise style made its LoRA variant (same layouts)."""
    out = dict(plan)
    for name, style in plan.items():
        if not isinstance(block.get_submodule(name), LoraLinear):
            continue
        layouts = dict(input_layouts=style.input_layouts[0], output_layouts=style.output_layouts[0],
                       use_local_output=style.use_local_output)
        out[name] = LoraColwise(**layouts) if isinstance(style, ColwiseParallel) else LoraRowwise(**layouts)
    return out
