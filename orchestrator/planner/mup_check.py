"""μP's coordinate check: train a few steps at several widths and watch each layer's activation scale.

    rms = coord_check(spec, widths=(64, 128, 256, 512), steps=10)   # {width: {layer: RMS at the last step}}
    plot_coord_check("coord_check.png", {"standard": rms_sp, "mup": rms_mup})

Under a parametrization that transfers (μP) the root-mean-square of every activation (the embedding's output, each
block's output, the logits) stays the same as the model widens, after training as at initialisation; under the
standard one, Adam's updates move each coordinate of a hidden activation by ~lr·fan_in, so they grow with width and
the best learning rate shrinks with it (Yang et al., Tensor Programs V, figure 5). A flat line per layer is what a
correct μP implementation shows; `pretrain sweep` draws it beside the learning-rate transfer.

The probe is a plain single-process loop over the real parts: the model of `parallel.model`, the optimizer groups,
schedule and clipping of `parallel.optim`, and batches from the shards through `parallel.loader`, in fp32 on the CPU
(or the spec's device): quick enough for a test or a planner call, and without the engines' process groups.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from orchestrator.spec import JobSpec


@dataclass
class ProbeResult:
    """One probe run: the training losses, the final validation loss, and per-layer activation RMS at each step."""

    losses: list[float]
    val_loss: float
    rms: list[dict[str, float]] = field(default_factory=list)


def at_width(spec: JobSpec, dim: int, head_dim: int) -> JobSpec:
    """`spec` with its model widened to `dim` (heads of `head_dim`: their count grows, as in a scaling sweep)."""
    model = dataclasses.replace(spec.model, dim=dim, n_heads=dim // head_dim, n_kv_heads=None, head_dim=None,
                                ffn_dim=None)
    return dataclasses.replace(spec, model=model)


def train_probe(spec: JobSpec, steps: int, *, eval_batches: int = 0, record: bool = False) -> ProbeResult:
    """Train `spec`'s model for `steps` steps in this process; `record` keeps each step's activation RMS."""
    from parallel.loader import ShardLoader
    from parallel.model import build_model, cross_entropy
    from parallel.mup import hidden_lr_scale
    from parallel.optim import build_optimizer, build_param_groups, build_scheduler

    device = torch.device("cuda" if spec.resources.device == "cuda" else "cpu")
    model = build_model(spec.model, device)
    model.init_weights(spec.schedule.seed)
    groups = build_param_groups(model.named_parameters(), spec.optim.weight_decay, hidden_lr_scale(model.dims))
    optimizer = build_optimizer(groups, spec.optim, device)
    scheduler = build_scheduler(optimizer, spec.optim, spec.schedule)
    # The shards' checksums are the training runs' to verify: a probe of each width would read every shard again.
    common = dict(seq_len=spec.data.seq_len, micro_batch_size=spec.parallel.micro_batch_size,
                  grad_accum=spec.parallel.grad_accum, seed=spec.data.seed, prefetch=0, verify=False)
    train = ShardLoader(spec.data.path, **common)
    val = ShardLoader(spec.data.path, split="val", shuffle=False, **common) if eval_batches else None
    seen: dict[str, float] = {}
    hooks = _rms_hooks(model, seen) if record else []
    result = ProbeResult(losses=[], val_loss=float("nan"))
    try:
        for _ in range(steps):
            total = 0.0
            for mb in train.next_step():
                loss = cross_entropy(model(mb.inputs.to(device)), mb.targets.to(device)) / spec.parallel.grad_accum
                loss.backward()
                total += loss.item()
            if spec.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            result.losses.append(total)
            if record:
                result.rms.append(dict(seen))
        for hook in hooks:
            hook.remove()
        if val is not None:
            result.val_loss = _evaluate(model, val, eval_batches, device)
    finally:
        train.close()
        if val is not None:
            val.close()
    return result


@torch.no_grad()
def _evaluate(model: torch.nn.Module, loader, batches: int, device: torch.device) -> float:
    from parallel.model import cross_entropy

    loader.rewind()
    losses = [cross_entropy(model(mb.inputs.to(device)), mb.targets.to(device)).item()
              for _ in range(min(batches, loader.steps_per_epoch)) for mb in loader.next_step()]
    return sum(losses) / len(losses)


def _rms_hooks(model: torch.nn.Module, seen: dict[str, float]) -> list:
    """Forward hooks writing RMS of the embedding's output, each block's output and the logits into `seen`."""
    def hook(name: str):
        def record(_module, _inputs, output) -> None:
            seen[name] = float(output.detach().float().pow(2).mean().sqrt())
        return record

    parts = [("embedding", model.embed_tokens)] + [(f"block {i}", block) for i, block in enumerate(model.layers)]
    handles = [module.register_forward_hook(hook(name)) for name, module in parts]
    handles.append(model.register_forward_hook(hook("logits")))
    return handles


def coord_check(spec: JobSpec, widths: Sequence[int], steps: int, head_dim: int) -> dict[int, dict[str, float]]:
    """{width: {layer: activation RMS at the last of `steps` steps}} of `spec` trained at each width, at its peak
    learning rate throughout (no warmup, no decay: the check is about the size of each update)."""
    constant = dataclasses.replace(spec.schedule, steps=steps, warmup_steps=0, lr_schedule="constant")
    spec = dataclasses.replace(spec, schedule=constant)
    return {w: train_probe(at_width(spec, w, head_dim), steps, record=True).rms[-1] for w in widths}


def spread(rms: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Per layer, the largest RMS over the widths divided by the smallest: 1 is perfectly flat."""
    layers = next(iter(rms.values())).keys()
    return {layer: max(r[layer] for r in rms.values()) / min(r[layer] for r in rms.values()) for layer in layers}


def plot_coord_check(path: str | os.PathLike, checks: Mapping[str, Mapping[int, Mapping[str, float]]],
                     title: str = "") -> None:
    """One panel per parametrization: each layer's activation RMS against width, log-log (flat is μP's promise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(checks), figsize=(5.5 * len(checks), 4.2), sharey=True, squeeze=False)
    for ax, (label, rms) in zip(axes[0], checks.items(), strict=True):
        widths = sorted(rms)
        layers = list(rms[widths[0]])
        colors = plt.cm.viridis([i / max(1, len(layers) - 1) * 0.9 for i in range(len(layers))])
        for layer, color in zip(layers, colors, strict=True):
            ax.plot(widths, [rms[w][layer] for w in widths], marker="o", color=color, label=layer)
        worst = max(spread(rms).values())
        ax.set(xscale="log", yscale="log", xlabel="width (model.dim)", title=f"{label}: max/min over widths "
               f"{worst:.2f}×")
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
    axes[0][0].set_ylabel("activation RMS after training")
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

