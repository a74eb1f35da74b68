"""`pretrain plan job.yaml [section.key=value ...] [--gpus 64] [--gpu-mem 80GiB] [--gpus-per-node 8]
[--budget-flops 1e21 | --budget-gpu-hours 5000] [--unique-tokens 25e9]`

Prints the model's size and FLOPs (a mixture of experts' total and active parameters, its FLOPs from the active ones),
its compute-optimal token budget, what repeating the data costs (when the unique
tokens are known: data.path's manifest.json or --unique-tokens) with the best model size and epochs for the spec's
compute or the budget given (`orchestrator.planner.data_constrained`), the memory breakdown of the spec's own layout,
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
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-flops", type=float, help="training FLOPs to plan model size and epochs for "
                        "(default: the spec's own, 6 × parameters × tokens)")
    budget.add_argument("--budget-gpu-hours", type=float, help="... as GPU-hours at --mfu of metrics.peak_flops")
    parser.add_argument("--unique-tokens", type=float, help="unique training tokens (default: data.path's "
                        "manifest.json, each source's tokens before mixing repeated any)")


def run(args: argparse.Namespace) -> int:
    from orchestrator.planner.layout import choose_layout
    from orchestrator.validate import load_spec

    spec = load_spec(args.spec, args.overrides)
    gpus = args.gpus or spec.world_size
    per_node = args.gpus_per_node or (spec.resources.gpus_per_node if args.gpus is None else min(gpus, 8))
    mem = parse_gpu_mem(args.gpu_mem)
    print_model(spec)
    print_data_plan(spec, args)
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
    if m.moe.num_experts:
        print(f"mixture of experts: {count.moe_layers} of {count.n_layers} blocks route each token to {m.moe.top_k} "
              f"of {m.moe.num_experts} experts" + (f" and {m.moe.num_shared_experts} shared" if
                                                   m.moe.num_shared_experts else "")
              + f": {_n(count.active)} active parameters of {_n(count.total)} ({count.active / count.total:.1%}); "
              "the FLOPs above are the active ones'")
    print(f"compute-optimal data (Chinchilla, 20 tokens per parameter): {_n(optimal_tokens)} tokens, "
          f"{flops * optimal_tokens:.3g} FLOPs")
    if m.lora.rank:
        trained = lora_params(m)[0]
        print(f"LoRA rank {m.lora.rank} (alpha {m.lora.alpha:g}) on {m.lora.targets}: {_n(trained)} trainable "
              f"parameters, {100 * trained / count.total:.2g}% of the model; the rest frozen, with no gradients or "
              "optimizer state")


def print_data_plan(spec, args: argparse.Namespace) -> None:
    """The spec's repetition of its unique data and the law's best size and epochs for the budget, with warnings;
    nothing when the unique tokens are unknown and no budget asks for a plan."""
    import math

    from orchestrator.errors import UserError
    from orchestrator.planner import data_constrained as dc
    from orchestrator.planner.counting import count_params
    from orchestrator.planner.scaling import gpu_hours_to_flops

    for flag, value in (("--unique-tokens", args.unique_tokens), ("--budget-flops", args.budget_flops)):
        if value is not None and not 0 < value < math.inf:
            raise UserError(f"{flag}: {value:g} is not a positive finite number")
    unique, source = args.unique_tokens, "--unique-tokens"
    if unique is None:
        unique, source = _manifest_unique_tokens(spec), f"{spec.data.path}/manifest.json"
    budget = args.budget_flops if args.budget_gpu_hours is None else \
        gpu_hours_to_flops(args.budget_gpu_hours, spec.metrics.peak_flops, args.mfu)
    if unique is None:
        if budget is not None:
            raise UserError(f"--budget-{'flops' if args.budget_gpu_hours is None else 'gpu-hours'}: planning epochs "
                            f"needs the unique tokens: {spec.data.path or 'data.path'} has no manifest.json; give "
                            "--unique-tokens")
        return
    p = spec.parallel
    own = dc.allocate(count_params(spec.model).total,
                      spec.schedule.steps * p.micro_batch_size * p.grad_accum * p.dp * spec.data.seq_len, unique)
    flops = budget if budget is not None else 6 * own.params * own.tokens
    plan = dc.plan(flops, unique)
    law = dc.MUENNIGHOFF
    print(f"\ndata-constrained (Muennighoff et al. 2023, R_D* = {law.rd_star:.1f}, R_N* = {law.rn_star:.1f}; losses "
          f"on the paper's C4 fit, for comparing plans): {_n(unique)} unique tokens ({source})")
    for label, a in (("this spec", own), (f"best for {flops:.3g} FLOPs", plan.best),
                     ("Chinchilla, 20 tokens/param", plan.chinchilla)):
        print(f"  {label:<28}{_n(a.params):>7} parameters × {_n(a.tokens):>6} tokens = {a.epochs:6.2f} epochs; "
              f"effective {_n(a.effective_params)} parameters, {_n(a.effective_tokens)} tokens; loss {a.loss:.4f}")
    for line in dc.repetition_warnings(own, "this spec") + plan.warnings:
        print(f"  warning: {line}")


def _manifest_unique_tokens(spec) -> float | None:
    """The unique tokens of data.path's manifest; None where the spec's data is not prepared (yet)."""
    import os

    from dataprep.shards import read_manifest
    from orchestrator.planner.data_constrained import unique_tokens

    if not spec.data.path or "://" in spec.data.path or not os.path.isfile(os.path.join(spec.data.path,
                                                                                        "manifest.json")):
        return None
    return unique_tokens(read_manifest(spec.data.path))


def print_spec_layout(spec, gpus: int, per_node: int, mem: int) -> None:
    from orchestrator.planner.layout import Hardware, describe, with_layout
    from orchestrator.planner.memory import GiB, estimate_memory
    from orchestrator.validate import cross_field_problems

    p = spec.parallel
    hw = Hardware(gpus=gpus, gpu_mem_bytes=mem, gpus_per_node=per_node)
    if gpus % (p.cp * p.pp * p.tp):
        print(f"\nthe spec's layout (cp={p.cp} × pp={p.pp} × tp={p.tp}) does not divide {gpus} GPUs")
        return
    dp = gpus // (p.cp * p.pp * p.tp)
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
    cp = any(c.parallel.cp > 1 for c in plan.ranked[:top])  # a column only where context parallelism is proposed
    ep = any(c.parallel.ep > 1 for c in plan.ranked[:top])  # ... and expert parallelism
    sliced = any(c.parallel.loss_chunks > 1 for c in plan.ranked[:top])  # ... and loss slices
    header = ("#", "dp", *(("cp",) if cp else ()), *(("ep",) if ep else ()), "pp", "tp", "ZeRO", "micro", "accum",
              "ckpt", *(("slices",) if sliced else ()), "mem GiB", "step s", "tokens/s", "MFU")
    rows = [header]
    for i, c in enumerate(plan.ranked[:top], 1):
        p = c.parallel
        rows.append((str(i), str(p.dp), *((str(p.cp),) if cp else ()), *((str(p.ep),) if ep else ()), str(p.pp),
                     str(p.tp), str(p.zero_stage),
                     str(p.micro_batch_size),
                     str(p.grad_accum), p.activation_checkpointing,
                     *((str(p.loss_chunks),) if sliced else ()), f"{c.memory.total / GiB:.1f}",
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
