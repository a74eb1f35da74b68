"""`pretrain export CKPT OUT`: a checkpoint of any layout as a Hugging Face model directory.

    pretrain export runs/tiny/checkpoints out/tiny-hf                      # the newest complete checkpoint
    pretrain export runs/tiny/checkpoints/step_200 out/tiny-hf --dtype bfloat16

OUT gets config.json of the architecture model.family names (or the first whose switches fit: llama, qwen2, qwen3,
mistral, olmo2, gemma2; a mixture of experts qwen3_moe or mixtral, each expert's tensors apart as transformers saves
them), model.safetensors (files of at most --max-shard-size, with model.safetensors.index.json when
there are several) and generation_config.json: `AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer`
load it. A run started from a Hugging Face model (`pretrain import`) exports with that model's identity, kept in
each checkpoint: its tokenizer files, chat template, generation config, special token ids and context
(model.max_positions). Any other run gets the shards' tokenizer (tokenizer.json, tokenizer_config.json) while
data.path still holds them, and data.seq_len as its context unless model.max_positions is set.
The checkpoint's shards are gathered by restarting its layout in local CPU processes (see `parallel.consolidate`).
OUT is written under OUT.partial and renamed when complete; an OUT that already holds files is refused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from orchestrator.errors import UserError
from orchestrator.sizes import parse_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a step_<N> checkpoint, or a checkpoint directory (its newest is used)")
    parser.add_argument("output", help="directory to write the Hugging Face model into")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="weights' dtype (default: bfloat16 for a run trained in bf16, else float32)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    parser.add_argument("--lora-adapter", action="store_true",
                        help="of a model.lora run: write a PEFT adapter directory (adapter_config.json, "
                        "adapter_model.safetensors) for the imported model instead of merging the adapters")


def check_output(output: str) -> None:
    """Nothing already written is overwritten: OUT must be new or an empty directory."""
    if os.path.isfile(output):
        raise UserError(f"{output}: is a file; give a directory to write the model into")
    if os.path.isdir(output) and os.listdir(output):
        raise UserError(f"{output}: already holds files; give a new or empty directory")


def run(args: argparse.Namespace) -> int:
    from orchestrator.validate import load_spec
    from parallel.consolidate import consolidate, find_checkpoint, saved_layout
    from parallel.hf import parse_dtype
    from parallel.hf_origin import export_settings

    check_output(args.output)
    max_shard = parse_size(args.max_shard_size, "--max-shard-size", examples="5GB, 500MB or 1000000")
    step_dir = find_checkpoint(args.checkpoint)
    spec = load_spec(os.path.join(step_dir, "spec.yaml"))
    dtype = parse_dtype(args.dtype or ("bfloat16" if spec.parallel.precision == "bf16" else "float32"))
    how = export_settings(spec, step_dir, dtype=dtype, max_shard_bytes=max_shard)
    partial = os.path.abspath(args.output.rstrip("/") + ".partial")
    write = _writer(args.lora_adapter, spec, step_dir, partial, how)
    if how.origin is not None:
        print(f"pretrain export: with the tokenizer, special tokens and context of {spec.checkpoint.init_from} "
              f"(kept in {how.origin})", file=sys.stderr)
    elif how.tokenizer is None:
        print(f"pretrain export: no tokenizer at data.path={spec.data.path!r}; exporting the model without one",
              file=sys.stderr)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        consolidate(spec, step_dir, write)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.isdir(args.output):
        os.rmdir(args.output)
    os.rename(partial, args.output)
    layout = saved_layout(step_dir)
    files = ", ".join(sorted(os.listdir(args.output)))
    print(f"pretrain export: {step_dir} (step {layout.get('step')}, dp={layout['dp']} pp={layout['pp']} "
          f"tp={layout['tp']} ZeRO-{layout['zero_stage']}) → {args.output}: {files}")
    return 0


def _writer(adapter: bool, spec, step_dir: str, directory: str, how):
    """What rank 0 writes: the model (a LoRA run's adapters merged into it), or with --lora-adapter, the adapters
    in PEFT's format for the imported model (`parallel.lora_export`)."""
    from parallel.lora_export import PeftAdapterWriter, model_writer

    lora, base = spec.model.lora, spec.checkpoint.init_from
    if not adapter:
        return model_writer(spec, directory, how)
    if not lora.rank:
        raise UserError(f"--lora-adapter: {step_dir} is a checkpoint of a run without adapters (model.lora.rank=0); "
                        "export it without --lora-adapter")
    if not base:
        raise UserError(f"--lora-adapter: the adapters of {step_dir} were trained on random weights (no "
                        "checkpoint.init_from), which no adapter directory can name; export without --lora-adapter "
                        "to merge them")
    return PeftAdapterWriter(directory, lora, os.path.abspath(base), how.dtype)
