"""The Ray controller: start a run's gang of ranks and keep it running until it finishes or cannot.

One attempt reserves every rank's resources at once (a placement group, `cluster.placement`), starts one
`cluster.worker.RankWorker` actor per rank with its torch.distributed wiring (rank 0's address and a free port),
and watches the ranks' heartbeats. An attempt ends when

- every rank finished: the run is done;
- a rank's process or node died, a rank raised, or no rank advanced for `resources.hang_timeout_s` (then every
  rank's Python stacks go to the job log first): the gang is torn down and, as `orchestrator.failure_policy`
  decides, restarted after a backoff. The training loop resumes from the newest good checkpoint itself
  (`checkpoint.resume`). When nodes were lost and `resources.min_nodes` allows, the next attempt runs on the
  nodes left, with the data-parallel size re-planned (`orchestrator.elastic`) and the checkpoint resharded.

A spec that leaves the layout open (no parallel.dp/pp/tp) on GPUs gets the planner's layout for the GPUs reserved
(`orchestrator.layout_choice`).

Job entry point for the Ray Jobs API (what `pretrain submit --address` runs on the head node; PRETRAIN_PLAN_LAYOUT=1
asks for the planner):

    PRETRAIN_SPEC="$(cat resolved.yaml)" python -m orchestrator.controller
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from cluster.local import LOG_ENV

# Ray reads RAY_DEDUP_LOGS once, when imported: set it first, or identical lines of several ranks are folded into one.
os.environ.update({key: os.environ.get(key, value) for key, value in LOG_ENV.items()})

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.metrics import ControllerExporter, default_targets_path
from cluster.placement import (
    PLACEMENT_TIMEOUT_S,
    Gang,
    alive_nodes,
    release,
    release_leftovers,
    reserve_gang,
)
from cluster.submission import PLAN_VARIABLE, SPEC_VARIABLE
from cluster.worker import DEFAULT_ENTRY, Beat, RankWorker, Wiring, stacks_from_outside
from orchestrator.config_parser import parse_yaml
from orchestrator.elastic import plan_nodes
from orchestrator.errors import PretrainError, SchedulingError, UserError, WorkerFailedError
from orchestrator.failure_policy import Action, Cause, Failure, FailurePolicy
from orchestrator.layout_choice import apply_planner
from orchestrator.preflight import check_data
from orchestrator.spec import JobSpec
from orchestrator.stragglers import find_stragglers
from orchestrator.validate import parse_spec
from orchestrator.watchdog import STARTUP_S, Watchdog

POLL_S = 1.0
# Rank actors are named `<run>-<ray job id>-a<attempt>-rank<r>` in this namespace, so tools can find them.
NAMESPACE = "pretrain"
# After a rank's error, how long to wait for the others to raise, finish or die before naming the cause: an error
# often follows a peer's death (its collective broke), and a bad input raises on every rank, some of them later.
SETTLE_S = 10.0
# ...and how long for a rank not yet past its first step: starting (imports, engine, loader) takes tens of seconds on
# a loaded machine, and a rank seconds behind the others reaches the same bad input seconds later.
STARTUP_SETTLE_S = 60.0
# How long a restart waits for enough nodes (a lost pod being replaced) before giving up.
NODE_WAIT_S = 120.0


@dataclass
class RunResult:
    step: int
    loss: float | None
    restarts: int
    world_size: int


class AttemptFailed(Exception):
    def __init__(self, failure: Failure):
        super().__init__(str(failure))
        self.failure = failure


class Controller:
    def __init__(self, spec: JobSpec, *, entry: str = DEFAULT_ENTRY, plan_layout: bool = False,
                 poll_s: float = POLL_S, startup_s: float = STARTUP_S, node_wait_s: float = NODE_WAIT_S):
        self.spec = spec
        self.plan_layout = plan_layout
        self.entry = entry
        self.poll_s = poll_s
        self.startup_s = startup_s
        self.node_wait_s = node_wait_s
        self.policy = FailurePolicy(spec.resources.max_restarts, spec.resources.restart_backoff_s)
        self.attempt = 0
        self.exporter: ControllerExporter | None = None

    def log(self, message: str) -> None:
        print(f"[controller {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def run(self) -> RunResult:
        """Run attempts until one finishes; raise `WorkerFailedError` (or the rank's `UserError`) when giving up.

        Whatever ends the run (success, giving up, an exception, the job being stopped: Ray's driver turns SIGTERM
        into SystemExit), no placement group of the run is left behind.
        """
        if self.entry == DEFAULT_ENTRY:
            check_data(self.spec)  # the training loop reads it; say so now, not after reserving and starting ranks
        try:
            gang = self._reserve(self.spec, PLACEMENT_TIMEOUT_S)
            try:
                if self.plan_layout and "GPU" in gang.bundle:
                    self._plan(gang)
                if self.spec.metrics.uses("prometheus"):
                    self.exporter = ControllerExporter.from_spec(self.spec,
                                                                 advertise_host=ray.util.get_node_ip_address())
            except BaseException:
                release(gang)
                raise
            return self._run(gang)
        finally:
            self._stop_exporting()
            self._release_leftovers("at the end of the run")

    def _stop_exporting(self) -> None:
        """Take the run's targets out of Prometheus's file and stop the controller's exporter, ahead of the ranks'.

        `PretrainExporterDown` reads a rank's exporter down under a live controller as a dead rank; a finished run's
        ranks must not look like one, so the controller's exporter goes first. Its figures stay readable.
        """
        if self.exporter is not None:
            self.exporter.close()

    def _reserve(self, spec: JobSpec, timeout_s: float) -> Gang:
        gang = reserve_gang(spec, timeout_s=timeout_s, notice=self.log)
        self.log(f"reserved {spec.world_size} rank(s) on {len(set(gang.nodes))} node(s): {gang.describe()}")
        return gang

    def _release_leftovers(self, when: str) -> None:
        """Remove placement groups of this run that no gang owns (none, unless a path lost track of one)."""
        try:
            names = release_leftovers(self.spec)
        except RayError:  # the cluster is gone, and its groups with it
            return
        if names:
            self.log(f"{when}: removed placement group(s) the run still held: {', '.join(names)}")

    def _plan(self, gang: Gang) -> None:
        """Ask the planner for the layout, sized by the memory of the GPUs just reserved."""
        strategy = PlacementGroupSchedulingStrategy(gang.group, placement_group_bundle_index=gang.bundles[0])
        memory = ray.get(_gpu_memory.options(scheduling_strategy=strategy, num_gpus=1, num_cpus=0).remote())
        if memory is None:
            self.log("layout: the reserved GPUs are not visible to torch; keeping dp = ranks / (pp·tp)")
            return
        self.spec, reasons = apply_planner(self.spec, memory)
        for line in reasons:
            self.log(f"layout: {line}")

    def _run(self, gang: Gang) -> RunResult:
        spec = self.spec
        while True:
            self.attempt += 1
            try:
                return self._attempt(spec, gang)
            except AttemptFailed as e:
                failure = e.failure
            decision = self.policy.decide(failure)
            if failure.cause is Cause.USER_ERROR:  # the message itself comes once, as the job's error
                self.log(f"attempt {self.attempt} failed: {failure.cause.value}; giving up: {decision.reason}")
                raise UserError(_by_message(failure.ranks, len(gang.bundles)))
            self.log(f"attempt {self.attempt} failed: {failure}")
            if decision.action is Action.RAISE:
                self.log(f"giving up: {decision.reason}")
                raise WorkerFailedError(failure.ranks)
            self.log(f"restarting in {decision.delay_s:g} s ({decision.reason}, cause: {failure.cause.value})")
            time.sleep(decision.delay_s)
            spec, gang = self._reserve_again()
            if self.exporter is not None:
                self.exporter.record_restart(spec.world_size)

    def _reserve_again(self) -> tuple[JobSpec, Gang]:
        """Reserve the gang anew on the nodes alive now, shrinking the data-parallel size if nodes were lost.

        The previous gang is released by then; a group of the run still held would only compete with this
        reservation, so it goes first.
        """
        self._release_leftovers("before reserving again")
        deadline = time.monotonic() + self.node_wait_s
        while True:
            try:
                spec = plan_nodes(self.spec, alive_nodes())
                if spec.resources.num_nodes != self.spec.resources.num_nodes:
                    self.log(f"elastic: continuing on {spec.resources.num_nodes} of {self.spec.resources.num_nodes} "
                             f"nodes, dp={spec.parallel.dp}, grad_accum={spec.parallel.grad_accum}")
                return spec, self._reserve(spec, max(1.0, deadline - time.monotonic()))
            except SchedulingError as e:
                if time.monotonic() > deadline:
                    raise
                self.log(f"waiting for nodes: {e}")
                time.sleep(5.0)

    def _attempt(self, spec: JobSpec, gang: Gang) -> RunResult:
        workers: list = []
        try:
            try:
                infos = self._start(spec, gang, workers)
            except RayError as e:  # a rank's process or node died while the gang was being wired
                raise AttemptFailed(Failure(Cause.RANK_DIED, {-1: _short(e)})) from None
            result = self._monitor(spec, workers, infos)
            self._stop_exporting()
            return result
        finally:
            for w in workers:
                ray.kill(w, no_restart=True)
            release(gang)

    def _start(self, spec: JobSpec, gang: Gang, workers: list) -> list[dict]:
        """Start one actor per rank in its bundle, wire them together and start their loops; append to `workers`."""
        cpus, gpus = gang.bundle.get("CPU", 0.0), gang.bundle.get("GPU", 0.0)
        job = ray.get_runtime_context().get_job_id()
        for rank, bundle in enumerate(gang.bundles):
            strategy = PlacementGroupSchedulingStrategy(gang.group, placement_group_bundle_index=bundle)
            name = f"{spec.name}-{job}-a{self.attempt}-rank{rank}"
            workers.append(RankWorker.options(scheduling_strategy=strategy, num_cpus=cpus, num_gpus=gpus,
                                              name=name, namespace=NAMESPACE).remote(rank))
        infos = ray.get([w.describe.remote() for w in workers], timeout=self.startup_s)
        port = ray.get(workers[0].open_store.remote(), timeout=60)
        local, local_world, node_rank = gang.local_ranks()
        devices = _visible_devices(gang.nodes, [i["gpu_ids"] for i in infos])
        p = spec.parallel
        self.log(f"attempt {self.attempt}: {spec.world_size} ranks (dp={p.dp} cp={p.cp} pp={p.pp} tp={p.tp}) on "
                 f"{len(set(gang.nodes))} node(s), master {infos[0]['ip']}:{port}")
        for rank, info in enumerate(infos):
            self.log(f"  rank {rank}: node {info['node_id'][:8]} ({info['ip']}) pid {info['pid']} "
                     f"local_rank {local[rank]} gpus {','.join(info['gpu_ids']) or '-'}")
        wirings = [
            Wiring(rank=r, world_size=len(workers), local_rank=local[r], local_world_size=local_world[r],
                   node_rank=node_rank[r], master_addr=infos[0]["ip"], master_port=port, visible_devices=devices[r])
            for r in range(len(workers))
        ]
        targets = ray.get([w.start.remote(spec, wirings[r], self.entry) for r, w in enumerate(workers)], timeout=120)
        if self.exporter is not None:
            self.exporter.set_ranks(spec.world_size)
            path = default_targets_path(spec.metrics.targets_file, spec.checkpoint.dir, spec.name)
            self.exporter.write_targets(path, [t for t in targets if t])
        return infos

    def _monitor(self, spec: JobSpec, workers: list, infos: list[dict]) -> RunResult:
        watchdog = Watchdog(spec.resources.hang_timeout_s, startup_s=self.startup_s)
        stragglers: dict[int, float] = {}
        while True:
            beats, dead = self._poll(workers)
            if any(b.error for b in beats.values()) and not dead:
                beats, dead = self._settle(workers, beats)
            errors = {r: b.error for r, b in beats.items() if b.error}
            if dead:
                lost = {i["node_id"] for i in infos} - {n["NodeID"] for n in alive_nodes()}
                cause = Cause.NODE_LOST if any(infos[r]["node_id"] in lost for r in dead) else Cause.RANK_DIED
                raise AttemptFailed(Failure(cause, dead))
            if errors:
                raise AttemptFailed(self._rank_errors({r: beats[r] for r in errors}))
            for rank, beat in beats.items():
                watchdog.observe(rank, beat.step)
            if len(beats) == len(workers) and all(b.done for b in beats.values()):
                return self._result(beats, spec)
            if watchdog.hung():
                self._dump_stacks(workers, infos)
                steps = {r: f"no step after {watchdog.steps.get(r, -1)} for {watchdog.stalled_for():.0f} s"
                         for r in range(len(workers))}
                raise AttemptFailed(Failure(Cause.HANG, steps))
            stragglers = self._report_stragglers(beats, infos, stragglers, spec.resources.straggler_factor)
            time.sleep(self.poll_s)

    def _settle(self, workers: list, beats: dict[int, Beat]) -> tuple[dict[int, Beat], dict[int, str]]:
        """The ranks' state once each has raised, finished or died, or SETTLE_S after the first error (STARTUP_SETTLE_S
        while a rank that has not answered is still starting): one message then names every rank that raised the same
        error, and a death is seen as the cause of the errors it broke."""
        start, dead = time.monotonic(), {}
        while not dead:
            waiting = [beats.get(r) for r in range(len(workers))
                       if r not in beats or not (beats[r].error or beats[r].done)]
            starting = any(b is None or b.step < 1 for b in waiting)
            left = start + (STARTUP_SETTLE_S if starting else SETTLE_S) - time.monotonic()
            if not waiting or left <= 0:
                break
            time.sleep(min(self.poll_s, left))
            beats, dead = self._poll(workers)
        return beats, dead

    def _rank_errors(self, beats: dict[int, Beat]) -> Failure:
        """The failure of ranks that raised. A user error (bad input) is the cause, and its message alone is the
        news: the other ranks' errors then follow from it (a collective broken by the rank that stopped). Anything
        else is a bug: every rank's traceback goes to the job log."""
        user = {r: b.error for r, b in beats.items() if b.user_error}
        if user:
            return Failure(Cause.USER_ERROR, user)
        for rank, beat in sorted(beats.items()):
            print(f"----- rank {rank} traceback -----\n{beat.traceback or beat.error}", flush=True)
        return Failure(Cause.RANK_ERROR, {r: b.error for r, b in beats.items()})

    def _poll(self, workers: list) -> tuple[dict[int, Beat], dict[int, str]]:
        refs = {w.poll.remote(): r for r, w in enumerate(workers)}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=max(5.0, 5 * self.poll_s))
        beats: dict[int, Beat] = {}
        dead: dict[int, str] = {}
        for ref in ready:
            try:
                beats[refs[ref]] = ray.get(ref)
            except RayActorError as e:
                dead[refs[ref]] = _short(e)
        return beats, dead

    def _report_stragglers(self, beats: dict[int, Beat], infos: list[dict], before: dict[int, float],
                           factor: float) -> dict[int, float]:
        times = {r: b.step_time for r, b in beats.items() if not b.done and b.step_time}
        if len(times) < 2:  # one rank still stepping, the others done or not yet stepping: nothing to compare
            return before
        if self.exporter is not None:
            self.exporter.set_step_times({r: (infos[r]["ip"], t) for r, t in times.items()})
        now = find_stragglers(times, factor)
        if set(now) != set(before):
            if now:
                detail = ", ".join(f"rank {r} {ratio:.2f}×" for r, ratio in now.items())
                self.log(f"stragglers (busy time over {factor:g}× the other ranks' median): {detail}")
            else:
                self.log("no stragglers")
        return now

    def _dump_stacks(self, workers: list, infos: list[dict]) -> None:
        self.log(f"no rank advanced for {self.spec.resources.hang_timeout_s:g} s; Python stacks of every rank:")
        refs = [w.stacks.remote() for w in workers]
        for rank, ref in enumerate(refs):
            try:
                text = ray.get(ref, timeout=10.0)
            except (RayError, TimeoutError):
                # The actor does not answer (a thread holding the GIL): read its stacks from outside instead.
                text = stacks_from_outside(infos[rank]["node_id"], infos[rank]["pid"])
            print(f"----- rank {rank} pid {infos[rank]['pid']} stacks -----\n{text}", flush=True)

    def _result(self, beats: dict[int, Beat], spec: JobSpec) -> RunResult:
        losses = [b.loss for _, b in sorted(beats.items()) if b.loss is not None]
        result = RunResult(step=max(b.step for b in beats.values()), loss=losses[0] if losses else None,
                           restarts=self.policy.restarts, world_size=spec.world_size)
        self.log(f"finished: step {result.step}, loss {result.loss!r}, restarts {result.restarts}, "
                 f"{result.world_size} ranks")
        return result


