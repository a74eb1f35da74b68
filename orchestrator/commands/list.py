"""`pretrain list [--address URL]`: every job on the cluster, oldest first: id, state, run name, start."""

from __future__ import annotations

import argparse
import datetime

from orchestrator.commands._jobs import add_address, address


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_address(parser)


def run(args: argparse.Namespace) -> int:
    from cluster import submission

    rows = [("JOB ID", "STATE", "RUN", "STARTED")]
    for job in submission.list_jobs(address(args)):
        started = datetime.datetime.fromtimestamp(job.start_time / 1000).isoformat(sep=" ", timespec="seconds") \
            if job.start_time else "-"
        rows.append((job.submission_id or job.job_id or "-", submission.status_name(job),
                     (job.metadata or {}).get("pretrain_run", "-"), started))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0
