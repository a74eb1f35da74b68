"""Decoding speed with and without the KV cache (target: ≥ 5× faster at 512 new tokens on CPU for a small model).

    python benchmarks/generate_kv_cache.py                                  # dim 256, 4 layers, 512 tokens, CPU
    python benchmarks/generate_kv_cache.py --dim 2048 --layers 16 --heads 16 --device cuda --new-tokens 1024

Builds a randomly initialised Llama of the given size (no weights needed: speed does not depend on them), then
generates greedily from the same prompts with the cache and by re-running the whole prefix at every step, checks that
both give the same tokens, and prints tokens/s of each and their ratio. A short warm-up run comes first so that
neither side pays for first-call allocation.

CPU runs use one intra-op thread by default: a decoding step is hundreds of small ops, and on a machine whose cores
are shared, each parallel region waits for descheduled threads (measured on a loaded 2-core machine: 4.6 s with one
thread, 24 s with two, for the same 512 cached tokens). `--threads 0` keeps torch's own choice.
"""

from __future__ import annotations

import argparse

import torch
from llama_args import add_model_arguments, llama_dims

from parallel.generate import SamplingConfig, generate
from parallel.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU; 0: torch's choice")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dims = llama_dims(args)
    model = build_model(dims, args.device).eval()
    model.init_weights(seed=0)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_tokens),
                            generator=torch.Generator().manual_seed(0)).tolist()
    greedy = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0)
    generate(model, prompts, SamplingConfig(max_new_tokens=8, temperature=0))
    generate(model, prompts, SamplingConfig(max_new_tokens=8, temperature=0), use_cache=False)
    cached = generate(model, prompts, greedy)
    uncached = generate(model, prompts, greedy, use_cache=False)
    print(f"model: {dims.num_params() / 1e6:.1f}M parameters (dim {args.dim}, {args.layers} layers), "
          f"batch {args.batch}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"with KV cache:    {cached.seconds:8.2f} s  {cached.tokens_per_second:10.1f} tokens/s")
    print(f"without KV cache: {uncached.seconds:8.2f} s  {uncached.tokens_per_second:10.1f} tokens/s")
    print(f"speed-up: {uncached.seconds / cached.seconds:.1f}x; same tokens: {cached.tokens == uncached.tokens}")


if __name__ == "__main__":
    main()
