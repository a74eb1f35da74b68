"""An embedded Ray cluster on this machine: what `pretrain submit` runs on when no address is given.

It listens on loopback only and sends no usage statistics. Ray binds every interface on Linux unless
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (then the node address 127.0.0.1 is honoured), and a local `ray.init()`
with authentication on writes ~/.ray/auth_token, which later breaks job submission to other clusters: both are
switched off here, before Ray starts any process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from orchestrator.errors import ClusterError

LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
CLUSTER_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Every rank's line reaches the driver's log as printed: Ray would fold identical lines of several ranks into one
# ("[repeated 4x across cluster]"; lines differing only in numbers count as identical) and colour the prefixes. Ray
# reads these when imported, so they must be in the environment before `import ray`: a submitted job carries them
# in its runtime_env (`cluster.submission`), the controller's module sets them before its own import.
LOG_ENV = {"RAY_DEDUP_LOGS": "0", "RAY_COLOR_PREFIX": "0"}


# Ray keeps at most one idle worker process per CPU and ends the others after a second idle; on a machine of few CPUs
# each Ray Data execution then starts its task workers anew (seconds each: Python, pyarrow, this package), most of a
# small prep's time there (2 cores, the test corpora's prep with distributed components: 107 s, 23 s with this
# floor). At or above this many CPUs, Ray's own limit stands.
MIN_IDLE_WORKERS = 8


def system_config(num_cpus: float | None = None) -> dict[str, int]:
    """Ray's `_system_config` for a cluster started on this machine with `num_cpus` (None: every CPU) per node."""
    return {"num_workers_soft_limit": max(MIN_IDLE_WORKERS, int(num_cpus or os.cpu_count() or 1))}


# Ray's raylet stops when its dashboard agent has not written its ports within 15 s, a limit Ray does not let us
# raise (ray-project/ray#65983), and a loaded machine's agent can take longer to import; starting the node then fails
# after Ray's own wait with "The current node timed out during startup". Another start finds the agent's modules in
# the page cache and the machine perhaps less busy.
STARTS = 3
STARTUP_TIMEOUT = "timed out during startup"
T = TypeVar("T")


def started_again(start: Callable[[], T], what: str, advice: str, undo: Callable[[], None] = lambda: None) -> T:
    """`start()` (of a Ray node in this process), run again when the node timed out during startup, up to STARTS
    times; `undo` and the kill of the processes a failed try started come first. A `ClusterError` saying `advice`
    when it never started."""
    import psutil

    me = psutil.Process()
    for attempt in range(1, STARTS + 1):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            return start()
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for a node that did not start
            if STARTUP_TIMEOUT not in str(e):
                raise
        undo()
        left = [p for p in me.children(recursive=True) if p.pid not in before]
        for process in left:
            with suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(left, timeout=10)
        print(f"pretrain: {what} did not start (try {attempt} of {STARTS}): its raylet stopped waiting for its "
              "dashboard agent, slow on a loaded machine", file=sys.stderr, flush=True)
    raise ClusterError(f"{what} did not start in {STARTS} tries: Ray's dashboard agent took over Ray's 15 s limit "
                       f"each time (a loaded machine; see raylet.out under Ray's session_latest/logs). {advice}")


def start_local_ray(num_cpus: float | None = None, **options: Any) -> None:
    """`ray.init` of an embedded cluster on this machine (`options` are ray.init's), started again when its node
    timed out during startup; a `ClusterError` when it never started."""
    import ray

    started_again(lambda: ray.init(address="local", num_cpus=num_cpus, _system_config=system_config(num_cpus),
                                   **options),
                  "the local Ray cluster",
                  "Free some CPUs, or start Ray once with `ray start --head` and pass its address", undo=ray.shutdown)


def apply_local_env() -> bool:
    """Set the loopback / no-telemetry / plain-log variables, keeping any the user set.

    Returns False when Ray was imported before with the other value of RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER: Ray then
    binds the machine's address instead of loopback.
    """
    for key, value in {**LOCAL_ENV, **LOG_ENV}.items():
        os.environ.setdefault(key, value)
    constants = sys.modules.get("ray._private.ray_constants")
    return constants is None or (os.environ[CLUSTER_VARIABLE] != "0") == constants.ENABLE_RAY_CLUSTER


@contextmanager
def local_cluster(num_cpus: float | None = None, num_gpus: int | None = None) -> Iterator[dict]:
    """Start Ray in this process (head node on 127.0.0.1, no dashboard), yield its resources, stop it after."""
    if not apply_local_env():
        print(f"pretrain: Ray was imported before {CLUSTER_VARIABLE}=0 was set; the local cluster listens on this "
              "machine's address, not only on loopback", file=sys.stderr)
    import ray

    start_local_ray(num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                    configure_logging=False)
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


@contextmanager
def ray_cluster(address: str | None) -> Iterator[None]:
    """Connected to the Ray cluster at `address` for the duration, or to a local one started for it (no address)."""
    if not address:
        with local_cluster():
            yield
        return
    import ray

    ray.init(address=address)
    try:
        yield
    finally:
        ray.shutdown()
