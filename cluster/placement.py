"""Reserve a whole gang at once: one placement-group bundle per rank, packed by node, or a clear error.

A gang that starts some ranks and waits for the others wastes the GPUs it holds, so every rank's resources are
reserved in one placement group before any rank starts. Before asking, the request is checked against the nodes'
totals: a reservation that can never be met (more GPUs than the cluster has) fails at once, naming what is
missing, instead of pending forever.

Ranks are numbered node by node over the bundles Ray actually placed, so consecutive ranks share a node: with
tensor parallel innermost in the rank order (rank = (pp·dp_size + dp)·tp + tp_rank), each tensor-parallel group stays
inside a node and pipeline stages span nodes.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group

from orchestrator.errors import SchedulingError
from orchestrator.spec import JobSpec

PLACEMENT_TIMEOUT_S = 300.0


@dataclass
class Gang:
    """A ready reservation: `nodes[r]` is the node of rank r, `bundles[r]` its bundle index in `group`."""

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


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def check_fits(bundle: dict[str, float], ranks: int, ranks_per_node: int, nodes: Iterable[dict]) -> None:
    """Raise `SchedulingError` when the cluster's nodes, even idle, cannot host `ranks` bundles."""
    nodes = list(nodes)
    fits = [node_capacity(bundle, n["Resources"]) for n in nodes]
    if sum(fits) >= ranks:
        return
    shown = ", ".join(f"{k}: {v:g}" for k, v in bundle.items())
    lines = [
        f"{_node_name(n)}: " + ", ".join(f"{k} {n['Resources'].get(k, 0):g}" for k in bundle) + f" → {f} rank(s)"
        for n, f in zip(nodes, fits, strict=True)
    ]
    missing = {k: v * ranks - sum(n["Resources"].get(k, 0.0) for n in nodes) for k, v in bundle.items()}
    short = ", ".join(f"{v:g} {k}" for k, v in missing.items() if v > 0) or "room on fewer nodes"
    raise SchedulingError(
        f"the job asks for {ranks} ranks ({ranks // ranks_per_node} node(s) × {ranks_per_node}) of {{{shown}}} "
        f"each, but the cluster's {len(nodes)} node(s) can host only {sum(fits)}; missing: {short}.\n  "
        + "\n  ".join(lines)
        + "\nLower resources.num_nodes / resources.gpus_per_node / resources.cpus_per_rank or add nodes."
    )


def _node_name(node: dict) -> str:
    return f"node {node['NodeID'][:8]} ({node.get('NodeManagerAddress', '?')})"


def reserve_gang(spec: JobSpec, *, timeout_s: float = PLACEMENT_TIMEOUT_S) -> Gang:
    """Reserve one bundle per rank for `spec.world_size` ranks, or raise `SchedulingError` naming what is short."""
    nodes = alive_nodes()
    bundle = bundle_on(spec, nodes)
    ranks = spec.world_size
    check_fits(bundle, ranks, spec.resources.gpus_per_node, nodes)
    strategy = "STRICT_PACK" if spec.resources.num_nodes == 1 else "PACK"
    # A fresh name each time: the group of a gang that lost a node keeps its name until Ray has released the dead
    # node's bundles, which can come after the next reservation.
    name = f"pretrain-{spec.name}-{uuid.uuid4().hex[:8]}"
    group = placement_group([dict(bundle) for _ in range(ranks)], strategy=strategy, name=name)
    deadline = time.monotonic() + timeout_s
    while not group.wait(timeout_seconds=5):
        if time.monotonic() > deadline:
            remove_placement_group(group)
            free = ray.available_resources()
            raise SchedulingError(
                f"the reservation of {ranks} ranks × {bundle} ({strategy}) was not met within {timeout_s:g} s; "
                f"free now: {', '.join(f'{k} {free.get(k, 0):g}' for k in bundle)} (other jobs hold the rest)"
            )
        check_fits(bundle, ranks, spec.resources.gpus_per_node, alive_nodes())
    by_bundle = placement_group_table(group)["bundles_to_node_id"]
    node_order = list(dict.fromkeys(by_bundle[i] for i in range(ranks)))
    order = sorted(range(ranks), key=lambda i: (node_order.index(by_bundle[i]), i))
    gang = Gang(group=group, bundle=bundle, bundles=order, nodes=[by_bundle[i] for i in order])
    check_tensor_groups(gang, spec.parallel.tp)
    return gang


def check_tensor_groups(gang: Gang, tp: int) -> None:
    """Release the gang and raise `SchedulingError` when a tensor-parallel group would span nodes."""
    for start in range(0, len(gang.nodes), tp):
        if len(set(gang.nodes[start:start + tp])) > 1:
            release(gang)
            raise SchedulingError(
                f"ranks {start}..{start + tp - 1} form a tensor-parallel group (parallel.tp={tp}) but Ray placed "
                f"them on {len(set(gang.nodes[start:start + tp]))} nodes; give every node a multiple of {tp} "
                "free GPUs or set resources.gpus_per_node to one"
            )


def release(gang: Gang) -> None:
    # The group may already be gone with its node or with the cluster.
    with contextlib.suppress(Exception):
        remove_placement_group(gang.group)
