"""The model arguments the single-model benchmarks share: a randomly initialised Llama of the given size (speed does
not depend on the weights)."""

from __future__ import annotations

import argparse

from parallel.model import ModelDims


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")


def llama_dims(args: argparse.Namespace, rope_theta: float = 10000.0) -> ModelDims:
    """Llama's shape at the parsed size: SwiGLU width 8/3·dim rounded up to a multiple of 64."""
    return ModelDims(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                     n_kv_heads=args.kv_heads, ffn_dim=64 * -(-int(8 * args.dim / 3) // 64), norm_eps=1e-5,
                     rope_theta=rope_theta, tie_embeddings=False, init_std=0.02)
