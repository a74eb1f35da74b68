"""The simulated cluster's jobs run on it, not on whichever other Ray instance the machine happens to host."""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

DRIVER = "python -c 'import ray; ray.init(); print(\"GCS\", ray.get_runtime_context().gcs_address)'"


def test_job_drivers_join_their_cluster_while_another_ray_instance_runs(ray_cluster):
    from ray.cluster_utils import Cluster
    from ray.job_submission import JobStatus, JobSubmissionClient

    # Started last, it is the one /tmp/ray names; with two GCS processes running, a driver without its cluster's
    # address picks one of them at random, so three drivers would all pick right by chance one time in eight.
    other = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
    client = JobSubmissionClient(ray_cluster.jobs_url)
    try:
        jobs = [client.submit_job(entrypoint=DRIVER) for _ in range(3)]
        for job in jobs:
            deadline = time.monotonic() + 120
            while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
                assert time.monotonic() < deadline, client.get_job_logs(job)
                time.sleep(0.5)
            logs = client.get_job_logs(job)
            assert f"GCS {ray_cluster.address}" in logs, logs
    finally:
        other.shutdown()


def test_starts_where_ray_never_ran(tmp_path, monkeypatch):
    """Ray's `Cluster` writes the current-cluster file into Ray's default temp dir, which a fresh machine lacks."""
    from cluster.testing import SimulatedCluster

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # the default temp dir is now tmp_path/ray, not made yet
    cluster = SimulatedCluster(nodes=0)
    try:
        assert (tmp_path / "ray" / "ray_current_cluster").read_text() == cluster.address
    finally:
        cluster.shutdown()
