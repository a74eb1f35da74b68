"""FP8 training through torchao: the blocks' linear layers run their three matmuls (forward, grad-input, grad-weight)
in float8 with dynamic scales, everything else stays as the precision setting says.

Recipes are torchao's: `tensorwise` (one scale per tensor; the fastest, and under FSDP the weights are all-gathered
already in float8, halving that traffic) and `rowwise` (one scale per row of each operand; more robust to outliers,
a little slower). The lm_head stays in bf16 (its logits feed the loss directly, the usual choice), and so does any
linear whose sides are not multiples of 16 (the float8 GEMM's tile constraint). In MoE layers the router stays in
bf16 (it chooses experts: its precision decides where tokens go) and so do the routed experts (3-D parameters of
grouped GEMMs, not linear layers); the shared experts are plain linears and convert.

Converted before any other technique, on the meta device, like torchtitan's model converters: tensor parallelism is
refused at validation (its plans would need torchao's float8 variants), compile and checkpointing wrap the converted
modules, and FSDP shards their weights (with float8 all-gather for tensorwise).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from parallel.model import ModelDims

RECIPES = ("tensorwise", "rowwise")


# At import torchao logs that its kernels built for other GPUs did not load, and torch that torchao registers an enum
# the old way: FP8 training uses neither, so both lines are noise in a training log.
_NOISY_AT_IMPORT = ("torchao", "torch.utils._pytree")


def _torchao_float8():
    loggers = [logging.getLogger(name) for name in _NOISY_AT_IMPORT]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.float8 as float8
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    return float8


def convertible(module: nn.Module, name: str) -> bool:
    """Whether a linear layer gets float8 matmuls: every block linear whose sides are multiples of 16, but an MoE
    router (`mlp.gate`)."""
    return isinstance(module, nn.Linear) and _fits(module.in_features, module.out_features) \
        and not name.endswith("mlp.gate")


def _fits(in_features: int, out_features: int) -> bool:
    return in_features % 16 == 0 and out_features % 16 == 0


def float8_flops_per_token(dims: ModelDims) -> int:
    """Training FLOPs per token that run as float8 GEMMs: 6 × the weights of the block linears `convertible` takes.
    The rest of `ModelDims.flops_per_token` (the lm_head, attention's QK^T and AV, an MoE layer's router and routed
    experts) stays in bf16."""
    q, kv = dims.n_heads * dims.head_dim, dims.n_kv_heads * dims.head_dim
    d = dims.dim
    total = 0
    for layer in range(dims.n_layers):
        moe = dims.moe if dims.is_moe(layer) else None
        f = dims.ffn_dim if moe is None else moe.num_shared_experts * moe.ffn_dim
        shapes = ((d, q), (d, kv), (d, kv), (q, d)) + (((d, f), (d, f), (f, d)) if f else ())
        total += sum(i * o for i, o in shapes if _fits(i, o))
    return 6 * total


def apply_float8(blocks: Iterable[nn.Module], recipe: str, fsdp: bool, emulate: bool) -> None:
    """Swap the linears of `blocks` for torchao's Float8Linear in place.

    `fsdp`: the weights will be sharded by FSDP2, so tensorwise all-gathers them in float8. `emulate`: run the
    float8 GEMMs as casts around higher-precision matmuls, for devices without float8 GEMMs (CPUs): the numbers
    are float8's, the speed is not.
    """
    float8 = _torchao_float8()
    if recipe == "rowwise":
        import torch._inductor.config

        # Inductor otherwise fuses rowwise scaling's casts at a higher precision than eager rounds them
        # (pytorch/pytorch#150859), and compiled and eager float8 runs drift apart.
        torch._inductor.config.emulate_precision_casts = True
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    config = dataclasses.replace(config, emulate=emulate,
                                 enable_fsdp_float8_all_gather=fsdp and recipe == "tensorwise")
    for block in blocks:
        float8.convert_to_float8_training(block, config=config, module_filter_fn=convertible)


def after_optimizer_step(model: nn.Module, recipe: str, fsdp: bool) -> None:
    """Under FSDP with float8 all-gather, compute every weight's scale in one all-reduce for the next step's
    all-gathers instead of one per weight as it is gathered (torchao's recommended step)."""
    if fsdp and recipe == "tensorwise":
        _torchao_float8().precompute_float8_dynamic_scale_for_fsdp(model)
