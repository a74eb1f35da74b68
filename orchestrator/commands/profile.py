"""`pretrain profile JOB_ID --steps N [--address URL]`: profile N steps of a running job, every rank, no restart.

    pretrain profile raysubmit_XYZ --steps 3 --address http://head:8265     a job `pretrain submit` started
    pretrain profile --checkpoint-dir runs/tiny/checkpoints --steps 3        any run (torchrun too), by checkpoint.dir

Each rank writes a torch.profiler trace (Chrome / Perfetto JSON) and, on GPUs, a CUDA memory snapshot to
<checkpoint.dir>/profiles/step_<S>/; the command drops a request file there, waits for the ranks' done marker and
prints the files (`parallel.profile_requests`, `parallel.profiling`). The checkpoint directory must be one this
machine sees: the run's own machine or a shared filesystem.

Exit codes: 0 the profile is written; 1 the run did not profile within --timeout (or its job ended); 2 wrong input.
"""

from __future__ import annotations

import argparse
import os
import time

from orchestrator.commands._jobs import add_address, address
from orchestrator.errors import PretrainError, UserError

MAX_STEPS = 1000
POLL_S = 0.5
JOB_CHECK_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id", nargs="?", help="the id `pretrain submit` printed (or give --checkpoint-dir)")
    parser.add_argument("--steps", type=int, default=2, help=f"steps to profile (1 to {MAX_STEPS}; default 2)")
    parser.add_argument("--checkpoint-dir", help="the run's checkpoint.dir, instead of a job id: for runs started "
                        "by torchrun, or to profile without asking the Jobs API")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the profile (default 600)")
    add_address(parser)


def run(args: argparse.Namespace) -> int:
    from parallel.profile_requests import REQUEST, find_done, profiles_dir, withdraw_request, write_request

    if not 1 <= args.steps <= MAX_STEPS:
        raise UserError(f"--steps: got {args.steps}, allowed 1 to {MAX_STEPS}")
    directory, still_running = _find_run(args)
    try:
        request_id = write_request(directory, args.steps)
    except FileExistsError as e:
        raise UserError(f"{e}: another profile request is waiting for this run; wait for it or remove the file") \
            from None
    except OSError as e:
        raise UserError(f"checkpoint dir {directory}: cannot write {REQUEST} there ({e.strerror or e})") from None
    print(f"asked for {args.steps} profiled steps in {profiles_dir(directory)}; waiting for the ranks", flush=True)
    deadline = time.monotonic() + args.timeout
    while (record := find_done(directory, request_id)) is None:
        if time.monotonic() > deadline or not still_running():
            taken = not withdraw_request(directory, request_id)
            why = "took the request but did not finish the profile" if taken else "did not take the request"
            raise PretrainError(f"the run {why} within {args.timeout:g} s (is it still training? a run checks for "
                                "requests once a second, between steps)")
        time.sleep(POLL_S)
    print(f"profiled steps {record['step']} to {record['step'] + record['steps'] - 1}:")
    for path in record["files"]:
        print(f"  {path}")
    return 0


def _find_run(args: argparse.Namespace):
    """The run's checkpoint directory, and a check of whether its job still runs."""
    if args.checkpoint_dir:
        if args.job_id:
            raise UserError("give a job id or --checkpoint-dir, not both")
        return _local(args.checkpoint_dir, "--checkpoint-dir"), lambda: True
    if not args.job_id:
        raise UserError("which run? give the job id `pretrain submit` printed, or --checkpoint-dir for a run "
                        "started otherwise")
    import yaml

    from cluster import submission

    where = address(args)
    info = submission.job_info(where, args.job_id)
    state = submission.status_name(info)
    if state not in ("PENDING", "RUNNING"):
        raise UserError(f"job {args.job_id} is {state}: profiles are taken from a running job")
    text = ((info.runtime_env or {}).get("env_vars") or {}).get(submission.SPEC_VARIABLE)
    if not text:
        raise UserError(f"job {args.job_id} was not started by `pretrain submit` (no {submission.SPEC_VARIABLE} in "
                        "its environment); give the run's --checkpoint-dir instead")
    directory = _local(yaml.safe_load(text)["checkpoint"]["dir"], f"job {args.job_id}'s checkpoint.dir")
    checked = [time.monotonic()]

    def still_running() -> bool:
        if time.monotonic() - checked[0] < JOB_CHECK_S:
            return True
        checked[0] = time.monotonic()
        return submission.status_name(submission.job_info(where, args.job_id)) in ("PENDING", "RUNNING")

    return directory, still_running


def _local(directory: str, what: str) -> str:
    if "://" in directory:
        raise UserError(f"{what} {directory!r} is remote: profiles are written beside checkpoints on a local or "
                        "mounted filesystem")
    if not os.path.isdir(directory):
        raise UserError(f"{what} {directory!r}: no such directory here; run the command where the checkpoints are "
                        "(the run's machine, or one sharing its filesystem)")
    return directory
