"""`pretrain import HF_DIR job.yaml [section.key=value ...] [-o out.yaml]`: start a run from a Hugging Face checkpoint.

    pretrain import models/llama-3.2-1b examples/llama-1b.yaml parallel.tp=2 -o runs/cont.yaml
    pretrain submit runs/cont.yaml          # continued pretraining from those weights, in any layout

Checks the Hugging Face directory completely (config.json describes a model we can represent, every tensor is
there with its shape), then writes the job spec with `model.*` set from config.json and `checkpoint.init_from`
pointing at the directory: the training loop loads those weights into whatever layout the spec has when there is
no checkpoint of the run to resume. The shards must be tokenized with the model's tokenizer (the spec's validation
refuses a shard vocabulary larger than the model's).
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="Hugging Face Llama directory (config.json, model.safetensors)")
    parser.add_argument("spec", help="job spec YAML of the run to start from it")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("-o", "--output", help="write the resulting job spec here (default: print it)")


def run(args: argparse.Namespace) -> int:
    from dataprep.shards import write_atomic
    from orchestrator.spec import spec_to_yaml
    from orchestrator.validate import load_spec
    from parallel.hf import model_settings, open_hf_weights

    weights = open_hf_weights(args.hf_dir)
    hf_dir = os.path.abspath(args.hf_dir)
    taken = [f"model.{k}={v}" for k, v in model_settings(weights.dims).items()]
    spec = load_spec(args.spec, [*args.overrides, *taken, f"checkpoint.init_from={hf_dir}"])
    text = spec_to_yaml(spec)
    if args.output:
        write_atomic(args.output, text.encode())
    else:
        print(text, end="")
    d = weights.dims
    print(f"pretrain import: {d.num_params():,} parameters ({d.n_layers} layers, dim {d.dim}, vocab {d.vocab_size}) "
          f"from {hf_dir}" + (f"; start it with: pretrain submit {args.output}" if args.output else ""),
          file=sys.stderr)
    return 0
