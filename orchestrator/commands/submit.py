"""`pretrain submit job.yaml [overrides] [--address URL]`: run a job on a Ray cluster.

Without --address an embedded Ray starts on this machine (loopback only) and the controller runs in this process:
the run lives as long as the command. With --address the controller is submitted through the cluster's Jobs
API; the command follows the job's log until it ends (--no-wait: print the job id and return).

Relative paths in the spec (data.path, checkpoint.dir, ...) are made absolute here: a cluster sees them only on
a shared filesystem, so prefer absolute paths or URIs (s3://, gs://) for remote clusters.

The address and, for a local run, the data directory are checked before anything starts; a remote run's data is
checked by the controller on the head node, before it reserves anything.

Exit codes: 0 the run finished, 1 it failed, 2 the input was wrong, 130 interrupted (a submitted job keeps running).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from orchestrator.spec import JobSpec

EXIT_CODES = {"SUCCEEDED": 0, "STOPPED": 1, "FAILED": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="job spec YAML")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--address", help="the cluster's Jobs API (http://head:8265); none: an embedded local Ray")
    parser.add_argument("--no-wait", action="store_true", help="with --address: print the job id and return")
    parser.add_argument("--job-id", help="with --address: the submission id to use (default: Ray picks one)")


def run(args: argparse.Namespace) -> int:
    from cluster.submission import check_address
    from orchestrator.layout_choice import layout_is_open
    from orchestrator.preflight import check_data
    from orchestrator.validate import load_spec, load_yaml

    if args.address is not None:
        check_address(args.address)
    spec = absolute_paths(load_spec(args.spec, args.overrides))
    plan = layout_is_open(load_yaml(args.spec), args.overrides)
    if args.address is None:
        check_data(spec)
        return _run_local(spec, plan)
    return _run_remote(spec, plan, args)


# Every setting of the spec that names a local file or directory (or an object-store URI, which stays).
PATH_SETTINGS = ("data.path", "data.cache_dir", "checkpoint.dir", "checkpoint.init_from", "metrics.targets_file",
                 "metrics.tensorboard.dir", "metrics.wandb.dir", "eval.include_path")


def absolute_paths(spec: JobSpec) -> JobSpec:
    """Make the spec's local paths absolute against this directory; URIs stay."""
    for dotted in PATH_SETTINGS:
        *sections, key = dotted.split(".")
        owner = functools.reduce(getattr, sections, spec)
        value = getattr(owner, key)
        if value and "://" not in value:
            setattr(owner, key, os.path.abspath(value))
    return spec


def _run_local(spec: JobSpec, plan: bool) -> int:
    from cluster.local import apply_local_env, local_cluster

    apply_local_env()  # before the controller imports Ray, which reads the variables once
    from orchestrator.controller import Controller

    with local_cluster():
        Controller(spec, plan_layout=plan).run()
    return 0


def _run_remote(spec: JobSpec, plan: bool, args: argparse.Namespace) -> int:
    from cluster import submission

    job_id = submission.submit(args.address, spec, plan_layout=plan, submission_id=args.job_id)
    print(f"pretrain submit: job {job_id} submitted to {args.address}", flush=True)
    if args.no_wait:
        print(job_id)
        return 0
    try:
        submission.follow(args.address, job_id)
    except KeyboardInterrupt:
        print(f"pretrain submit: job {job_id} keeps running; `pretrain stop {job_id} --address {args.address}` "
              "stops it", file=sys.stderr)
        raise
    info = submission.job_info(args.address, job_id)
    status = submission.status_name(info)
    print(f"pretrain submit: job {job_id} {status}" + (f": {info.message}" if info.message else ""), flush=True)
    if status == "FAILED" and info.driver_exit_code == 2:
        return 2
    return EXIT_CODES.get(status, 1)
