"""The controller's decisions (failure policy, watchdog, stragglers, elastic re-plan) and its behaviour on a real
Ray cluster with a light gloo workload: a hung rank, a straggler. Killed ranks and a lost node, with the real
training loop, are in test_chaos.py. Every test on the cluster ends by checking, through Ray's state API, that no
placement group of a run is left while its driver is still connected (Ray would remove them when the driver
leaves)."""

from __future__ import annotations

import contextlib

import pytest

from orchestrator.elastic import plan_nodes, resize
from orchestrator.errors import SchedulingError
from orchestrator.failure_policy import Action, Cause, Failure, FailurePolicy
from orchestrator.layout_choice import apply_planner, layout_is_open
from orchestrator.stragglers import find_stragglers
from orchestrator.validate import load_spec, parse_spec
from orchestrator.watchdog import Watchdog

WORKLOAD = "tests.cluster.workloads:allreduce_steps"


def _spec(tmp_path=None, **sections):
    raw = {"name": "ctl", "schedule": {"steps": 8, "warmup_steps": 0},
           "resources": {"num_nodes": 2, "gpus_per_node": 1, "cpus_per_rank": 0.5, "restart_backoff_s": 0.1}}
    if tmp_path is not None:
        raw["checkpoint"] = {"dir": str(tmp_path / "checkpoints")}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return parse_spec(raw)


# ---------------------------------------------------------------------------------------------- decisions


def test_policy_backs_off_exponentially_then_gives_up():
    policy = FailurePolicy(max_restarts=3, backoff_s=0.5)
    decisions = [policy.decide(Failure(Cause.RANK_DIED, {1: "killed"})) for _ in range(4)]
    assert [d.action for d in decisions] == [Action.RESTART] * 3 + [Action.RAISE]
    assert [d.delay_s for d in decisions[:3]] == [0.5, 1.0, 2.0]
    assert "max_restarts=3" in decisions[-1].reason


def test_policy_raises_a_user_error_at_once():
    decision = FailurePolicy(max_restarts=5, backoff_s=1).decide(Failure(Cause.USER_ERROR, {0: "DataError: bad"}))
    assert decision.action is Action.RAISE


def test_watchdog_fires_only_when_no_rank_advances():
    now = [0.0]
    dog = Watchdog(10.0, startup_s=30.0, clock=lambda: now[0])
    now[0] = 25.0
    assert not dog.hung()  # still starting up
    dog.observe(0, 1)
    now[0] = 34.0
    dog.observe(1, 1)  # another rank reaching the same step is an advance of that rank
    now[0] = 43.0
    assert not dog.hung()
    dog.observe(0, 1)  # no new step
    now[0] = 44.5
    assert dog.hung()
    assert dog.stalled_for() == pytest.approx(10.5)


def test_stragglers_are_ranks_over_factor_times_the_others_median():
    assert find_stragglers({0: 1.0, 1: 1.1, 2: 0.9, 3: 2.0}, 1.5) == {3: pytest.approx(2.0)}
    assert find_stragglers({0: 1.0, 1: 2.0}, 1.5) == {1: pytest.approx(2.0)}  # of two, the median of all would say 1.33
    assert find_stragglers({0: 1.0, 1: 1.4}, 1.5) == {}
    assert find_stragglers({0: 5.0}, 1.5) == {}


def test_resize_keeps_the_global_batch():
    spec = _spec(parallel={"micro_batch_size": 2, "grad_accum": 2}, resources={"num_nodes": 2, "gpus_per_node": 2,
                                                                              "min_nodes": 1})
    assert (spec.parallel.dp, spec.parallel.global_batch_size) == (4, 16)
    half = resize(spec, 1)
    assert (half.parallel.dp, half.parallel.grad_accum, half.parallel.global_batch_size) == (2, 4, 16)
    assert half.world_size == 2


def test_plan_uses_the_nodes_left_down_to_min_nodes():
    node = {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 2.0}}
    spec = _spec(resources={"num_nodes": 2, "gpus_per_node": 2, "min_nodes": 1, "device": "cuda"})
    assert plan_nodes(spec, [node, node]) is spec
    assert plan_nodes(spec, [node]).resources.num_nodes == 1
    # Room for two nodes' ranks on one node is one node: the gang takes one bundle on each of distinct nodes.
    big, empty = {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 4.0}}, {"Alive": True, "Resources": {"CPU": 4.0}}
    assert plan_nodes(spec, [big, empty]).resources.num_nodes == 1
    strict = _spec(resources={"num_nodes": 2, "gpus_per_node": 2, "device": "cuda"})
    with pytest.raises(SchedulingError, match=r"room for 1 node\(s\) of 2 rank\(s\).*needs at least 2 "
                                              r"\(resources.min_nodes=0, resources.num_nodes=2\)"):
        plan_nodes(strict, [node])


