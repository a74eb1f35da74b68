"""`pretrain submit|status|logs|stop|list` against a real Ray Jobs API, and their messages for wrong input."""

from __future__ import annotations

import time

import pytest
import yaml

from orchestrator.cli import main


def _write_spec(tmp_path, **resources) -> str:
    spec = {"name": "sub", "checkpoint": {"dir": str(tmp_path / "checkpoints")},
            "resources": {"num_nodes": 2, "gpus_per_node": 1, "cpus_per_rank": 0.5, **resources}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_unreachable_cluster_is_a_usage_error(tmp_path, capsys):
    assert main(["submit", _write_spec(tmp_path), "--address", "http://127.0.0.1:9"]) == 2
    assert "pretrain submit: cannot reach the Ray Jobs API at http://127.0.0.1:9" in capsys.readouterr().err


def test_job_commands_need_an_address(monkeypatch, capsys):
    monkeypatch.delenv("PRETRAIN_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["status", "raysubmit_x"]) == 2
    assert "pretrain status: no cluster address: pass --address http://HEAD:8265" in capsys.readouterr().err


def test_bad_spec_is_reported_before_submitting(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("resources: {num_nodes: 0}\n")
    assert main(["submit", str(path), "--address", "http://127.0.0.1:9"]) == 2
    assert "resources.num_nodes: got 0, must be ≥ 1" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_job_larger_than_the_cluster_fails_fast_and_is_listed(ray_cluster, tmp_path, capsys):
    url = ray_cluster.jobs_url
    start = time.monotonic()
    assert main(["submit", _write_spec(tmp_path, gpus_per_node=2), "--address", url, "--job-id", "too-big"]) == 1
    elapsed = time.monotonic() - start
    out = capsys.readouterr().out
    assert "the job asks for 4 ranks (2 node(s) × 2) of {CPU: 0.5, GPU: 1} each, but the cluster's 3 node(s) can " \
           "host only 2; missing: 2 GPU" in out
    assert "pretrain submit: job too-big FAILED" in out
    assert elapsed < 60, f"{elapsed:.0f} s"

    assert main(["status", "too-big", "--address", url]) == 1
    assert "too-big: FAILED" in capsys.readouterr().out
    assert main(["logs", "too-big", "--address", url]) == 0
    assert "missing: 2 GPU" in capsys.readouterr().out
    assert main(["list", "--address", url]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["too-big", "FAILED", "sub"] in [row[:3] for row in rows]
    assert main(["stop", "too-big", "--address", url]) == 0
    assert "too-big: already ended" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_unknown_job_id_names_the_cluster(ray_cluster, capsys):
    assert main(["status", "no-such-job", "--address", ray_cluster.jobs_url]) == 2
    assert f"no job 'no-such-job' on {ray_cluster.jobs_url}" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_stop_ends_a_running_job(ray_cluster, tmp_path, capsys):
    """A job waiting for GPUs another driver holds is RUNNING until stopped."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from cluster import submission

    url = ray_cluster.jobs_url
    ray.init(address=ray_cluster.address)
    held = placement_group([{"GPU": 1}, {"GPU": 1}])
    try:
        ray.get(held.ready(), timeout=60)
        assert main(["submit", _write_spec(tmp_path), "--address", url, "--no-wait", "--job-id", "waiting"]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == "waiting"
        deadline = time.monotonic() + 60
        while submission.status_name(submission.job_info(url, "waiting")) != "RUNNING":
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert main(["status", "waiting", "--address", url]) == 0
        assert main(["stop", "waiting", "--address", url]) == 0
        assert "waiting: stopping" in capsys.readouterr().out
        while submission.status_name(submission.job_info(url, "waiting")) == "RUNNING":
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert main(["status", "waiting", "--address", url]) == 1
        assert "waiting: STOPPED" in capsys.readouterr().out
    finally:
        remove_placement_group(held)
        ray.shutdown()
