"""`pretrain branch CHECKPOINT_DIR --steps B1,B2,B3 [key=value ...] [-o DIR] [--ray] [--prepare-only|--fit-only]`:
WSD decays branched from one stable-phase run, one per token budget, and L(D) fitted through their final losses
(see orchestrator/planner/wsd.py).

    pretrain branch runs/long/checkpoints --steps 2000,4000,8000                 # here, one after another
    pretrain branch runs/long/checkpoints --steps 2000,4000,8000 --ray           # as Ray tasks
    pretrain branch runs/long/checkpoints --steps 2000,4000,8000 --prepare-only  # then `pretrain submit` each job.yaml
    pretrain branch runs/long/checkpoints --steps 2000,4000,8000 --fit-only      # fit and draw what has trained
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint_dir", help="the stable run's checkpoint.dir")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the branches' spec (evaluation, device)")
    parser.add_argument("--steps", required=True, help="the branches' schedule.steps, comma-separated")
    parser.add_argument("--decay-fraction", type=float, default=None,
                        help="share of each branch spent decaying (default: the stable run's schedule.decay_fraction)")
    parser.add_argument("-o", "--output", default=None,
                        help="directory of the branches (default: <checkpoint_dir>-branches)")
    parser.add_argument("--ray", action="store_true", help="train the branches as tasks on Ray (a local cluster "
                        "without --address)")
    parser.add_argument("--address", default=None, help="with --ray: the Ray cluster's address")
    parser.add_argument("--cpus-per-run", type=float, default=1.0, help="with --ray: CPUs a branch holds (1)")
    parser.add_argument("--gpus-per-run", type=int, default=0, choices=(0, 1), help="with --ray: GPUs a branch holds")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare-only", action="store_true",
                      help="write the branches' directories and job specs, train nothing")
    mode.add_argument("--fit-only", action="store_true", help="fit and draw the branches already trained")


def run(args: argparse.Namespace) -> int:
    import os

    from orchestrator.errors import UserError
    from orchestrator.planner import wsd

    if args.address and not args.ray:
        raise UserError("--address: only with --ray (the Ray cluster the branches train on)")
    output = args.output or os.path.normpath(args.checkpoint_dir) + "-branches"
    branches = wsd.plan_branches(args.checkpoint_dir, wsd.parse_budgets(args.steps), output,
                                 decay_fraction=args.decay_fraction, overrides=args.overrides)
    if not args.fit_only:
        for branch in branches:
            wsd.prepare(branch, args.checkpoint_dir)
        todo = [b for b in branches if wsd.result(b) is None]
        print(f"{len(branches)} branches ({len(branches) - len(todo)} already trained) in {output}")
        ranks = branches[0].spec.world_size
        if args.prepare_only or (todo and ranks > 1):
            jobs = "\n  ".join(f"pretrain submit {b.job}" for b in todo)
            why = "" if args.prepare_only else f"the stable run has {ranks} ranks: "
            print(f"{why}train each branch with\n  {jobs}\nthen fit with the same command and --fit-only")
            return 0
        if args.ray:
            wsd.train_on_ray(todo, args.address, args.cpus_per_run, args.gpus_per_run)
        else:
            wsd.train_here(todo)
    wsd.summarize(branches, args.checkpoint_dir, output)
    print(f"branches: {output}/branches.json, plot: {output}/branches.png")
    return 0
