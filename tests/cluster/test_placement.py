"""Gang placement: one bundle per rank packed by node, tensor-parallel groups inside a node, and a request the
cluster can never meet failing at once with what is missing."""

from __future__ import annotations

import time

import pytest

from cluster.placement import Gang, check_fits, node_capacity, rank_bundle, uses_gpus
from orchestrator.errors import SchedulingError
from orchestrator.validate import parse_spec


def _spec(**resources):
    return parse_spec({"name": "place", "resources": {"cpus_per_rank": 0.5, **resources}})


def _node(node_id: str, **resources: float) -> dict:
    return {"NodeID": node_id, "NodeManagerAddress": "10.0.0.1", "Alive": True, "Resources": resources}


def test_bundle_asks_for_a_gpu_only_when_the_run_uses_them():
    assert rank_bundle(_spec(device="cuda"), True) == {"CPU": 0.5, "GPU": 1.0}
    assert rank_bundle(_spec(device="cpu"), False) == {"CPU": 0.5}
    assert uses_gpus(_spec(device="auto"), {"CPU": 8, "GPU": 2})
    assert not uses_gpus(_spec(device="auto"), {"CPU": 8})
    assert not uses_gpus(_spec(device="cpu"), {"CPU": 8, "GPU": 2})


def test_node_capacity_is_set_by_the_scarcest_resource():
    assert node_capacity({"CPU": 0.5, "GPU": 1.0}, {"CPU": 8, "GPU": 2}) == 2
    assert node_capacity({"CPU": 4.0, "GPU": 1.0}, {"CPU": 8, "GPU": 8}) == 2
    assert node_capacity({"CPU": 1.0, "GPU": 1.0}, {"CPU": 8}) == 0


def test_a_request_larger_than_the_cluster_names_what_is_missing():
    nodes = [_node("a" * 16, CPU=8, GPU=2), _node("b" * 16, CPU=8, GPU=2)]
    check_fits({"CPU": 1.0, "GPU": 1.0}, 4, 2, nodes)
    with pytest.raises(SchedulingError, match=r"asks for 8 ranks \(2 node\(s\) × 4\).*can host only 4; "
                                              r"missing: 4 GPU") as e:
        check_fits({"CPU": 1.0, "GPU": 1.0}, 8, 4, nodes)
    assert "node aaaaaaaa (10.0.0.1): CPU 8, GPU 2 → 2 rank(s)" in str(e.value)


def test_local_ranks_count_within_each_node():
    gang = Gang(group=None, bundle={"GPU": 1.0}, bundles=[0, 1, 2, 3], nodes=["x", "x", "y", "y"])
    assert gang.local_ranks() == ([0, 1, 0, 1], [2, 2, 2, 2], [0, 0, 1, 1])


@pytest.fixture
def driver(ray_cluster):
    import ray

    ray.init(address=ray_cluster.address)
    yield ray_cluster
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_gang_takes_one_gpu_bundle_on_each_node(driver):
    from cluster.placement import release, reserve_gang

    gang = reserve_gang(_spec(num_nodes=2, gpus_per_node=1))
    try:
        assert gang.bundle == {"CPU": 0.5, "GPU": 1.0}
        assert len(set(gang.nodes)) == 2
        assert gang.local_ranks() == ([0, 0], [1, 1], [0, 1])
    finally:
        release(gang)


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_tensor_parallel_group_split_over_nodes_is_refused(driver):
    from cluster.placement import reserve_gang

    spec = parse_spec({"resources": {"num_nodes": 2, "gpus_per_node": 1, "cpus_per_rank": 0.5},
                       "parallel": {"tp": 2}})
    with pytest.raises(SchedulingError, match=r"ranks 0\.\.1 form a tensor-parallel group \(parallel.tp=2\) but Ray "
                                              r"placed them on 2 nodes"):
        reserve_gang(spec)


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_reservation_beyond_the_cluster_fails_within_seconds(driver):
    from cluster.placement import reserve_gang

    start = time.monotonic()
    with pytest.raises(SchedulingError, match=r"(?s)asks for 4 ranks \(2 node\(s\) × 2\).*can host only 2; "
                                              r"missing: 2 GPU.*add nodes"):
        reserve_gang(_spec(num_nodes=2, gpus_per_node=2))
    assert time.monotonic() - start < 5
