"""How fast the controller refuses, starts and recovers a gang, on a simulated two-node Ray cluster (CPU).

    python benchmarks/controller_recovery.py                  # byte-token shards of examples/corpus in a temp dir
    python benchmarks/controller_recovery.py --steps 30 --kill-at 10

Prints, in seconds:
    refuse      a reservation the cluster can never meet, until the SchedulingError
    first step  the gang reserved and started (actors, torch.distributed, DeepSpeed engine, checkpoint resume) until
                every rank finished step 1
    recover     rank 1 SIGKILLed after step --kill-at, until every rank of the next attempt finished its first step
                (death noticed, gang torn down, backoff, reserved again, started, checkpoint loaded)
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

from loader_bench import build_byte_shards

from cluster.local import apply_local_env

apply_local_env()  # before anything imports Ray: it reads the loopback variables once

from cluster.placement import reserve_gang  # noqa: E402
from cluster.testing import SimulatedCluster  # noqa: E402
from orchestrator.controller import Controller  # noqa: E402
from orchestrator.errors import SchedulingError  # noqa: E402
from orchestrator.validate import parse_spec  # noqa: E402


class TimedController(Controller):
    """Notes when each attempt's ranks all finished a step, and kills rank 1 once, after step `kill_at`."""

    def __init__(self, spec, kill_at: int):
        super().__init__(spec)
        self.kill_at = kill_at
        self.first_step: dict[int, float] = {}
        self.killed: float | None = None
        self.pids: list[int] = []

    def _start(self, spec, gang, workers):
        infos = super()._start(spec, gang, workers)
        self.pids = [i["pid"] for i in infos]
        return infos

    def _poll(self, workers):
        beats, dead = super()._poll(workers)
        steps = [b.step for b in beats.values()]
        if len(steps) == len(workers) and min(steps) >= 0:  # a fresh actor reports step -1 until its first step
            self.first_step.setdefault(self.attempt, time.monotonic())
            if self.killed is None and min(steps) >= self.kill_at:
                self.killed = time.monotonic()
                os.kill(self.pids[1], signal.SIGKILL)
        return beats, dead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--kill-at", type=int, default=6)
    args = parser.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="controller-bench-"))
    build_byte_shards(work / "shards", seq_len=64, rows=4096)
    spec = parse_spec({
        "name": "bench", "model": {"dim": 64, "n_layers": 2, "n_heads": 2, "multiple_of": 16},
        "data": {"path": str(work / "shards"), "seq_len": 64},
        "parallel": {"zero_stage": 1, "micro_batch_size": 4, "precision": "fp32"},
        "schedule": {"steps": args.steps, "warmup_steps": 1, "eval_every": 0, "log_every": 1000},
        "checkpoint": {"dir": str(work / "checkpoints"), "every": 5, "async_save": False},
        "metrics": {"enabled": False},
        "resources": {"num_nodes": 2, "gpus_per_node": 1, "cpus_per_rank": 0.5, "restart_backoff_s": 0.5},
    })
    cluster = SimulatedCluster(nodes=2, gpus_per_node=1)
    ray.init(address=cluster.address)
    try:
        too_big = parse_spec({"resources": {"num_nodes": 2, "gpus_per_node": 4}})
        start = time.monotonic()
        try:
            reserve_gang(too_big)
        except SchedulingError:
            print(f"refuse      {time.monotonic() - start:6.2f} s")
        controller = TimedController(spec, args.kill_at)
        start = time.monotonic()
        controller.run()
        print(f"first step  {controller.first_step[1] - start:6.2f} s")
        print(f"recover     {controller.first_step[2] - controller.killed:6.2f} s")
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
