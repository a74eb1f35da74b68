"""`pretrain plan job.yaml [section.key=value ...] [--gpus 64] [--gpu-mem 80GiB] [--gpus-per-node 8]`

Prints the model's size and FLOPs, its compute-optimal token budget, the memory breakdown of the spec's own layout,
and the fastest layouts that fit the GPUs given (the spec's resources by default), with why the first one won.
A model that fits nowhere exits with code 2 and says by how much and what would make it fit.
"""

from __future__ import annotations

import argparse
import dataclasses

from orchestrator.sizes import GiB, parse_size


def parse_gpu_mem(text: str) -> int:
    """--gpu-mem: '80GiB', '80GB', '81920MiB', '80G' (binary) or a bare number of GiB → bytes."""
    return parse_size(text, "--gpu-mem", bare=GiB, what="a memory size", examples="80GiB, 80GB or 81920MiB")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="job spec YAML")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--gpus", type=int, help="GPUs to plan for (default: the spec's resources)")
    parser.add_argument("--gpu-mem", default="80GiB", help="memory per GPU, e.g. 80GiB or 141GB (default 80GiB)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the spec's resources)")
    parser.add_argument("--mfu", type=float, default=0.40, help="fraction of peak FLOP/s the matmuls reach (0.40)")
    parser.add_argument("--global-batch", type=int, help="sequences per step (default: the spec's)")
    parser.add_argument("--top", type=int, default=10, help="layouts to list (10)")


def run(args: argparse.Namespace) -> int:
    from orchestrator.planner.layout import choose_layout
    from orchestrator.validate import load_spec

    spec = load_spec(args.spec, args.overrides)
    gpus = args.gpus or spec.world_size
    per_node = args.gpus_per_node or (spec.resources.gpus_per_node if args.gpus is None else min(gpus, 8))
    mem = parse_gpu_mem(args.gpu_mem)
    print_model(spec)
    print_spec_layout(spec, gpus, per_node, mem)
    plan = choose_layout(spec, gpus, mem, per_node, mfu=args.mfu, global_batch_size=args.global_batch)
    print_table(plan, args.top)
    return 0


def print_model(spec) -> None:
    from orchestrator.planner.counting import count_params, flops_per_token, lora_params
    from orchestrator.planner.scaling import TOKENS_PER_PARAM

    count = count_params(spec.model)
    flops = flops_per_token(spec.model, spec.data.seq_len)
    optimal_tokens = TOKENS_PER_PARAM * count.total
    m = spec.model
    preset = f" ({' '.join(filter(None, (m.family, m.size)))})" if m.family != "custom" else ""
    print(f"{spec.name}{preset}: {_n(count.total)} parameters (embedding {_n(count.embedding)}, {count.n_layers} "
          f"blocks × {_n(count.per_layer)}, output {_n(count.output) if count.output else 'tied'}); "
          f"{flops / 1e9:.3g} GFLOP per training token at seq_len {spec.data.seq_len}")
    print(f"compute-optimal data (Chinchilla, 20 tokens per parameter): {_n(optimal_tokens)} tokens, "
          f"{flops * optimal_tokens:.3g} FLOPs")
    if m.lora.rank:
        trained = lora_params(m)[0]
        print(f"LoRA rank {m.lora.rank} (alpha {m.lora.alpha:g}) on {m.lora.targets}: {_n(trained)} trainable "
              f"parameters, {100 * trained / count.total:.2g}% of the model; the rest frozen, with no gradients or "
              "optimizer state")


def print_spec_layout(spec, gpus: int, per_node: int, mem: int) -> None:
    from orchestrator.planner.layout import Hardware, describe, with_layout
    from orchestrator.planner.memory import GiB, estimate_memory
    from orchestrator.validate import cross_field_problems

    p = spec.parallel
    hw = Hardware(gpus=gpus, gpu_mem_bytes=mem, gpus_per_node=per_node)
    if gpus % (p.pp * p.tp):
        print(f"\nthe spec's layout (pp={p.pp} × tp={p.tp}) does not divide {gpus} GPUs")
        return
    dp = gpus // (p.pp * p.tp)
    ga = max(1, p.global_batch_size // (dp * p.micro_batch_size))
    layout = dataclasses.replace(p, dp=dp, grad_accum=ga, global_batch_size=dp * ga * p.micro_batch_size)
    own = with_layout(spec, layout, hw)
    memory = estimate_memory(own)
    print(f"\nthe spec's layout on {gpus} GPUs: {describe(own.parallel)}")
    for name, size in memory.rows():
        print(f"  {name:<26}{size / GiB:>9.2f} GiB")
    verdict = "fits" if memory.total <= mem else f"does NOT fit ({(memory.total - mem) / GiB:.1f} GiB over)"
    print(f"  {verdict} in {mem / GiB:.1f} GiB (pipeline stage {memory.stage} is the fullest)")
    for problem in cross_field_problems(own):
        print(f"  breaks a rule: {problem}")


def print_table(plan, top: int) -> None:
    from orchestrator.planner.memory import GiB

    hw = plan.hardware
    print(f"\nfastest layouts for {hw.gpus} GPUs × {hw.gpu_mem_bytes / GiB:.0f} GiB ({hw.node_size} per node), "
          f"MFU {hw.mfu:.2f} of {hw.peak_flops / 1e12:.0f} TFLOP/s:")
    header = ("#", "dp", "pp", "tp", "ZeRO", "micro", "accum", "ckpt", "mem GiB", "step s", "tokens/s", "MFU")
    rows = [header]
    for i, c in enumerate(plan.ranked[:top], 1):
        p = c.parallel
        rows.append((str(i), str(p.dp), str(p.pp), str(p.tp), str(p.zero_stage), str(p.micro_batch_size),
                     str(p.grad_accum), p.activation_checkpointing, f"{c.memory.total / GiB:.1f}",
                     f"{c.step.total:.3g}", f"{c.tokens_per_second:,.0f}", f"{c.mfu(hw):.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  " + "  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)))
    print()
    for line in plan.explanation:
        print(line)


def _n(count: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return str(int(count))
