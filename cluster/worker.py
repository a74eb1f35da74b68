"""One rank of a run: a Ray actor that runs the training loop in a thread and answers the controller meanwhile.

The loop runs in a thread of the actor, not in the actor's own call, so the controller can keep asking for
heartbeats and, when the gang hangs, for every thread's Python stack (`faulthandler` works from any thread, even
while the loop sits in a collective). A fresh actor is started for every attempt: nothing of a failed
`torch.distributed` or DeepSpeed state survives into the next one.

Ray prefixes every line an actor prints with its `repr`, so each rank's output reaches the job log as
`(rank3 pid=…, ip=…) …`.

A rank that raises tells the controller its error instead of printing it: a user error (`orchestrator.errors.
UserError`: a corrupt shard, a bad checkpoint) is reported by the controller once, as the job's error, without a
traceback; anything else is a bug, and the controller prints the rank's traceback.

Fault injection (tests only): `PRETRAIN_TEST_HANG=RANK:STEP:MARKER` makes rank RANK sleep forever after step STEP,
and `PRETRAIN_TEST_EXIT=RANK:STEP:MARKER` makes its process exit at once, as a killed one would; each happens once:
the marker file is created first and a later attempt that finds it trains on. It lives in the heartbeat callback, so
the training loop needs no hook of its own.

When an actor cannot answer at all (a thread holding the GIL in a C extension), `stacks_from_outside` reads its
stacks with py-spy, run as a task on the rank's node.
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.metrics import RankExporter
from orchestrator.errors import UserError
from orchestrator.spec import JobSpec
from parallel.callbacks import BaseCallback, StepStats

DEFAULT_ENTRY = "parallel.train:run"
# Faults the tests inject, each "<rank>:<step>:<file>": a hang or an exit after that step, once (the file records
# it); a hold after that step until the file exists.
HANG_VARIABLE = "PRETRAIN_TEST_HANG"
EXIT_VARIABLE = "PRETRAIN_TEST_EXIT"
HOLD_VARIABLE = "PRETRAIN_TEST_HOLD"


@dataclass
class Wiring:
    """Where a rank sits in the gang and how it finds the others (torchrun's environment variables)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    visible_devices: str | None = None

    def environ(self) -> dict[str, str]:
        """What the loop's `RankEnv.export` does not set: the node's rank and GPUs, gloo's interface on loopback."""
        env = {"NODE_RANK": str(self.node_rank), "GROUP_RANK": str(self.node_rank)}
        if self.visible_devices:
            env["CUDA_VISIBLE_DEVICES"] = self.visible_devices
        if self.master_addr.startswith("127."):
            env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
        return env


@dataclass
class Beat:
    """What a rank last told the controller."""

    step: int = -1
    loss: float | None = None
    step_time: float | None = None
    done: bool = False
    error: str | None = None
    user_error: bool = False
    traceback: str | None = None  # of an error that is not the user's


class Heartbeat(BaseCallback):
    """A training-loop callback that records each finished step for the controller to read."""

    def __init__(self, beat: Beat, rank: int):
        self.beat = beat
        self.hang_at = _injected(HANG_VARIABLE, rank)
        self.exit_at = _injected(EXIT_VARIABLE, rank)
        self.hold_at = _injected(HOLD_VARIABLE, rank)

    def on_step(self, stats: StepStats) -> None:
        self.beat.loss = float(stats.loss)
        # A rank's own work, without waiting for the others, shows a straggler; the whole step is the same everywhere.
        self.beat.step_time = float(stats.busy_seconds if stats.busy_seconds is not None else stats.step_seconds)
        self.beat.step = stats.step
        if _due(self.hang_at, stats.step):
            print(f"injected hang after step {stats.step} ({HANG_VARIABLE})", flush=True)
            threading.Event().wait()
        if _due(self.exit_at, stats.step):
            print(f"injected exit after step {stats.step} ({EXIT_VARIABLE})", flush=True)
            os._exit(1)
        if _pending(self.hold_at, stats.step):
            print(f"injected hold after step {stats.step} until {self.hold_at[1]} exists ({HOLD_VARIABLE})", flush=True)
            while not os.path.exists(self.hold_at[1]):
                time.sleep(0.1)


def _pending(fault: tuple[int, str] | None, step: int) -> bool:
    """Whether an injected fault's step is reached and its marker file does not exist yet."""
    return fault is not None and step >= fault[0] and not os.path.exists(fault[1])


def _due(fault: tuple[int, str] | None, step: int) -> bool:
    """Whether a once-only fault happens now: pending, and no earlier attempt left its marker (made now)."""
    if not _pending(fault, step):
        return False
    open(fault[1], "w").close()
    return True


def _injected(variable: str, rank: int) -> tuple[int, str] | None:
    value = os.environ.get(variable, "")
    if not value:
        return None
    who, step, marker = value.split(":", 2)
    return (int(step), marker) if int(who) == rank else None


@ray.remote(max_concurrency=4)
class RankWorker:
    """An actor hosting one rank; the controller starts one per bundle of the gang's placement group."""

    def __init__(self, rank: int):
        self.rank = rank
        self.beat = Beat()
        self.thread: threading.Thread | None = None
        self.store = None

    def __repr__(self) -> str:
        return f"rank{self.rank}"

    def describe(self) -> dict[str, Any]:
        """Node, process and devices of this rank: the controller wires the gang from these."""
        context = ray.get_runtime_context()
        return {
            "ip": ray.util.get_node_ip_address(), "node_id": context.get_node_id(), "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def open_store(self) -> int:
        """Open the group's rendezvous store on this rank (rank 0) and return its port: it listens from now until the
        loop joins the group, so no other process on the node can take the port in between."""
        from parallel.launch import open_store  # torch: imported in the rank's process only

        self.store = open_store()
        return self.store.port

    def start(self, spec: JobSpec, wiring: Wiring, entry: str = DEFAULT_ENTRY) -> str | None:
        """Start the loop in a thread; return where this rank's metrics exporter listens (host:port), if any."""
        os.environ.update(wiring.environ())
        callbacks: list[BaseCallback] = [Heartbeat(self.beat, self.rank)]
        target = None
        if spec.metrics.uses("prometheus"):
            ip = ray.util.get_node_ip_address()
            exporter = RankExporter.from_spec(spec, self.rank, wiring.local_rank, node=ip, advertise_host=ip)
            callbacks.append(exporter)
            target = exporter.target
        print(f"rank {self.rank} of {wiring.world_size}: node rank {wiring.node_rank}, local rank {wiring.local_rank}"
              + (f", metrics at http://{target}/metrics" if target else ""), flush=True)
        self.thread = threading.Thread(target=self._train, args=(spec, wiring, entry, callbacks), daemon=True)
        self.thread.start()
        return target

    def _train(self, spec: JobSpec, wiring: Wiring, entry: str, callbacks: list[BaseCallback]) -> None:
        try:
            module, _, name = entry.partition(":")
            train = getattr(importlib.import_module(module), name)
            train(spec, _rank_env(wiring, self.store), callbacks=tuple(callbacks))
            self.beat.done = True
        except BaseException as e:  # noqa: BLE001 - every failure of a rank is reported to the controller
            self.beat.user_error = isinstance(e, UserError)
            if not self.beat.user_error:
                self.beat.traceback = "".join(traceback.format_exception(e))
            self.beat.error = f"{type(e).__name__}: {e}"

    def poll(self) -> Beat:
        return self.beat

    def stacks(self) -> str:
        """Every thread's Python stack, as faulthandler prints them."""
        with tempfile.TemporaryFile("w+") as f:
            faulthandler.dump_traceback(f, all_threads=True)
            f.seek(0)
            return f.read()


@ray.remote(num_cpus=0)
def _py_spy_dump(pid: int) -> str:
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    done = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def stacks_from_outside(node_id: str, pid: int, timeout: float = 90.0) -> str:
    """A process's Python stacks read by py-spy on its node: works while the process itself cannot answer."""
    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    try:
        return ray.get(_py_spy_dump.options(scheduling_strategy=strategy).remote(pid), timeout=timeout)
    except (ray.exceptions.RayError, OSError) as e:
        return f"(unavailable: {type(e).__name__}: {e})"


def _rank_env(wiring: Wiring, store: Any) -> Any:
    """The loop's view of the wiring; rank 0 brings the store it holds open, the others connect to it."""
    from parallel.launch import RankEnv, connect_store  # torch: imported in the rank's process only

    if store is None:
        store = connect_store(wiring.master_addr, wiring.master_port)
    return RankEnv(rank=wiring.rank, world_size=wiring.world_size, local_rank=wiring.local_rank,
                   master_addr=wiring.master_addr, master_port=wiring.master_port,
                   local_world_size=wiring.local_world_size, store=store)