def test_ranks_of_a_node_see_its_gpus_in_local_rank_order():
    from orchestrator.controller import _visible_devices

    assert _visible_devices(["a", "a", "b", "b"], [["3"], ["5"], ["1"], ["0"]]) == ["3,5", "3,5", "1,0", "1,0"]
    assert _visible_devices(["a", "a"], [[], []]) == [None, None]


def test_layout_is_open_only_when_no_split_is_given():
    assert layout_is_open({"model": {"dim": 64}})
    assert not layout_is_open({"parallel": {"tp": 1}})
    assert not layout_is_open({}, ["parallel.pp=2"])
    assert layout_is_open({"parallel": {"zero_stage": 3}}, ["optim.lr=1e-3"])


def test_planner_fills_an_open_layout_for_the_gpus_reserved(repo_root):
    spec = load_spec(repo_root / "examples" / "llama-1b.yaml", ["resources.num_nodes=2", "resources.gpus_per_node=8"])
    planned, reasons = apply_planner(spec, 80 * 2**30)
    p = planned.parallel
    assert p.dp * p.pp * p.tp == 16
    assert p.global_batch_size == spec.parallel.global_batch_size
    assert reasons[1].startswith("chosen: ")


# ---------------------------------------------------------------------------------------------- on a cluster


@contextlib.contextmanager
def _driver(cluster, **env: str):
    """This test process as a Ray driver; `env` becomes the job's environment, which its ranks inherit."""
    import ray

    ray.init(address=cluster.address, runtime_env={"env_vars": env})
    try:
        yield
        assert cluster.live_groups("pretrain-") == []
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_hung_rank_dumps_every_stack_then_restarts(ray_cluster, tmp_path, capsys):
    from cluster.metrics import RESTARTS
    from orchestrator.controller import Controller

    marker = tmp_path / "hung"
    controller = Controller(_spec(tmp_path, resources={"hang_timeout_s": 3.0}), entry=WORKLOAD)
    with _driver(ray_cluster, PRETRAIN_TEST_HANG=f"1:3:{marker}"):
        result = controller.run()
    out = capsys.readouterr().out
    assert marker.exists()
    assert "no rank advanced for 3 s; Python stacks of every rank:" in out
    assert "----- rank 0 pid" in out and "----- rank 1 pid" in out
    assert "in on_step" in out  # rank 1's loop thread, caught inside the heartbeat that hangs
    assert "in allreduce_steps" in out
    assert out.count("reserved 2 rank(s) on 2 node(s): node ") == 2  # before each attempt
    assert "attempt 1 failed: hang" in out
    assert "restarting in 0.1 s (restart 1 of 3, cause: hang)" in out
    assert result.restarts == 1 and result.step == 8
    assert controller.exporter.store.get(RESTARTS, run="ctl") == 1


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_straggler_is_reported_and_exported(ray_cluster, tmp_path, capsys):
    from cluster.metrics import STRAGGLER_RATIO
    from orchestrator.controller import Controller

    spec = _spec(tmp_path, schedule={"steps": 6}, resources={"straggler_factor": 1.2})
    controller = Controller(spec, entry=WORKLOAD)
    with _driver(ray_cluster, PRETRAIN_TEST_SLOW_RANK="1"):
        controller.run()
    out = capsys.readouterr().out
    # 3× the work of rank 0, over the other ranks' median; of all ranks' median it would be 1.5×
    assert "stragglers (busy time over 1.2× the other ranks' median): rank 1 3.00×" in out, out[-2000:]
    assert "no stragglers" not in out, "the ranks finishing one after the other are not news"
    node = "127.0.0.1"
    assert controller.exporter.store.get(STRAGGLER_RATIO, run="ctl", rank=1, node=node) == pytest.approx(3.0)
    assert controller.exporter.store.get(STRAGGLER_RATIO, run="ctl", rank=0, node=node) == pytest.approx(1 / 3)


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_stacks_of_an_unresponsive_rank_are_read_with_py_spy(ray_cluster):
    import ray

    from cluster.worker import RankWorker, stacks_from_outside

    with _driver(ray_cluster):
        actor = RankWorker.options(num_cpus=0).remote(7)
        info = ray.get(actor.describe.remote())
        text = stacks_from_outside(info["node_id"], info["pid"])
        ray.kill(actor)
    assert f"Process {info['pid']}: ray::RankWorker" in text
    assert "Thread " in text
