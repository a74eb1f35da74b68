"""Ray cluster access: an embedded local cluster, gang placement, rank actors, and the Jobs API.

    local_cluster()            an embedded Ray on loopback (what `pretrain submit` uses without --address)
    reserve_gang(spec)         one placement-group bundle per rank, packed by node, or a SchedulingError now
    RankWorker                 the actor hosting one rank's training loop, its heartbeat and its stack dumps
    submission.submit(...)     start the controller as a Ray job with the spec in its runtime_env
"""

from cluster.local import local_cluster
from cluster.placement import Gang, release, reserve_gang

__all__ = ["Gang", "local_cluster", "release", "reserve_gang"]
