"""`pretrain submit|status|logs|stop|list` against a real Ray Jobs API, and their messages for wrong input: an address
of a scheme the Jobs API does not speak, and a data directory that is missing or holds no manifest (locally at
once; on a cluster, from the controller before it reserves anything)."""

from __future__ import annotations

import functools
import re
import time

import pytest
import yaml

from cluster.placement import PLACEMENT_TIMEOUT_S
from orchestrator.cli import main


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tests.shards import write_shards

    return write_shards(tmp_path_factory.mktemp("submit") / "shards", seq_len=32, rows=20)


def _write_spec(tmp_path, data=None, **resources) -> str:
    spec = {"name": "sub", "checkpoint": {"dir": str(tmp_path / "checkpoints")},
            "resources": {"num_nodes": 2, "gpus_per_node": 1, "cpus_per_rank": 0.5, **resources}}
    if data is not None:
        spec["data"] = {"path": str(data), "seq_len": 32}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_unreachable_cluster_is_a_usage_error(tmp_path, capsys):
    assert main(["submit", _write_spec(tmp_path), "--address", "http://127.0.0.1:9"]) == 2
    assert "pretrain submit: cannot reach the Ray Jobs API at http://127.0.0.1:9" in capsys.readouterr().err


@pytest.mark.parametrize("address", ["ray://127.0.0.1:10001", "grpc://127.0.0.1:8265"])
def test_address_of_another_scheme_is_refused_at_once(tmp_path, capsys, address):
    start = time.monotonic()
    assert main(["submit", _write_spec(tmp_path), "--address", address]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 5
    scheme = address.split(":")[0]
    assert re.search(rf"pretrain submit: cluster address '{address}': the Ray Jobs API is reached over http:// or "
                     rf"https://, e.g. http://HEAD:8265 .*; {scheme}:// is not accepted", err), err
    assert ("Ray Client port" in err) == (scheme == "ray")
    assert main(["status", "some-job", "--address", address]) == 2
    assert f"pretrain status: cluster address '{address}'" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["directory", "manifest"])
