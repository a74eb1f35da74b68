"""Submit, watch and stop runs on a Ray cluster through its Jobs API (http://head:8265).

A submitted run is the controller (`python -m orchestrator.controller`) started as a Ray job on the head node;
its runtime_env carries the resolved job spec in `PRETRAIN_SPEC`, so nothing has to be copied to the cluster
beforehand. The code itself comes with the cluster's image (the `pretrain` package installed there).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Mapping
from typing import TextIO

from cluster.local import LOG_ENV
from orchestrator.errors import UserError
from orchestrator.spec import JobSpec, spec_to_yaml

SPEC_VARIABLE = "PRETRAIN_SPEC"
PLAN_VARIABLE = "PRETRAIN_PLAN_LAYOUT"
ENTRYPOINT = "python -m orchestrator.controller"
AGENT_WAIT_S = 60.0
SCHEMES = ("http", "https")


def check_address(address: str) -> str:
    """`address` as a Jobs API URL (`host:port` becomes http://host:port), or a `UserError` naming the schemes
    accepted. Ray's client would take ray:// and other forms too, but only after tens of seconds of trying to
    reach a GCS there."""
    if "://" not in address:
        return f"http://{address}"
    scheme = address.split("://", 1)[0]
    if scheme.lower() in SCHEMES:
        return address
    hint = " (ray:// is the Ray Client port, usually 10001, which job submission does not use)" \
        if scheme == "ray" else ""
    raise UserError(f"cluster address {address!r}: the Ray Jobs API is reached over http:// or https://, e.g. "
                    f"http://HEAD:8265 (the head's dashboard port), or as HEAD:8265; {scheme}:// is not "
                    f"accepted{hint}")


def connect(address: str):
    """A JobSubmissionClient for `address`, or a `UserError` saying the Jobs API cannot be reached there."""
    from ray.job_submission import JobSubmissionClient

    address = check_address(address)
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(
            f"cannot reach the Ray Jobs API at {address}: {str(e).splitlines()[0]} "
            "(the head's dashboard port, usually 8265; start it with `ray start --head --dashboard-host=0.0.0.0`)"
        ) from None


def submit(address: str, spec: JobSpec, *, plan_layout: bool = False, env: Mapping[str, str] | None = None,
           submission_id: str | None = None) -> str:
    """Start the run's controller as a Ray job; return its job id. `plan_layout`: the spec left the layout open."""
    client = connect(address)
    # LOG_ENV: read by Ray when the driver and the workers import it, so it must be in their environment from the start.
    variables = {**LOG_ENV, SPEC_VARIABLE: spec_to_yaml(spec), PLAN_VARIABLE: "1" if plan_layout else "0"}
    runtime_env = {"env_vars": {**variables, **(env or {})}}
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(entrypoint=ENTRYPOINT, runtime_env=runtime_env, submission_id=submission_id,
                                     metadata={"pretrain_run": spec.name})
        except RuntimeError as e:
            # A head that just started answers before its job agent is up.
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def job_info(address: str, job_id: str):
    """The job's JobDetails (status, message, driver exit code), or a `UserError` for an unknown id."""
    client = connect(address)
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            known = f"`pretrain list --address {address}` shows the jobs there"
            raise UserError(f"no job {job_id!r} on {address} ({known})") from None
        raise


def stop(address: str, job_id: str) -> bool:
    """Ask the job to stop; False when it had already ended."""
    job_info(address, job_id)
    return connect(address).stop_job(job_id)


def list_jobs(address: str) -> list:
    """Every job the cluster knows, oldest first."""
    return sorted(connect(address).list_jobs(), key=lambda j: j.start_time or 0)


def logs(address: str, job_id: str) -> str:
    job_info(address, job_id)
    return connect(address).get_job_logs(job_id)


def follow(address: str, job_id: str, out: TextIO | None = None) -> None:
    """Print the job's log as it grows, until the job ends."""
    job_info(address, job_id)
    client = connect(address)
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())


def status_name(info) -> str:
    """A job's state as a plain word: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return getattr(info.status, "value", str(info.status))
