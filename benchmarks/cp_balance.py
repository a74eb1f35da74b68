"""How evenly context parallelism's ranks share attention under per-document masks: head-tail against the balanced
split (`parallel.documents.balanced_positions`), timed rank by rank on one GPU.

    python benchmarks/cp_balance.py --device cuda --seq 131072 --cp 2 4 8 --doc-tokens 4096 32768

A cp rank's attention is its queries (the tokens at its split positions) against every rank's keys, under one
FlexAttention block mask (`parallel.documents.block_mask`), exactly as `ContextParallelAttention` computes it; the
rest of a layer is token by token, the same work on every rank. So each rank's attention forward and backward is
timed here alone, with the 1B model's heads, for both splits of the same packed rows (documents of exponentially
drawn lengths around each `--doc-tokens`), and the step waits for the slowest rank: the figure to compare is the
slowest rank's time, and its ratio to the mean rank's says how much of the attention time the others idle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from document_mask_cost import EOS, packed_rows

from parallel.documents import (
    balanced_positions,
    block_mask,
    compiled_flex_attention,
    document_ids,
    head_tail_positions,
)


def rank_seconds(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, repeats: int) -> float:
    """Median seconds of one forward and backward of a rank's attention."""
    attend = compiled_flex_attention()
    grad = torch.randn_like(q)
    times = []
    for _ in range(repeats + 1):  # one warm-up (compile, allocator)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = attend(q, k, v, block_mask=mask, enable_gqa=True)
        torch.autograd.grad(out, (q, k, v), grad)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq", type=int, default=131072)
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--doc-tokens", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--rows", type=int, default=3, help="packed rows drawn per document length")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device(args.device)
    assert device.type == "cuda", "FlexAttention's fused kernels run on CUDA"
    g = torch.Generator(device=device).manual_seed(0)

    def leaf(heads: int, length: int) -> torch.Tensor:
        return torch.randn(1, heads, length, args.head_dim, device=device, dtype=torch.bfloat16, generator=g,
                           requires_grad=True)

    results = []
    for doc_tokens in args.doc_tokens:
        for seed in range(args.rows):
            documents = document_ids(packed_rows(1, args.seq, doc_tokens, 2, seed)[:, :-1], EOS).to(device)
            k, v = leaf(args.kv_heads, args.seq), leaf(args.kv_heads, args.seq)
            for cp in args.cp:
                q = leaf(args.heads, args.seq // cp)
                splits = {"head-tail": head_tail_positions(args.seq, cp, device)[None],
                          "balanced": balanced_positions(documents, cp)}
                row = {"doc_tokens": doc_tokens, "row": seed, "cp": cp}
                for name, every in splits.items():
                    keys = every.flatten(1)
                    seconds = [rank_seconds(q, k, v, block_mask(documents, 0, every[:, r], keys), args.repeats)
                               for r in range(cp)]
                    row[name] = {"rank_ms": [round(s * 1e3, 3) for s in seconds],
                                 "slowest_ms": round(max(seconds) * 1e3, 3),
                                 "slowest_over_mean": round(max(seconds) / statistics.mean(seconds), 3)}
                row["head_tail_over_balanced"] = round(row["head-tail"]["slowest_ms"] / row["balanced"]["slowest_ms"],
                                                       3)
                results.append(row)
                print(f"docs ~{doc_tokens:>6} row {seed} cp{cp}: slowest rank head-tail "
                      f"{row['head-tail']['slowest_ms']:8.2f} ms ({row['head-tail']['slowest_over_mean']:.3f}× mean), "
                      f"balanced {row['balanced']['slowest_ms']:8.2f} ms ({row['balanced']['slowest_over_mean']:.3f}× "
                      f"mean): {row['head_tail_over_balanced']:.3f}×", flush=True)
    for doc_tokens in args.doc_tokens:
        for cp in args.cp:
            ratios = [r["head_tail_over_balanced"] for r in results if r["doc_tokens"] == doc_tokens and r["cp"] == cp]
            print(f"docs ~{doc_tokens} cp{cp}: head-tail's slowest rank / balanced's, median over rows "
                  f"{statistics.median(ratios):.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "seq": args.seq, "heads": args.heads,
                       "kv_heads": args.kv_heads, "head_dim": args.head_dim, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
