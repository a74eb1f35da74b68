"""`pretrain import HF_DIR job.yaml [section.key=value ...] [-o out.yaml]`: start a run from a Hugging Face checkpoint.

    pretrain import models/llama-3.2-1b examples/llama-1b.yaml parallel.tp=2 -o runs/cont.yaml
    pretrain submit runs/cont.yaml          # continued pretraining from those weights, in any layout

Checks the Hugging Face directory completely (config.json describes a Llama, Qwen2, Qwen3, Mistral, OLMo 2,
Gemma 2, Qwen3-MoE or Mixtral model we can represent, every tensor is there with its shape), then writes the job
spec with every `model.*` set from config.json (model.family named, model.size empty: the spec is complete without
a preset, model.max_positions the model's context; a mixture of experts' model.moe, balanced by its auxiliary loss
at the model's router_aux_loss_coef unless the overrides say otherwise) and `checkpoint.init_from` pointing at the
directory: the training loop loads those weights into whatever layout the spec has when there is no checkpoint of
the run to resume, and each checkpoint keeps the model's tokenizer and special tokens for `pretrain export`
(`parallel.hf_origin`). The shards must be tokenized with the model's tokenizer (the spec's validation refuses a
shard vocabulary larger than the model's). Overrides of RoPE's settings (model.rope_theta, model.rope_scaling.*) and
of model.max_positions are kept: that is how a context is extended (docs/long-context.md); an override of any other
setting the model fixes (model.dim, model.n_layers, ...) is refused, naming it.

    pretrain import models/llama-3.2-1b examples/llama-1b.yaml data.seq_len=32768 model.max_positions=32768 \
        model.rope_theta=8000000 parallel.cp=2 -o runs/32k.yaml
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="Hugging Face model directory (config.json, model.safetensors)")
    parser.add_argument("spec", help="job spec YAML of the run to start from it")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("-o", "--output", help="write the resulting job spec here (default: print it)")


def run(args: argparse.Namespace) -> int:
    from dataprep.shards import write_atomic
    from orchestrator.errors import UserError
    from orchestrator.spec import spec_to_yaml
    from orchestrator.validate import load_spec
    from parallel.hf import is_rope_setting, model_settings, open_hf_weights, read_hf_config
    from parallel.hf_families import family_name, identity_of, training_settings

    weights = open_hf_weights(args.hf_dir)
    config = read_hf_config(args.hf_dir)
    hf_dir = os.path.abspath(args.hf_dir)
    settings = {**model_settings(weights.dims), "family": family_name(config), "size": "''",
                "max_positions": identity_of(config).max_positions, "init_std": weights.dims.init_std}
    # RoPE's settings and the context are the run's to set when the overrides do (a context extension); every other
    # setting of the model's is the model's.
    given = {o.split("=", 1)[0].removeprefix("model.") for o in args.overrides if o.startswith("model.")}
    kept = {k for k in given if is_rope_setting(k) or k == "max_positions"}
    refused = sorted(k for k in given & settings.keys() - kept)
    if refused:
        raise UserError(", ".join(f"model.{k}" for k in refused) + f": set by the model in {args.hf_dir} "
                        f"({', '.join(str(settings[k]) for k in refused)}); drop the override (RoPE's settings and "
                        "model.max_positions may be changed, to extend the context)")
    taken = [f"model.{k}={v}" for k, v in settings.items() if k not in kept]
    defaults = [f"model.{k}={v}" for k, v in training_settings(config).items()]
    spec = load_spec(args.spec, [*defaults, *args.overrides, *taken, f"checkpoint.init_from={hf_dir}"])
    text = spec_to_yaml(spec)
    if args.output:
        write_atomic(args.output, text.encode())
    else:
        print(text, end="")
    d = weights.dims
    experts = f", {d.moe.num_experts} experts, top-{d.moe.top_k}: {d.active_params():,} active" if d.moe else ""
    print(f"pretrain import: {settings['family']}, {d.num_params():,} parameters ({d.n_layers} layers, dim {d.dim}, "
          f"vocab {d.vocab_size}{experts}) "
          f"from {hf_dir}" + (f"; start it with: pretrain submit {args.output}" if args.output else ""),
          file=sys.stderr)
    return 0
