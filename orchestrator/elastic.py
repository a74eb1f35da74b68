"""Re-plan a run for the nodes that are left: fewer nodes, a smaller data-parallel size, the same global batch.

Pipeline and tensor sizes stay (they shape the model's partitioning); the data-parallel size shrinks with the
node count, and gradient accumulation grows so that each step still sees `parallel.global_batch_size` sequences:
the loader's state (a global sample index) then resumes exactly where the larger gang stopped. A node counts when
it can host a whole node's share of ranks (`resources.gpus_per_node`): the gang is reserved one bundle per node.
When lost nodes come back, the next restart returns to `resources.num_nodes`.
"""

from __future__ import annotations

from collections.abc import Iterable

from cluster.placement import bundle_on, nodes_with_room
from orchestrator.errors import SchedulingError
from orchestrator.spec import JobSpec
from orchestrator.validate import parse_spec, spec_to_dict


def plan_nodes(spec: JobSpec, nodes: Iterable[dict]) -> JobSpec:
    """The spec to run on `nodes` (Ray's alive-node records): all of `spec`'s nodes, or as few as min_nodes allows."""
    nodes = list(nodes)
    bundle = bundle_on(spec, nodes)
    r = spec.resources
    room = nodes_with_room(bundle, r.gpus_per_node, nodes)  # a gang takes one whole bundle per node
    fewest = r.min_nodes or r.num_nodes
    for count in range(min(room, r.num_nodes), fewest - 1, -1):
        resized = resize(spec, count)
        if resized is not None:
            return resized
    raise SchedulingError(
        f"the cluster has room for {room} node(s) of {r.gpus_per_node} rank(s) ({bundle} each); the run needs "
        f"at least {fewest} (resources.min_nodes={r.min_nodes}, resources.num_nodes={r.num_nodes})"
    )


def resize(spec: JobSpec, num_nodes: int) -> JobSpec | None:
    """`spec` on `num_nodes` nodes with the same global batch, or None when no layout keeps it."""
    if num_nodes == spec.resources.num_nodes:
        return spec
    p = spec.parallel
    world = num_nodes * spec.resources.gpus_per_node
    if world % (p.cp * p.pp * p.tp):
        return None
    dp = world // (p.cp * p.pp * p.tp)
    if p.global_batch_size % (p.micro_batch_size * dp) or (dp * p.cp) % p.ep:
        return None  # the global batch, or the experts' ep ranks (taken from dp × cp), would not split
    raw = spec_to_dict(spec)
    raw["resources"]["num_nodes"] = num_nodes
    raw["resources"]["min_nodes"] = min(spec.resources.min_nodes, num_nodes)
    raw["parallel"]["dp"] = dp
    raw["parallel"]["grad_accum"] = p.global_batch_size // (p.micro_batch_size * dp)
    return parse_spec(raw, source=f"{spec.name} on {num_nodes} node(s)")