@ray.remote
def _gpu_memory() -> int | None:
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def _visible_devices(nodes: list[str], gpu_ids: list[list[str]]) -> list[str | None]:
    """Each rank's CUDA_VISIBLE_DEVICES: every GPU of its node's ranks, in local-rank order.

    Ray gives each actor only its own GPU; the ranks of a node then see the node's GPUs alike, so device
    `local_rank` is the rank's own one and NCCL can use peer-to-peer copies between them.
    """
    per_node: dict[str, list[str]] = {}
    for node, ids in zip(nodes, gpu_ids, strict=True):
        per_node.setdefault(node, []).extend(ids)
    return [",".join(per_node[node]) if per_node[node] else None for node in nodes]


def _by_message(errors: dict[int, str], world_size: int) -> str:
    """Each distinct error once, with the ranks that raised it ("every rank" when all did the same)."""
    ranks: dict[str, list[int]] = {}
    for rank, error in sorted(errors.items()):
        ranks.setdefault(error, []).append(rank)
    if len(ranks) == 1 and len(errors) == world_size > 1:
        return f"every rank: {next(iter(ranks))}"
    return "\n".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {e}" for e, r in ranks.items())


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def main() -> int:
    """The Jobs API entry point: the spec comes in `PRETRAIN_SPEC`; exit codes as the CLI's."""
    text = os.environ.get(SPEC_VARIABLE)
    try:
        if not text:
            raise UserError(f"{SPEC_VARIABLE} is not set: it carries the job spec (pretrain submit sets it)")
        spec = parse_spec(parse_yaml(text, source=SPEC_VARIABLE), source=SPEC_VARIABLE)
        ray.init(address="auto")
        Controller(spec, plan_layout=os.environ.get(PLAN_VARIABLE) == "1").run()
        return 0
    except UserError as e:
        print(f"pretrain: {e}", file=sys.stderr, flush=True)
        return 2
    except PretrainError as e:
        print(f"pretrain: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