def test_local_run_without_its_data_is_refused_before_ray_starts(tmp_path, capsys, missing):
    data = tmp_path / "shards"
    if missing == "manifest":
        data.mkdir()
    start = time.monotonic()
    assert main(["submit", _write_spec(tmp_path, data)]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 5
    expected = {"directory": f"data.path: the directory '{data}' does not exist on ",
                "manifest": f"data.path: '{data}' holds no manifest.json, so it is not the output of `pretrain prep`"}
    assert expected[missing] in err, err
    assert not (tmp_path / "checkpoints").exists()


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
def test_job_larger_than_the_cluster_fails_fast_and_is_listed(ray_cluster, shards, tmp_path, capsys):
    url = ray_cluster.jobs_url
    start = time.monotonic()
    spec = _write_spec(tmp_path, shards, gpus_per_node=2)
    assert main(["submit", spec, "--address", url, "--job-id", "too-big"]) == 1
    elapsed = time.monotonic() - start
    out = capsys.readouterr().out
    assert "the job asks for 4 ranks (2 node(s) × 2) of {CPU: 0.5, GPU: 1} each, but only 0 of the cluster's 3 " \
           "node(s) can host 2; missing: 2 GPU" in out
    assert "pretrain submit: job too-big FAILED" in out
    assert elapsed < PLACEMENT_TIMEOUT_S / 5, f"{elapsed:.0f} s: it waited for the reservation"

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
def test_submitted_job_without_its_data_fails_before_reserving(ray_cluster, tmp_path, capsys):
    data = tmp_path / "not-there"
    start = time.monotonic()
    assert main(["submit", _write_spec(tmp_path, data), "--address", ray_cluster.jobs_url, "--job-id", "no-data"]) == 2
    elapsed = time.monotonic() - start
    out = capsys.readouterr().out
    assert f"pretrain: data.path: the directory '{data}' does not exist on " in out, out
    assert "reserved" not in out and "rank 0" not in out
    assert elapsed < PLACEMENT_TIMEOUT_S / 5, f"{elapsed:.0f} s: it waited for the reservation"


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_unknown_job_id_names_the_cluster(ray_cluster, capsys):
    assert main(["status", "no-such-job", "--address", ray_cluster.jobs_url]) == 2
    assert f"no job 'no-such-job' on {ray_cluster.jobs_url}" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_stop_ends_a_running_job(ray_cluster, shards, tmp_path, capsys):
    """A job waiting for GPUs another driver holds is RUNNING until stopped."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from cluster import submission

    url = ray_cluster.jobs_url
    ray.init(address=ray_cluster.address)
    held = placement_group([{"GPU": 1}, {"GPU": 1}])
    try:
        ray.get(held.ready(), timeout=60)
        spec = _write_spec(tmp_path, shards)
        assert main(["submit", spec, "--address", url, "--no-wait", "--job-id", "waiting"]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == "waiting"
        deadline = time.monotonic() + 60
        while submission.status_name(submission.job_info(url, "waiting")) != "RUNNING":
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert main(["status", "waiting", "--address", url]) == 0
        # `pretrain profile` finds the job's checkpoint.dir through the Jobs API and leaves its request there; a job
        # with no rank training yet never takes it, and the request is withdrawn.
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        assert main(["profile", "waiting", "--address", url, "--steps", "1", "--timeout", "1"]) == 1
        profiles = tmp_path / "checkpoints" / "profiles"
        assert f"in {profiles};" in capsys.readouterr().out and not (profiles / "request.json").exists()
        assert main(["stop", "waiting", "--address", url]) == 0
        assert "waiting: stopping" in capsys.readouterr().out
        while submission.status_name(submission.job_info(url, "waiting")) == "RUNNING":
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert main(["status", "waiting", "--address", url]) == 1
        assert "waiting: STOPPED" in capsys.readouterr().out
        assert main(["profile", "waiting", "--address", url]) == 2
        assert "job waiting is STOPPED: profiles are taken from a running job" in capsys.readouterr().err
        gone = time.monotonic() + 30
        while ray_cluster.live_groups("pretrain-sub-"):  # the stopped job's pending reservation goes with it
            assert time.monotonic() < gone, ray_cluster.live_groups("pretrain-sub-")
            time.sleep(0.5)
    finally:
        remove_placement_group(held)
        ray.shutdown()


def test_every_local_path_of_the_spec_is_made_absolute_and_uris_stay(tmp_path, monkeypatch):
    """A submitted run's ranks start in another directory: each path setting must reach them absolute. Every string
    setting named like a path is in the list, so a new one cannot be forgotten."""
    from dataclasses import fields, is_dataclass

    from orchestrator.commands.submit import PATH_SETTINGS, absolute_paths
    from orchestrator.validate import parse_spec

    def string_settings(node, prefix=""):
        for f in fields(node):
            value = getattr(node, f.name)
            if is_dataclass(value):
                yield from string_settings(value, f"{prefix}{f.name}.")
            elif isinstance(value, str):
                yield f"{prefix}{f.name}"

    named_like_paths = {s for s in string_settings(parse_spec({}))
                        if re.search(r"(^|_)(dir|path|file)$|init_from$", s.rsplit(".", 1)[-1])}
    assert named_like_paths == set(PATH_SETTINGS)
    monkeypatch.chdir(tmp_path)
    relative = [f"{s}=rel/{i}" for i, s in enumerate(PATH_SETTINGS) if s != "data.path"]
    spec = parse_spec({}, overrides=relative)
    spec.data.path = "s3://bucket/shards"  # set after validation, which would reach for the store
    spec = absolute_paths(spec)
    assert spec.data.path == "s3://bucket/shards"
    for i, dotted in enumerate(PATH_SETTINGS):
        if dotted != "data.path":
            assert functools.reduce(getattr, dotted.split("."), spec) == str(tmp_path / "rel" / str(i)), dotted
