"""`pretrain eval CKPT --tasks a,b`: lm-evaluation-harness scores of a checkpoint (docs/evaluation.md).

    pretrain eval runs/tiny/checkpoints --tasks arc_easy,hellaswag --limit 200 --output scores.json
    pretrain eval out/tiny-hf --tasks my_task --include-path my_tasks/               # an exported model
    torchrun --nproc_per_node 4 -m orchestrator.cli eval runs/big/checkpoints --tasks piqa --tp 2   # dp2 × tp2

CKPT is a checkpoint directory (its newest), one of its step_<N>, or a Hugging Face model directory (one process).
A checkpoint is loaded into its own backend's engine in the layout this command is started in (torchrun's
WORLD_SIZE ranks, `--tp` of them per tensor-parallel group, the rest data-parallel; no pipeline), from whatever
layout it was written in, as a resume would; requests are spread over the data-parallel ranks. Tasks are the
harness's own (which fetch their data as usual) or YAML files in `--include-path`.
"""

from __future__ import annotations

import argparse
import json
import os

from orchestrator.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory, step_<N>, or Hugging Face model directory")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples; default: each task's own")
    parser.add_argument("--limit", type=int, default=0, help="documents per task at most; 0: all")
    parser.add_argument("--include-path", default="", help="directory of local task files (YAML + data)")
    parser.add_argument("--output", default="", help="write the results here as JSON")
    parser.add_argument("--log-samples", action="store_true", help="with --output: every document's requests and "
                        "responses too (the harness's samples)")
    parser.add_argument("--batch-size", type=int, default=16, help="requests per forward on each rank")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (of torchrun's WORLD_SIZE)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def run(args: argparse.Namespace) -> int:
    from parallel.downstream import TaskSettings, run_tasks, scores_of
    from parallel.eval_tasks import parse_task_names, task_manager
    from parallel.hf import CONFIG
    from parallel.launch import RankEnv

    _check_numbers(args)
    env = RankEnv.from_env()
    settings = TaskSettings(parse_task_names(args.tasks, "--tasks"), args.limit, args.num_fewshot,
                            args.include_path)
    manager = task_manager(settings.tasks, args.include_path, "--tasks")
    if os.path.isfile(os.path.join(args.checkpoint, CONFIG)):
        if env.world_size > 1 or args.tp > 1:
            raise UserError(f"{args.checkpoint} is a Hugging Face directory, which one process evaluates; "
                            "run it without torchrun and --tp")
        lm, where = _hf_model(args), args.checkpoint
        results = run_tasks(lm, settings, manager, args.log_samples)
    else:
        results, where = _checkpoint_results(args, env, settings, manager)
    if env.rank == 0:
        _report(results, scores_of(results), where, settings, args.output)
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    problems = []
    if args.limit < 0:
        problems.append(f"--limit: {args.limit}, must be ≥ 0 (0: every document)")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        problems.append(f"--num-fewshot: {args.num_fewshot}, must be ≥ 0")
    if args.batch_size < 1:
        problems.append(f"--batch-size: {args.batch_size}, must be at least 1")
    if args.tp < 1:
        problems.append(f"--tp: {args.tp}, must be at least 1")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        problems.append(f"--output: the directory of {args.output} does not exist")
    if problems:
        raise UserError("; ".join(problems))


def _hf_model(args: argparse.Namespace):
    from parallel.hf import TOKENIZER, load_hf_model, read_hf_config
    from parallel.launch import pick_device
    from parallel.lm_eval_adapter import PretrainLM, WholeModel

    tokenizer = os.path.join(args.checkpoint, TOKENIZER)
    if not os.path.isfile(tokenizer):
        raise UserError(f"{tokenizer}: missing; evaluation needs the model's tokenizer")
    config = read_hf_config(args.checkpoint)
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        raise UserError(f"{args.checkpoint}/config.json: no eos_token_id; the harness needs an end-of-text token")
    model = load_hf_model(args.checkpoint, pick_device(args.device))
    return PretrainLM(WholeModel(model), tokenizer, eos_id=eos, bos_id=config.get("bos_token_id"),
                      max_length=config.get("max_position_embeddings") or 2048, batch_size=args.batch_size)


def _checkpoint_results(args: argparse.Namespace, env, settings, manager) -> tuple[dict, str]:
    """The harness's results for a pretrain checkpoint, every rank of this launch taking part."""
    from orchestrator.validate import load_spec
    from parallel.consolidate import find_checkpoint
    from parallel.downstream import load_weights, run_tasks
    from parallel.engine import build_engine
    from parallel.hf import TOKENIZER
    from parallel.hf_origin import export_settings
    from parallel.launch import init_distributed, pick_device, shutdown_distributed
    from parallel.lm_eval_adapter import EngineModel, PretrainLM

    step_dir = os.path.abspath(find_checkpoint(args.checkpoint))
    spec = load_spec(os.path.join(step_dir, "spec.yaml"))
    how = export_settings(spec, step_dir)
    identity = how.identity()
    tokenizer = os.path.join(how.origin, TOKENIZER) if how.origin else how.tokenizer and how.tokenizer.tokenizer_json
    if not tokenizer or identity.eos_id is None:
        raise UserError(f"{step_dir}: its run's tokenizer.json (data.path={spec.data.path!r}) or its end-of-text id "
                        "is gone; export the checkpoint with a tokenizer and evaluate the exported directory")
    spec = _eval_layout(spec, step_dir, env.world_size, args)
    device = pick_device(spec.resources.device, env.local_rank)
    init_distributed(env, device)
    engine = build_engine(spec, env, device)
    load_weights(spec, engine, step_dir)
    lm = PretrainLM(EngineModel(engine), tokenizer, eos_id=identity.eos_id, bos_id=identity.bos_id,
                    max_length=identity.max_positions, batch_size=args.batch_size)
    results = run_tasks(lm, settings, manager, args.log_samples)
    shutdown_distributed()
    return results, step_dir


def _eval_layout(spec, step_dir: str, world: int, args: argparse.Namespace):
    """The run's spec in this launch's layout: `--tp` × the rest data-parallel, no pipeline, no compile."""
    import copy

    from orchestrator.validate import cross_field_problems

    if world % args.tp:
        raise UserError(f"--tp: {args.tp} does not divide the {world} ranks started (WORLD_SIZE)")
    spec = copy.deepcopy(spec)
    p = spec.parallel
    p.tp, p.pp, p.dp, p.compile, p.global_batch_size = args.tp, 1, world // args.tp, False, 0
    p.cp = 1  # a forward of whole sequences; the checkpoint of a cp run loads into any layout
    p.sequence_parallel = p.sequence_parallel and args.tp > 1
    spec.resources.device, spec.resources.num_nodes, spec.resources.gpus_per_node = args.device, 1, world
    spec.checkpoint.dir = os.path.dirname(step_dir)
    problems = [pr for pr in cross_field_problems(spec) if pr.path.startswith(("parallel", "model"))]
    if problems:
        raise UserError("the evaluation layout does not fit the model: "
                        + "; ".join(f"{pr.path}: {pr.message}" for pr in problems))
    return spec


def _report(results: dict, scores: dict[str, float], where: str, settings, output: str) -> None:
    for name, value in scores.items():
        print(f"{name:<40} {value:.4f}")
    print(f"pretrain eval: {where}: {len(settings.tasks)} task(s), limit {settings.limit or 'none'}")
    if output:
        document = {"model": where, "tasks": settings.tasks, "limit": settings.limit,
                    "num_fewshot": settings.num_fewshot, "scores": scores, "results": results["results"],
                    "configs": results.get("configs", {})}
        if "samples" in results:
            document["samples"] = results["samples"]
        partial = f"{output}.partial"
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2, default=str)
        os.replace(partial, output)
