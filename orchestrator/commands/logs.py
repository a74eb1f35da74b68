"""`pretrain logs JOB_ID [--follow] [--address URL]`: a submitted job's log (controller and every rank, prefixed)."""

from __future__ import annotations

import argparse
import sys

from orchestrator.commands._jobs import add_address, address


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id", help="the id `pretrain submit` printed")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    add_address(parser)


def run(args: argparse.Namespace) -> int:
    from cluster import submission

    if args.follow:
        submission.follow(address(args), args.job_id)
    else:
        sys.stdout.write(submission.logs(address(args), args.job_id))
    return 0
