"""`pretrain`: the one command line of the project.

    pretrain validate job.yaml parallel.tp=2          check a spec, print it resolved
    pretrain prep prep.yaml                           corpora → Arrow shards
    pretrain prep train-quality --positive ... -o m   a fastText quality classifier from labelled JSONL
    pretrain plan job.yaml --gpus 64                  memory, FLOPs and layout
    pretrain sweep sweep.yaml [--fit-only]            small runs on Ray, a scaling law fitted to them
    pretrain branch ckpts/ --steps 2000,4000          WSD decays from a stable run's checkpoints, L(D) fitted
    pretrain train job.yaml                           one rank, torchrun-style env vars (what the controller starts)
    pretrain submit job.yaml [--address URL]          run on a Ray cluster (embedded local one without --address)
    pretrain status|logs|stop JOB_ID [--address URL]  a submitted job's state, its logs (-f to follow), stop it
    pretrain list [--address URL]                     the submitted jobs
    pretrain profile JOB_ID --steps N                 traces of N steps from every rank of a running job
    pretrain export step_<N> out/                     a checkpoint as a Hugging Face Llama model
    pretrain import hf-model/ job.yaml -o run.yaml    start a run from a Hugging Face model
    pretrain generate step_<N> --prompt TEXT          sample continuations from a checkpoint
    pretrain eval step_<N> --tasks arc_easy,piqa      lm-evaluation-harness scores of a checkpoint
    pretrain k8s render job.yaml -o k8s-run           KubeRay manifests (RayJob, ConfigMaps, PVC, monitoring)

Each subcommand lives in `orchestrator/commands/<name>.py` with `add_arguments(parser)` and `run(args) -> int`;
those modules import their heavy dependencies inside `run`, so `pretrain --help` stays fast.
Exit codes: 0 done, 1 the run failed, 2 the input was wrong (the message says which field or file), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from orchestrator.errors import PretrainError, UserError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# name → (module under orchestrator.commands, one-line help); a module of None is not available in this version.
COMMANDS: dict[str, tuple[str | None, str]] = {
    "validate": ("validate", "check a job spec (with overrides) and print it resolved"),
    "prep": ("prep", "deduplicate, filter, mix and tokenize corpora into Arrow shards"),
    "plan": ("plan", "parameters, FLOPs, memory per GPU and the best layout for a spec"),
    "sweep": ("sweep", "run a grid of small models and fit a scaling law"),
    "branch": ("branch", "WSD decays branched from a stable run: loss against tokens for several budgets"),
    "train": ("train", "run one rank of a job (torchrun-style environment variables)"),
    "submit": ("submit", "run a job on a Ray cluster (a local one when no --address)"),
    "status": ("status", "show a submitted job's state"),
    "logs": ("logs", "print a submitted job's logs"),
    "stop": ("stop", "stop a submitted job"),
    "list": ("list", "list submitted jobs"),
    "profile": ("profile", "profile steps of a running job: a trace (and GPU memory snapshot) from every rank"),
    "export": ("export", "write a checkpoint as a Hugging Face Llama model"),
    "import": ("import_", "initialise a run from a Hugging Face Llama model"),
    "generate": ("generate", "sample continuations from a checkpoint"),
    "eval": ("eval", "score a checkpoint on lm-evaluation-harness tasks"),
    "k8s": ("k8s", "render KubeRay manifests from a job spec"),
}

# (command, action) → module: an action whose name would otherwise be read as the command's first argument
ACTIONS: dict[tuple[str, str], str] = {("prep", "train-quality"): "train_quality"}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line and exit code 2, never a traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"pretrain: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pretrain", description="LLM pretraining from raw corpora to a checkpointed model on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if module is None:
            command.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        else:
            _command_module(module).add_arguments(command)
    return parser


def _command_module(module: str):
    return importlib.import_module(f"orchestrator.commands.{module}")


def _parse_action(argv: list[str]) -> tuple[argparse.Namespace, str]:
    module = _command_module(ACTIONS[(argv[0], argv[1])])
    parser = _Parser(prog=f"pretrain {argv[0]} {argv[1]}", description=module.HELP)
    module.add_arguments(parser)
    args = parser.parse_args(argv[2:])
    args.command = f"{argv[0]} {argv[1]}"
    return args, ACTIONS[(argv[0], argv[1])]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if tuple(argv[:2]) in ACTIONS:
        args, module = _parse_action(argv)
    else:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        module = COMMANDS[args.command][0]
    if module is None:
        print(f"pretrain {args.command}: not available in this version of pretrain", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _command_module(module).run(args)
    except UserError as e:
        print(f"pretrain {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except PretrainError as e:
        print(f"pretrain {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"pretrain {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
