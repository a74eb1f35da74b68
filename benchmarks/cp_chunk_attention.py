"""Context parallelism's chunked attention on one GPU, against plain causal attention: losses and step time.

    python benchmarks/cp_chunk_attention.py --device cuda --dim 2048 --layers 20 --heads 16 --kv-heads 8 \\
        --vocab 50304 --seq 32768 --steps 12 --ac none full           # the 1B shape at seq 32k on one H200

For each activation-checkpointing mode the same weights train `--steps` steps (AdamW, bf16 autocast, each block
compiled as `parallel.compile` does) on `--batches` random batches cycled, twice: with plain causal attention, and
with every block's attention made a context-parallel rank's over a group of one (`chunk_attention`): its first half
one bottom-right-causal SDPA call, its second half the merged cuDNN operator (`parallel.cudnn_attention`) over all
the keys, exactly what a later chunk of a cp run computes. The two compute the same function, so their losses must
agree to bf16 noise. Random tokens cannot be learned beyond their batches' memorisation, which both runs share: a
chunked loss falling well below the plain one means its attention sees tokens it should not. Prints each step's loss
for both and the median step time (after two warm-up steps).

With `--doc-tokens N` the rows are packed documents of ~N tokens (EOS after each) under per-document masks and RoPE
positions (`model.attention_mask: document`): the plain run masks with one FlexAttention block mask over the whole row,
the chunked one with the block mask a cp rank builds, its split's queries against the gathered keys at their row
positions (over a group of one the split holds every chunk; benchmarks/cp_balance.py times the ranks of wider splits).

    python benchmarks/cp_chunk_attention.py --device cuda --dim 2048 --layers 20 --heads 16 --kv-heads 8 \
        --vocab 50304 --seq 32768 --steps 8 --ac none --doc-tokens 4096  # per-document masks at seq 32k
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import torch.distributed as dist
from document_mask_cost import EOS, packed_rows
from llama_args import add_model_arguments, llama_dims

from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.compile import apply_compile
from parallel.context_parallel import chunk_attention
from parallel.documents import document_ids
from parallel.model import ModelDims, build_model, cross_entropy


def train(dims: ModelDims, batches: list[torch.Tensor], steps: int, ac: str, chunked: bool,
          device: torch.device) -> tuple[list[float], list[float], float]:
    """Each step's loss and seconds, and the peak GiB allocated."""
    torch.cuda.reset_peak_memory_stats()
    model = build_model(dims, device)
    model.init_weights(seed=0)
    if chunked:
        chunk_attention(model, list(model.layers), 1, 0, dist.group.WORLD, batches[0].shape[1] - 1)
    apply_activation_checkpointing(model.layers, ac)
    apply_compile(model.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    losses, seconds = [], []
    for step in range(steps):
        rows = batches[step % len(batches)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        documents = document_ids(rows[:, :-1], EOS) if dims.attention_mask == "document" else None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = cross_entropy(model(rows[:, :-1], documents=documents), rows[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, seconds, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batches", type=int, default=4, help="random batches, cycled")
    parser.add_argument("--ac", nargs="+", default=["none", "full"], choices=["none", "full", "selective"])
    parser.add_argument("--doc-tokens", type=int, default=0,
                        help="mean document length of packed rows under per-document masks (0: causal rows)")
    args = parser.parse_args()
    device = torch.device(args.device)
    assert device.type == "cuda", "the merged cuDNN operator runs on CUDA only"
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    dims = llama_dims(args, rope_theta=500000.0)
    if args.doc_tokens:
        dims = dataclasses.replace(dims, attention_mask="document", rope_positions="document")
        batches = [packed_rows(args.batch, args.seq, args.doc_tokens, args.vocab, seed).to(device)
                   for seed in range(args.batches)]
    else:
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
                   for _ in range(args.batches)]
    tokens = args.batch * args.seq
    rows = f"documents of ~{args.doc_tokens} tokens, per-document masks" if args.doc_tokens else "causal"
    print(f"dim {args.dim} layers {args.layers} heads {args.heads}/{args.kv_heads} seq {args.seq} batch {args.batch}, "
          f"{args.steps} steps on {args.batches} random batches ({rows})")
    for ac in args.ac:
        runs = {}
        for name, chunked in (("plain", False), ("chunked", True)):
            runs[name] = train(dims, batches, args.steps, ac, chunked, device)
            torch.cuda.empty_cache()
        for name, (losses, seconds, peak) in runs.items():
            median = statistics.median(seconds[2:])
            print(f"  ac {ac:<9} {name:<7} {median * 1e3:9.1f} ms/step {tokens / median:10,.0f} tokens/s  "
                  f"peak {peak:.1f} GiB  losses "
                  + " ".join(f"{x:.3f}" for x in losses))
        gap = max(abs(a - b) for a, b in zip(runs["plain"][0], runs["chunked"][0], strict=True))
        print(f"  ac {ac}: largest loss difference {gap:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
