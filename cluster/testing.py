"""Several Ray "nodes" on one machine, with GPUs simulated as resources: for tests and demos of placement,
job submission and recovery without a real cluster.

Each node is a real raylet (`ray.cluster_utils.Cluster`), so killing one is a real node loss. A node's
`num_gpus` is only a resource count here: Ray assigns the ids and sets CUDA_VISIBLE_DEVICES, and a CPU build of
torch trains on the CPU anyway (`resources.device: auto`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from typing import Any

from cluster.local import apply_local_env, started_again, system_config

FREE_CPUS = "Free some CPUs for it"


class SimulatedCluster:
    """A head node (job drivers, the Jobs API on 127.0.0.1) and `nodes` worker nodes with `gpus_per_node` each."""

    def __init__(self, nodes: int = 2, gpus_per_node: int = 1, cpus_per_node: float = 1.0, head_cpus: float = 1.0):
        if not apply_local_env():
            # The nodes advertise 127.0.0.1 while Ray would bind the machine's address: drivers would never connect.
            raise RuntimeError("Ray was imported before cluster.local.apply_local_env() ran; call it first")
        from ray._private import utils as ray_utils

        # Its own temp dir: a job's driver finds its cluster through the "current cluster" file in the head's temp
        # dir. In the shared /tmp/ray that file names whichever Ray instance on the machine started last; missing,
        # Ray picks any GCS process it sees running.
        self.temp_dir = tempfile.mkdtemp(prefix="ray-")
        self.node_args = {"num_cpus": cpus_per_node, "num_gpus": gpus_per_node, "node_ip_address": "127.0.0.1",
                          "temp_dir": self.temp_dir}
        # `Cluster` also writes that file to Ray's default temp dir, which a machine that never ran Ray lacks.
        os.makedirs(os.path.dirname(ray_utils.get_ray_address_file(None)), exist_ok=True)
        self.cluster, self.jobs_port = started_again(lambda: self._start_head(head_cpus, cpus_per_node),
                                                     "the simulated Ray cluster's head node", FREE_CPUS)
        # `Cluster` writes that file to the default temp dir whatever the head's: write it where its drivers look.
        ray_utils.write_ray_address(self.cluster.gcs_address, self.temp_dir)
        self.nodes: list = []
        self.size = nodes
        self.restore()

    def _start_head(self, head_cpus: float, cpus_per_node: float) -> tuple[Any, int]:
        from ray.cluster_utils import Cluster

        jobs_port = _free_port()
        # Other Ray instances on the machine hold the default ports (the job agent's 52365): take free ones.
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": head_cpus, "node_ip_address": "127.0.0.1", "include_dashboard": True, "temp_dir": self.temp_dir,
            "dashboard_host": "127.0.0.1", "dashboard_port": jobs_port,
            "dashboard_agent_listen_port": _free_port(), "metrics_export_port": _free_port(),
            # Notice a killed node within about 8 s instead of Ray's default 15 s, yet ride out a raylet stalled for
            # seconds on a loaded test machine (a false node death takes the jobs on it down); wait longer for a
            # node's agent, slow to start there too.
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 8,
                               "agent_register_timeout_ms": 180000, **system_config(cpus_per_node)},
        })
        return cluster, jobs_port

    @property
    def address(self) -> str:
        """The GCS address, for `ray.init(address=...)`."""
        return self.cluster.address

    @property
    def jobs_url(self) -> str:
        """The Jobs API, for `pretrain submit --address`."""
        return f"http://127.0.0.1:{self.jobs_port}"

    def kill_node(self, index: int = -1) -> None:
        """Kill a worker node's raylet and every process on it at once, as a lost machine would. Its workers are
        killed too: left to notice that their raylet is gone, they go on computing for seconds on a busy machine,
        and a rank there can finish a short run that the test meant to cut short."""
        import psutil
        from ray._private import ray_constants

        node = self.nodes.pop(index)
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        workers = psutil.Process(raylet).children(recursive=True)
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        self.cluster.remove_node(node, allow_graceful=False)

    def add_node(self) -> None:
        """Add one more worker node (`kill_node()` takes it away again; `restore` does not count it)."""
        self.nodes.append(started_again(lambda: self.cluster.add_node(**self.node_args), "a simulated Ray node",
                                        FREE_CPUS))

    def restore(self) -> None:
        """Add worker nodes back until there are as many as at the start."""
        while len(self.nodes) < self.size:
            self.add_node()

    def live_groups(self, prefix: str = "pretrain-") -> list[str]:
        """Names of the placement groups not yet removed whose name starts with `prefix`, from Ray's state API
        (asked over the cluster's address, so no driver needs to be connected)."""
        from ray.util.state import list_placement_groups

        groups = list_placement_groups(address=self.address, filters=[("state", "!=", "REMOVED")], limit=10_000)
        return sorted(g.name for g in groups if g.name.startswith(prefix))

    def shutdown(self) -> None:
        self.cluster.shutdown()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
