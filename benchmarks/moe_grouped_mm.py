"""MoE experts: `torch._grouped_mm` against the per-expert loop (`parallel.moe.GroupedExperts`), numbers and time.

    python benchmarks/moe_grouped_mm.py                                # a small shape on CPU (a smoke run)
    python benchmarks/moe_grouped_mm.py --device cuda --experts 64 --dim 2048 --ffn 1024 --tokens 65536   # bf16

The same experts and the same tokens (drawn uniformly over the experts, as a balanced router sends them) go through
both paths; prints each path's median forward + backward time and the largest difference of the outputs and of the
input and weight gradients, relative to the loop's largest value. On CUDA the grouped path is the one training
takes; both should agree to bf16 rounding.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from parallel.moe import GroupedExperts


def step(experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    y = experts(x, counts)
    y.float().square().mean().backward()
    grads = (y.detach(), x.grad.clone(), experts.down_proj.grad.clone(), experts.gate_proj.grad.clone())
    x.grad = None
    experts.zero_grad(set_to_none=True)
    return grads


def timed(experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        step(experts, x, counts)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    experts = GroupedExperts(args.experts, args.dim, args.ffn).to(device, dtype)
    for param in experts.parameters():
        torch.nn.init.normal_(param, 0.0, 0.02)
    choices = torch.randint(0, args.experts, (args.tokens,), device=device)
    counts = torch.bincount(choices, minlength=args.experts)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    results = {}
    for grouped in (True, False):
        experts.grouped_mm = grouped
        results[grouped] = step(experts, x, counts)  # also the warm-up
        seconds = timed(experts, x, counts, args.repeats)
        print(f"{'grouped_mm' if grouped else 'loop':>10}: {seconds * 1e3:9.2f} ms forward + backward "
              f"({args.tokens} tokens, {args.experts} experts, {dtype})")
    for name, a, b in zip(("output", "grad x", "grad down_proj", "grad gate_proj"), results[True], results[False],
                          strict=True):
        print(f"{name:>15}: max |grouped − loop| / max |loop| = {float((a - b).abs().max() / b.abs().max()):.2e}")


if __name__ == "__main__":
    main()
