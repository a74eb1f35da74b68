"""Reserve a whole gang at once, spread over exactly `resources.num_nodes` nodes, or a clear error.

A gang that starts some ranks and waits for the others wastes the GPUs it holds, so every rank's resources are
reserved in one placement group before any rank starts. The group has one bundle per node, holding that node's
`resources.gpus_per_node` ranks, and the bundles are STRICT_SPREAD: the run gets exactly the node count its spec
names (per-rank bundles under PACK put ranks that fit on one node all on one node). Before asking, the request is
checked against the nodes' totals: a reservation that can never be met fails at once, naming what is missing,
instead of pending forever.

A reservation is never left behind: the group is removed on every way out of the wait (met too late, refused
because a node died meanwhile, an exception, an interrupt), and a group the job still holds when it should not is
found by name (`pretrain-<run>-<ray job id>-…`) and removed before the next reservation. Otherwise a group left
pending would take a returning node's resources and the job's next reservation would wait on the job itself.

Ranks are numbered node by node, so consecutive ranks share a node: with tensor parallel innermost in the rank
order and context parallel next (rank = ((pp·dp_size + dp)·cp_size + cp)·tp + tp_rank, `parallel.parallel_dims`),
each tensor-parallel group and each context-parallel group (cp × tp consecutive ranks) stays inside a node
(validation makes resources.gpus_per_node a multiple of parallel.tp, and of cp × tp, on more than one node) and
pipeline stages span nodes. An expert-parallel group is ep consecutive ranks of dp × cp (`ParallelDims.build_mesh`),
ep × tp consecutive ranks in all: it stays inside a node too, or takes whole nodes when it is larger than one
(validation refuses one that would straddle nodes), so its all-to-alls of every MoE layer stay on NVLink first.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group

from orchestrator.errors import SchedulingError
from orchestrator.spec import JobSpec

PLACEMENT_TIMEOUT_S = 300.0
# How often a pending reservation looks again at the nodes alive (a node lost meanwhile makes it unmeetable).
RECHECK_S = 5.0
# A pending reservation says what holds the resources after its first recheck, then this often.
NOTICE_S = 60.0
# A pending reservation waits in slices this long: the driver of a job being stopped then handles its SIGTERM (and
# removes the group) within a second, before Ray's stop kills it outright three seconds on.
WAIT_SLICE_S = 1.0
# Group states that hold resources on nodes (a PENDING group holds none yet).
HOLDING = ("CREATED", "PREPARED", "RESCHEDULING")


@dataclass
class Gang:
    """A ready reservation: `nodes[r]` is the node of rank r, `bundles[r]` its node's bundle index in `group`;
    `bundle` is one rank's share of that bundle."""

    group: PlacementGroup
    bundle: dict[str, float]
    bundles: list[int]
    nodes: list[str]

    def local_ranks(self) -> tuple[list[int], list[int], list[int]]:
        """(local rank, ranks on the same node, node rank) of every rank."""
        order = list(dict.fromkeys(self.nodes))
        counts = {n: self.nodes.count(n) for n in order}
        seen: dict[str, int] = {}
        local = []
        for node in self.nodes:
            local.append(seen.get(node, 0))
            seen[node] = local[-1] + 1
        return local, [counts[n] for n in self.nodes], [order.index(n) for n in self.nodes]

    def describe(self) -> str:
        """Which nodes the ranks got: `node 1a2b3c4d (10.0.0.5): ranks 0-1; node 5e6f7a8b (10.0.0.6): ranks 2-3`."""
        addresses = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()}
        parts = []
        for node in dict.fromkeys(self.nodes):
            ranks = [r for r, n in enumerate(self.nodes) if n == node]
            span = f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else f"{ranks[0]}"
            parts.append(f"node {node[:8]} ({addresses.get(node, '?')}): rank{'s' if len(ranks) > 1 else ''} {span}")
        return "; ".join(parts)


def uses_gpus(spec: JobSpec, cluster: dict[str, float]) -> bool:
    """Ranks ask for a GPU each on cuda, and on auto when the cluster has any."""
    device = spec.resources.device
    return device == "cuda" or (device == "auto" and cluster.get("GPU", 0) > 0)


