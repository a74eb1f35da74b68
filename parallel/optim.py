"""AdamW with the usual decay exemptions, and the learning-rate schedules of the spec.

Both are backend-neutral: DeepSpeed receives the optimizer and scheduler built here as client objects, so the
numbers don't depend on the engine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from orchestrator.spec import OptimConfig, ScheduleConfig
from parallel.mup import is_hidden_matrix


def build_param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                       hidden_lr_scale: float | None = None) -> list[dict]:
    """Decay only matrices that multiply activations; norms (1-D) and embeddings stay undecayed, as in Llama/OLMo.

    A tied lm_head is the embedding and therefore undecayed too. With `hidden_lr_scale` (μP, `parallel.mup`) the
    hidden matrices get a group of their own whose `lr_scale` multiplies the learning rate (`build_optimizer`), and
    LambdaLR's schedule multiplies each group's own; that group comes last, so `param_groups[0]` carries the spec's
    learning rate (what the engines report). Without it: one group per decay rate.
    """
    decay, no_decay, hidden = [], [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "embed_tokens" in name:
            no_decay.append(param)
        elif hidden_lr_scale is not None and is_hidden_matrix(name, param.ndim):
            hidden.append(param)
        else:
            decay.append(param)
    kinds = [(decay, weight_decay, None), (no_decay, 0.0, None)]
    if hidden_lr_scale is not None:
        kinds = [(no_decay, 0.0, None), (decay, weight_decay, None), (hidden, weight_decay, hidden_lr_scale)]
    groups = []
    for params, decay_rate, lr_scale in kinds:
        # foreach and fused AdamW update a group in one call, which can't mix DTensor (tensor-parallel) parameters
        # with plain ones: such a group is split in two, DTensors first.
        dtensors = [p for p in params if isinstance(p, DTensor)]
        plain = [p for p in params if not isinstance(p, DTensor)]
        parts = [dtensors, plain] if dtensors else [params]
        extra = {} if lr_scale is None else {"lr_scale": lr_scale}
        # DeepSpeed drops empty groups from the optimizer it wraps (behind the scheduler's back): under μP a pipeline
        # stage without the lm_head has none of its group.
        keep_empty = not dtensors and hidden_lr_scale is None
        groups += [{"params": part, "weight_decay": decay_rate, **extra} for part in parts if part or keep_empty]
    return groups


def build_optimizer(param_groups: list[dict], config: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    # The fused CUDA kernel updates every tensor in one launch; on CPU foreach is the fast path.
    fused = device.type == "cuda"
    param_groups = [{**g, "lr": config.lr * g["lr_scale"]} if "lr_scale" in g else g for g in param_groups]
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                             fused=fused, foreach=None if fused else True)


def lr_at(step: int, optim: OptimConfig, schedule: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine, warmup-stable-decay or constant.

    cosine: from lr down to min_lr over the steps after warmup.
    wsd: lr held until the last `decay_fraction` of the steps, then a linear decay to min_lr (MiniCPM, Hägele et al.).
    """
    lr, min_lr, total, warmup = optim.lr, optim.min_lr, schedule.steps, schedule.warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule.lr_schedule == "constant":
        return lr
    if schedule.lr_schedule == "wsd":
        decay_start = wsd_decay_start(total, schedule.decay_fraction)
        if step < decay_start or decay_start == total:
            return lr
        progress = min(1.0, (step - decay_start + 1) / (total - decay_start))
        return lr + (min_lr - lr) * progress
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def wsd_decay_start(steps: int, decay_fraction: float) -> int:
    """The first step (0-based) whose learning rate decays under wsd: round(decay_fraction · steps) steps decay, at
    least one when decay_fraction > 0. A WSD branch (`orchestrator.planner.wsd`) starts from this step's checkpoint."""
    return steps - (max(1, round(decay_fraction * steps)) if decay_fraction > 0 else 0)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig,
                    schedule: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose factor is lr_at / peak lr, so resuming only needs the step count (`last_epoch`)."""
    peak = optim.lr or 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, optim, schedule) / peak)


def set_schedule_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a schedule built by `build_scheduler` where it is after `step` steps, and its learning rates with it."""
    scheduler.last_epoch = step
    lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
