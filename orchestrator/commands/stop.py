"""`pretrain stop JOB_ID [--address URL]`: stop a submitted job (its ranks are killed with it)."""

from __future__ import annotations

import argparse

from orchestrator.commands._jobs import add_address, address


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id", help="the id `pretrain submit` printed")
    add_address(parser)


def run(args: argparse.Namespace) -> int:
    from cluster import submission

    if submission.stop(address(args), args.job_id):
        print(f"{args.job_id}: stopping")
    else:
        print(f"{args.job_id}: already ended")
    return 0