def bundle_on(spec: JobSpec, nodes: list[dict]) -> dict[str, float]:
    """One rank's bundle on these nodes (Ray's alive-node records): with GPUs when the spec and the nodes have them."""
    totals: dict[str, float] = {}
    for n in nodes:
        for k, v in n["Resources"].items():
            totals[k] = totals.get(k, 0.0) + v
    return rank_bundle(spec, uses_gpus(spec, totals))


def rank_bundle(spec: JobSpec, gpus: bool) -> dict[str, float]:
    bundle = {"CPU": spec.resources.cpus_per_rank}
    if gpus:
        bundle["GPU"] = 1.0
    return {k: v for k, v in bundle.items() if v > 0} or {"CPU": 0.01}


def node_capacity(bundle: dict[str, float], resources: dict[str, float]) -> int:
    """How many rank bundles fit on a node of these total resources."""
    return int(min(resources.get(k, 0.0) // v for k, v in bundle.items()))


def nodes_with_room(bundle: dict[str, float], ranks_per_node: int, nodes: Iterable[dict]) -> int:
    """How many of `nodes` can each host `ranks_per_node` ranks of `bundle` (a gang takes one bundle per node)."""
    return sum(node_capacity(bundle, n["Resources"]) >= ranks_per_node for n in nodes)


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def check_fits(bundle: dict[str, float], ranks: int, ranks_per_node: int, nodes: Iterable[dict]) -> None:
    """Raise `SchedulingError` when the cluster's nodes, even idle, cannot host `ranks` bundles, `ranks_per_node`
    on each of `ranks / ranks_per_node` different nodes."""
    nodes = list(nodes)
    wanted = ranks // ranks_per_node
    room = nodes_with_room(bundle, ranks_per_node, nodes)
    if room >= wanted:
        return
    shown = _amounts(bundle, ": ", sep=", ")
    lines = [
        f"{_node_name(n)}: " + ", ".join(f"{k} {n['Resources'].get(k, 0):g}" for k in bundle)
        + f" → {node_capacity(bundle, n['Resources'])} rank(s)"
        for n in nodes
    ]
    missing = {k: v * ranks - sum(n["Resources"].get(k, 0.0) for n in nodes) for k, v in bundle.items()}
    short = ", ".join(f"{v:g} {k}" for k, v in missing.items() if v > 0) or \
        f"{wanted - room} more node(s) with room for {ranks_per_node} rank(s)"
    raise SchedulingError(
        f"the job asks for {ranks} ranks ({wanted} node(s) × {ranks_per_node}) of {{{shown}}} each, but only {room} "
        f"of the cluster's {len(nodes)} node(s) can host {ranks_per_node}; missing: {short}.\n  "
        + "\n  ".join(lines)
        + "\nLower resources.num_nodes / resources.gpus_per_node / resources.cpus_per_rank or add nodes."
    )


def _node_name(node: dict) -> str:
    return f"node {node['NodeID'][:8]} ({node.get('NodeManagerAddress', '?')})"


def group_prefix(spec: JobSpec) -> str:
    """The name every placement group of this run in this Ray job starts with."""
    return f"pretrain-{spec.name}-{ray.get_runtime_context().get_job_id()}-"


def reserve_gang(spec: JobSpec, *, timeout_s: float = PLACEMENT_TIMEOUT_S,
                 notice: Callable[[str], None] | None = None) -> Gang:
    """Reserve `resources.num_nodes` nodes of `resources.gpus_per_node` ranks each, or raise `SchedulingError`
    naming what is short (and what holds it); no group is left behind when it raises. While it waits, `notice`
    hears what holds the resources, so a long wait is never silent."""
    r = spec.resources
    nodes = alive_nodes()
    bundle = bundle_on(spec, nodes)
    ranks = spec.world_size
    check_fits(bundle, ranks, r.gpus_per_node, nodes)
    per_node = {k: v * r.gpus_per_node for k, v in bundle.items()}
    strategy = "STRICT_PACK" if r.num_nodes == 1 else "STRICT_SPREAD"
    # A fresh name each time: the group of a gang that lost a node keeps its name until Ray has released the dead
    # node's bundles, which can come after the next reservation.
    group = placement_group([dict(per_node) for _ in range(r.num_nodes)], strategy=strategy,
                            name=f"{group_prefix(spec)}{uuid.uuid4().hex[:8]}")
    asked = f"the reservation of {r.num_nodes} node(s) × {{{_amounts(per_node, ' ')}}} ({strategy})"
    kept = False
    try:
        start = time.monotonic()
        deadline, checked, noticed = start + timeout_s, start, start - NOTICE_S + RECHECK_S
        while not group.wait(timeout_seconds=max(0.1, min(WAIT_SLICE_S, deadline - time.monotonic()))):
            now = time.monotonic()
            if now >= deadline:
                raise SchedulingError(f"{asked} was not met within {timeout_s:g} s; "
                                      f"{holders(bundle, group_prefix(spec), group)}")
            if now - checked < RECHECK_S:
                continue
            checked = now
            check_fits(bundle, ranks, r.gpus_per_node, alive_nodes())
            if notice is not None and now - noticed >= NOTICE_S:
                notice(f"{asked}: waiting {now - start:.0f} s; {holders(bundle, group_prefix(spec), group)}")
                noticed = now
        by_bundle = placement_group_table(group)["bundles_to_node_id"]
        gang = Gang(group=group, bundle=bundle, bundles=[rank // r.gpus_per_node for rank in range(ranks)],
                    nodes=[by_bundle[rank // r.gpus_per_node] for rank in range(ranks)])
        kept = True
        return gang
    finally:
        if not kept:
            _remove(group)


def holders(bundle: dict[str, float], own_prefix: str, waiting: PlacementGroup | None = None) -> str:
    """What holds the resources `bundle` asks for: free amounts, this job's own groups (by name), other groups,
    and what actors and tasks outside any group use."""
    keys = list(bundle)
    total, free = ray.cluster_resources(), ray.available_resources()
    skip = waiting.id.hex() if waiting is not None else None
    groups = [g for g in _live_groups() if g["placement_group_id"] != skip]
    own = [g for g in groups if g["name"].startswith(own_prefix)]
    others = [g for g in groups if not g["name"].startswith(own_prefix)]
    in_groups = {k: sum(_group_total(g, k) for g in groups if g["state"] in HOLDING) for k in keys}
    outside = {k: max(0.0, total.get(k, 0.0) - free.get(k, 0.0) - in_groups[k]) for k in keys}
    parts = [f"free now: {_amounts({k: free.get(k, 0.0) for k in keys}, ' ')}"]
    if own:
        parts.append("held by this job's own placement group(s), left from an earlier reservation: "
                     + ", ".join(_group_line(g, keys) for g in own))
    parts.append("by other jobs' placement groups: " + (", ".join(_group_line(g, keys) for g in others) or "none"))
    parts.append(f"by actors and tasks outside placement groups: {_amounts(outside, ' ')}")
    return "; ".join(parts)


def _live_groups() -> list[dict]:
    """Every placement group of the cluster not yet removed, as `placement_group_table` describes it."""
    return [g for g in placement_group_table().values() if g["state"] != "REMOVED"]


def _group_total(group: dict, key: str) -> float:
    return sum(b.get(key, 0.0) for b in group["bundles"].values())


def _group_line(group: dict, keys: list[str]) -> str:
    name = group["name"] or group["placement_group_id"][:8]
    return f"{name} ({group['state']}: {_amounts({k: _group_total(group, k) for k in keys}, ' ')})"


def _amounts(resources: dict[str, float], between: str, sep: str = ", ") -> str:
    return sep.join(f"{k}{between}{v:g}" for k, v in resources.items())


def release_leftovers(spec: JobSpec) -> list[str]:
    """Remove every placement group this run's Ray job still holds; return their names.

    Called where the job should hold none (before a re-reservation, at the end of a run), so no path that lost
    track of a group can make the job wait on its own resources.
    """
    prefix = group_prefix(spec)
    left = [g for g in _live_groups() if g["name"].startswith(prefix)]
    for g in left:
        _remove(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(g["placement_group_id"]))))
    return [g["name"] for g in left]


def release(gang: Gang) -> None:
    _remove(gang.group)


def _remove(group: PlacementGroup) -> None:
    # The group may already be gone with its node or with the cluster.
    with contextlib.suppress(Exception):
        remove_placement_group(group)
