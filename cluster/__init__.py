"""Ray cluster access: an embedded local cluster, gang placement, rank actors, and the Jobs API.

    local_cluster()                     an embedded Ray on loopback (`pretrain submit` without --address)
    placement.reserve_gang(spec)        a bundle per node on exactly num_nodes nodes, or a SchedulingError now
    worker.RankWorker                   the actor hosting one rank's training loop, its heartbeat and stack dumps
    submission.submit(address, spec)    start the controller as a Ray job with the spec in its runtime_env

Importing this package does not import Ray: `cluster.local` must set Ray's variables before Ray reads them.
"""

from cluster.local import apply_local_env, local_cluster

__all__ = ["apply_local_env", "local_cluster"]
