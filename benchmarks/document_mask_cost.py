"""The cost of per-document attention against plain causal attention: one training step (forward and backward) of the
same model on the same packed rows, with `model.attention_mask` causal and document.

    python benchmarks/document_mask_cost.py                       # a small model on CPU (a smoke run)
    python benchmarks/document_mask_cost.py --device cuda --dim 2048 --layers 16 --heads 32 --kv-heads 8 \\
        --seq 8192 --doc-tokens 1024 --compile                    # ~1B Llama shape at seq 8k on one GPU (bf16)

Rows hold documents of drawn lengths (exponential around `--doc-tokens`, EOS after each), so the document variant
masks real boundaries. Both variants run the same weights; the causal one takes SDPA's causal kernel (flash on GPU),
the document one a FlexAttention block mask on CUDA (built each step, as in training; its build time is printed
apart) or a boolean mask elsewhere. Prints the median step time of each, their ratio, and the document variant's
share of attention work (the fraction of the causal triangle its mask keeps), which bounds what the block mask can
save. Compare the two within one call: figures from different calls of a shared machine differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from llama_args import add_model_arguments, llama_dims

from parallel.compile import apply_compile
from parallel.documents import dense_mask, document_ids
from parallel.model import ModelDims, build_model, cross_entropy

EOS = 0


def packed_rows(batch: int, seq: int, doc_tokens: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """[batch, seq + 1] tokens with an EOS after each document of exponentially drawn length (mean doc_tokens)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(EOS + 1, vocab, (batch, seq + 1), generator=g)
    for row in rows:
        at = 0
        while True:
            at += 1 + int(torch.empty(1).exponential_(1 / doc_tokens, generator=g))
            if at >= seq + 1:
                break
            row[at] = EOS
    return rows


def step_seconds(model: torch.nn.Module, rows: torch.Tensor, documents: bool, steps: int) -> list[float]:
    times = []
    inputs, targets = rows[:, :-1], rows[:, 1:]
    for _ in range(steps + 2):  # two warm-up steps (compile, allocator)
        if inputs.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        docs = document_ids(inputs, EOS) if documents else None
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=inputs.is_cuda):
            loss = cross_entropy(model(inputs, documents=docs), targets)
        loss.backward()
        if inputs.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return times[2:]


def mask_build_seconds(rows: torch.Tensor, dims: ModelDims) -> float:
    """One forward's mask building alone (what `parallel.documents.document_context` does per step), after a first
    call that pays for compiling the block-mask builder."""
    model = build_model(dims, "meta")
    inputs = rows[:, :-1]
    model.documents(document_ids(inputs, EOS))
    if inputs.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.documents(document_ids(inputs, EOS))
    if inputs.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--doc-tokens", type=int, default=256, help="mean document length")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="compile each block (as parallel.compile does)")
    args = parser.parse_args()
    device = torch.device(args.device)
    causal = llama_dims(args, rope_theta=500000.0)
    rows = packed_rows(args.batch, args.seq, args.doc_tokens, args.vocab).to(device)
    keep = dense_mask(document_ids(rows[:1, :-1].cpu(), EOS), 0).float().mean() * 2 * args.seq / (args.seq + 1)
    results = {}
    for name, documents in (("causal", False), ("document", True)):
        dims = dataclasses.replace(causal, attention_mask="document" if documents else "causal")
        model = build_model(dims, device)
        model.init_weights(seed=0)
        if args.compile:
            apply_compile(model.layers)
        results[name] = statistics.median(step_seconds(model, rows, documents, args.steps))
        del model
    build = mask_build_seconds(rows, dataclasses.replace(causal, attention_mask="document"))
    tokens = args.batch * args.seq
    print(f"{args.device} dim {args.dim} layers {args.layers} seq {args.seq} batch {args.batch}, documents of "
          f"~{args.doc_tokens} tokens (the mask keeps {float(keep):.1%} of the causal triangle)")
    for name, seconds in results.items():
        print(f"  {name:<9} {seconds * 1e3:9.1f} ms/step  {tokens / seconds:12,.0f} tokens/s")
    print(f"  document / causal: {results['document'] / results['causal']:.3f}; mask build {build * 1e3:.1f} ms "
          "of the document step")


if __name__ == "__main__":
    main()
