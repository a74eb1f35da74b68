"""`pretrain status JOB_ID [--address URL]`: a submitted job's state.

Exit codes: 0 pending, running or succeeded; 1 failed or stopped; 2 no such job or no reachable cluster.
"""

from __future__ import annotations

import argparse
import datetime

from orchestrator.commands._jobs import add_address, address

OK_STATES = ("PENDING", "RUNNING", "SUCCEEDED")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id", help="the id `pretrain submit` printed")
    add_address(parser)


def run(args: argparse.Namespace) -> int:
    from cluster import submission

    info = submission.job_info(address(args), args.job_id)
    state = submission.status_name(info)
    lines = [f"{args.job_id}: {state}"]
    if info.message:
        lines.append(f"  message: {info.message}")
    for label, ms in (("started", info.start_time), ("ended", info.end_time)):
        if ms:
            when = datetime.datetime.fromtimestamp(ms / 1000).isoformat(sep=" ", timespec="seconds")
            lines.append(f"  {label}: {when}")
    if info.driver_exit_code is not None:
        lines.append(f"  exit code: {info.driver_exit_code}")
    print("\n".join(lines))
    return 0 if state in OK_STATES else 1
