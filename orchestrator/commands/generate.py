"""`pretrain generate CKPT --prompt TEXT [--prompt TEXT ...]`: sample continuations, with a KV cache.

    pretrain generate runs/tiny/checkpoints --prompt "And God said" --max-new-tokens 40 --temperature 0.8 --top-p 0.9
    pretrain generate out/tiny-hf --prompt "To be" --temperature 0                  # greedy, from an exported model

CKPT is a checkpoint directory (its newest), one of its step_<N>, or a Hugging Face model directory of any family
`pretrain import` takes. A checkpoint is first gathered from its layout (as `pretrain export` does, with the same
tokenizer: the imported model's, else the shards') into a temporary directory; a Hugging Face directory brings its
own tokenizer.json. A mixture of experts is gathered into the model itself instead (`_generate_moe`). All prompts run
as one left-padded batch.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from orchestrator.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory, step_<N>, or Hugging Face model directory")
    parser.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable: a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add to each prompt at most")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0: all")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens holding "
                        "this much probability; 1: all")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step (slow)")


def run(args: argparse.Namespace) -> int:
    from parallel.generate import SamplingConfig
    from parallel.hf import CONFIG

    config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    config.check()
    for i, prompt in enumerate(args.prompt, 1):
        if not prompt:
            raise UserError(f"--prompt #{i} is empty; give some text to continue")
    if os.path.isfile(os.path.join(args.checkpoint, CONFIG)):
        return _generate(args.checkpoint, args, config)
    from orchestrator.validate import load_spec
    from parallel.consolidate import consolidate, find_checkpoint
    from parallel.hf_origin import export_settings
    from parallel.lora_export import model_writer

    step_dir = find_checkpoint(args.checkpoint)
    spec = load_spec(os.path.join(step_dir, "spec.yaml"))
    if spec.model.moe.num_experts:
        return _generate_moe(spec, step_dir, args, config)
    how = export_settings(spec, step_dir)
    if how.tokenizer is None and how.origin is None:
        raise UserError(f"{step_dir}: its run's shards (data.path={spec.data.path!r}) and their tokenizer.json are "
                        "gone; export the checkpoint and put the tokenizer.json beside it")
    with tempfile.TemporaryDirectory(prefix="pretrain-generate-") as hf_dir:
        consolidate(spec, step_dir, model_writer(spec, hf_dir, how))  # a LoRA run's adapters merged
        return _generate(hf_dir, args, config)


def _generate(hf_dir: str, args: argparse.Namespace, config) -> int:
    from parallel.hf import TOKENIZER, load_hf_model, read_hf_config
    from parallel.launch import pick_device

    path = os.path.join(hf_dir, TOKENIZER)
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; generation needs the model's tokenizer")
    model = load_hf_model(hf_dir, pick_device(args.device))
    return _sample(model, path, read_hf_config(hf_dir).get("eos_token_id"), args, config)


def _generate_moe(spec, step_dir: str, args: argparse.Namespace, config) -> int:
    """A mixture of experts generates from the model itself, gathered from the checkpoint, not through a Hugging Face
    directory: transformers' MoE classes have neither the learned routing bias of aux-free balancing, which the
    model routes with, nor every routing switch of the model (shared experts, sigmoid scores, capacity)."""
    import torch

    from parallel.consolidate import TorchWriter, consolidate
    from parallel.hf import TOKENIZER, read_hf_config, shard_tokenizer
    from parallel.hf_origin import saved_origin
    from parallel.launch import pick_device
    from parallel.lora import apply_lora
    from parallel.model import build_model
    from parallel.moe import moe_state

    origin = saved_origin(step_dir)
    shards = shard_tokenizer(spec.data.path)
    if origin is not None and os.path.isfile(os.path.join(origin, TOKENIZER)):
        tokenizer, eos = os.path.join(origin, TOKENIZER), read_hf_config(origin).get("eos_token_id")
    elif shards is not None:
        tokenizer, eos = shards.tokenizer_json, shards.eos_id
    else:
        raise UserError(f"{step_dir}: its run's shards (data.path={spec.data.path!r}) and their tokenizer.json are "
                        "gone; point data.path in its spec.yaml at shards with the run's tokenizer")
    with tempfile.TemporaryDirectory(prefix="pretrain-generate-") as work:
        path = os.path.join(work, "model.pt")
        consolidate(spec, step_dir, TorchWriter(path))
        state = torch.load(path, weights_only=True)
    model = build_model(spec.model, pick_device(args.device))
    if spec.model.lora.rank:
        apply_lora(model, spec.model.lora, spec.checkpoint.init_from)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *moe_state(model).items()]:
            tensor.copy_(state[name])
    return _sample(model.eval(), tokenizer, eos, args, config)


def _sample(model, tokenizer_path: str, eos, args: argparse.Namespace, config) -> int:
    """Continue the prompts with `model`, print each continuation and the speed."""
    import dataclasses

    from tokenizers import Tokenizer

    from parallel.generate import generate

    tokenizer = Tokenizer.from_file(tokenizer_path)
    eos = tuple(eos) if isinstance(eos, list) else () if eos is None else (eos,)
    prompts = [tokenizer.encode(p, add_special_tokens=False).ids for p in args.prompt]
    result = generate(model, prompts, dataclasses.replace(config, eos_ids=eos), use_cache=not args.no_cache)
    for i, (prompt, tokens) in enumerate(zip(args.prompt, result.tokens, strict=True), 1):
        print(f"[{i}] {prompt}{tokenizer.decode(tokens, skip_special_tokens=False)}")
    cache = "without a KV cache" if args.no_cache else "KV cache"
    print(f"pretrain generate: {len(prompts)} prompt(s), {result.new_tokens} new tokens in {result.seconds:.2f} s "
          f"({result.tokens_per_second:,.1f} tokens/s; prompt {result.prefill_seconds:.2f} s; {cache})")
    return 0
