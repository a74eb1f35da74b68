"""Gang placement: one bundle per node on exactly resources.num_nodes nodes, a
request the cluster can never meet failing at once with what is missing, and no placement group left behind by a
reservation that fails (refused while pending, or not met in time: then the message names what holds the
resources)."""

from __future__ import annotations

import re
import threading
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
    with pytest.raises(SchedulingError, match=r"asks for 8 ranks \(2 node\(s\) × 4\).*only 0 of the cluster's 2 "
                                              r"node\(s\) can host 4; missing: 4 GPU") as e:
        check_fits({"CPU": 1.0, "GPU": 1.0}, 8, 4, nodes)
    assert "node aaaaaaaa (10.0.0.1): CPU 8, GPU 2 → 2 rank(s)" in str(e.value)


def test_room_in_total_but_not_on_enough_nodes_is_refused():
    """Four GPUs in all, but the spec's two nodes of two ranks each need two nodes with two GPUs."""
    nodes = [_node("a" * 16, CPU=8, GPU=3), _node("b" * 16, CPU=8, GPU=1)]
    with pytest.raises(SchedulingError, match=r"only 1 of the cluster's 2 node\(s\) can host 2; missing: 1 more "
                                              r"node\(s\) with room for 2 rank\(s\)"):
        check_fits({"CPU": 1.0, "GPU": 1.0}, 4, 2, nodes)


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
def test_reservation_beyond_the_cluster_fails_within_seconds(driver):
    from cluster.placement import reserve_gang

    start = time.monotonic()
    with pytest.raises(SchedulingError, match=r"(?s)asks for 4 ranks \(2 node\(s\) × 2\).*only 0 of the "
                                              r"cluster's 3 node\(s\) can host 2; missing: 2 GPU.*add nodes"):
        reserve_gang(_spec(num_nodes=2, gpus_per_node=2))
    assert time.monotonic() - start < 5


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_num_nodes_spreads_ranks_that_would_fit_on_one_node(driver):
    """Two CPU ranks of half a CPU fit on any one node of the cluster; num_nodes=2 still gets two nodes."""
    from cluster.placement import release, reserve_gang

    for nodes, per_node, expected in ((2, 1, 2), (1, 2, 1)):
        gang = reserve_gang(_spec(device="cpu", num_nodes=nodes, gpus_per_node=per_node))
        try:
            assert len(set(gang.nodes)) == expected, gang.nodes
            assert gang.describe().count("node ") == expected
        finally:
            release(gang)


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_unmet_reservation_names_the_jobs_own_group_and_leaves_nothing(driver, monkeypatch):
    """A group of the run left from an earlier reservation holds both GPUs: the reservation says so while it waits
    (after its first recheck, 1 s here) and when it times out, removes its own pending group, and
    `release_leftovers` removes the old one."""
    from ray.util.placement_group import placement_group

    from cluster import placement
    from cluster.placement import group_prefix, release_leftovers, reserve_gang

    monkeypatch.setattr(placement, "RECHECK_S", 1.0)

    spec = _spec(num_nodes=2, gpus_per_node=1)
    leftover = placement_group([{"GPU": 1.0}, {"GPU": 1.0}], strategy="STRICT_SPREAD", name=f"{group_prefix(spec)}old")
    assert leftover.wait(60)
    holder = (r"free now: CPU [\d.]+, GPU 0; held by this job's own placement group\(s\), left from an earlier "
              r"reservation: pretrain-place-\w+-old \(CREATED: CPU 0, GPU 2\); by other jobs' placement groups: none")
    notices: list[str] = []
    start = time.monotonic()
    with pytest.raises(SchedulingError, match=r"the reservation of 2 node\(s\) × \{CPU 0\.5, GPU 1\} \(STRICT_SPREAD\) "
                                              rf"was not met within 6 s; {holder}"):
        reserve_gang(spec, timeout_s=6.0, notice=notices.append)
    assert time.monotonic() - start < 15
    assert len(notices) == 1 and re.match(rf"the reservation .* waiting \d+ s; {holder}", notices[0]), notices
    assert driver.live_groups("pretrain-place-") == [f"{group_prefix(spec)}old"]
    assert release_leftovers(spec) == [f"{group_prefix(spec)}old"]
    assert driver.live_groups("pretrain-place-") == []


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_reservation_refused_while_pending_leaves_no_group(driver):
    """Three one-GPU nodes, one GPU held elsewhere: the reservation pends; the third node dies meanwhile, so it can
    never be met: it is refused, and its pending group goes with the refusal."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from cluster.placement import reserve_gang

    driver.add_node()
    held = placement_group([{"GPU": 1.0}])
    assert held.wait(60)
    raised: list[BaseException] = []

    def reserve() -> None:
        try:
            reserve_gang(_spec(num_nodes=3, gpus_per_node=1), timeout_s=120.0)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            raised.append(e)

    waiting = threading.Thread(target=reserve)
    try:
        waiting.start()
        deadline = time.monotonic() + 30
        while driver.live_groups("pretrain-place-") == []:
            assert time.monotonic() < deadline, "the reservation never asked for a group"
            time.sleep(0.2)
        driver.kill_node()
        waiting.join(timeout=60)
    finally:
        remove_placement_group(held)
    assert not waiting.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], SchedulingError), raised
    assert "only 2 of the cluster's 3 node(s) can host 1" in str(raised[0])
    assert driver.live_groups("pretrain-place-") == []
