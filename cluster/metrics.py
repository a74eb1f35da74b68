"""Prometheus exporters of a run: one per rank, one for the controller, one for a dataprep job.

Every series a run publishes is declared once in `CATALOGUE` below; the Grafana dashboards
(`cluster.metrics_dashboards`) and the alert rules (`cluster.metrics_alerts`) are generated from the same entries, so
a renamed metric fails their tests instead of silently emptying a chart. Names follow Prometheus conventions: base
units, counters end in `_total`, durations in `_seconds`, sizes in `_bytes`. The labels are `run` (the job name;
`job` belongs to Prometheus, which would rename ours to `exported_job`), `rank` and `node`.

Values are kept as absolute numbers and rendered at scrape time by one small collector, so a counter carried across a
restart (tokens seen, restarts) continues from the checkpointed total instead of falling back to zero.

Addresses: an exporter binds the node's own address (Ray's node IP; `node_address` outside Ray), not every interface,
unless `metrics.host` names one (0.0.0.0 for all). Ports: `metrics.port = 0` binds every exporter to a free port; a
fixed port P gives the controller P and the rank with local rank i the port P + 1 + i (fixed ports are what a
Kubernetes PodMonitor needs).

Whoever knows every address (the controller) lists them in a file_sd targets file with `write_targets_file`, which
Prometheus watches, and takes them out with `remove_targets` when the run ends however it ends: a finished run's
exporters are gone, and a target left behind would read as an exporter down. Several runs may share one file: each
writes and removes only its own groups.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector, CollectorRegistry

from orchestrator.config_parser import WRITTEN_FILE_BOUNDS, load_json
from orchestrator.errors import UserError
from orchestrator.spec import JobSpec
from parallel.callbacks import BaseCallback, CheckpointStats, EvalStats, SpikeStats, StepStats

RUN_LABELS = ("run",)
RANK_LABELS = ("run", "rank", "node")


@dataclass(frozen=True)
class Metric:
    """One series family: its exposed name (with `_total` for counters), type, help and label names."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = RUN_LABELS


def _gauge(name: str, help: str, labels: tuple[str, ...] = RUN_LABELS) -> Metric:
    return Metric(name, "gauge", help, labels)


def _counter(name: str, help: str, labels: tuple[str, ...] = RUN_LABELS) -> Metric:
    assert name.endswith("_total"), name
    return Metric(name, "counter", help, labels)


# Every rank: what differs between ranks, so stragglers and memory imbalance show per rank.
STEP = _gauge("pretrain_step", "last optimizer step this rank finished", RANK_LABELS)
STEP_DURATION = _gauge("pretrain_step_duration_seconds", "wall time of this rank's last optimizer step", RANK_LABELS)
STEP_BUSY = _gauge("pretrain_step_busy_seconds", "this rank's own part of its last step (data, host work, the step "
                   "itself), without waiting for slower ranks: what sets a straggler apart", RANK_LABELS)
TOKENS_PER_SECOND = _gauge("pretrain_tokens_per_second", "this rank's share of the run's tokens per second, "
                           "last step (their sum over ranks is the run's throughput)", RANK_LABELS)
GPU_MEMORY = _gauge("pretrain_gpu_memory_bytes", "peak device memory allocated by this rank during its last step",
                    RANK_LABELS)
LAST_STEP_TIME = _gauge("pretrain_last_step_timestamp_seconds", "Unix time at which this rank finished its last step",
                        RANK_LABELS)
# Rank 0: one value per run.
LOSS = _gauge("pretrain_loss", "training loss of the last step (mean over the global batch)")
EVAL_LOSS = _gauge("pretrain_eval_loss", "validation loss of the last evaluation")
EVAL_SCORE = _gauge("pretrain_eval_score", "a downstream task's metric at the last in-loop evaluation "
                    "(lm-evaluation-harness; e.g. task hellaswag, metric acc_norm)", ("run", "task", "metric"))
LEARNING_RATE = _gauge("pretrain_learning_rate", "learning rate of the last step")
GRAD_NORM = _gauge("pretrain_grad_norm", "global gradient norm of the last step, before clipping")
MFU = _gauge("pretrain_mfu_ratio", "model FLOP utilisation of the last step: achieved / (devices × metrics.peak_flops)")
TOKENS = _counter("pretrain_tokens_total", "tokens trained on since the run began, across restarts")
SPIKE_ACTIONS = ("alert", "skip", "rewind")
LOSS_SPIKES = _counter("pretrain_loss_spikes_total", "loss spikes found since this attempt started, by what was done "
                       "(spikes.action; a rewind that was not possible counts as alert)", ("run", "action"))
CHECKPOINT_DURATION = _gauge("pretrain_checkpoint_duration_seconds", "wall time of the last checkpoint save or load",
                             ("run", "operation"))
CHECKPOINT_SIZE = _gauge("pretrain_checkpoint_bytes", "size on disk of the last checkpoint saved or loaded",
                         ("run", "operation"))
CHECKPOINT_STEP = _gauge("pretrain_checkpoint_step", "step of the newest checkpoint saved or resumed from")
CHECKPOINT_INTERVAL = _gauge("pretrain_checkpoint_interval_steps", "checkpoint.every of the run (0: only at the end)")
# A mixture of experts' routing over the last step, per MoE layer, from one rank of each pipeline stage (summed
# over the data-parallel ranks: `parallel.moe.routing_stats`). Token copies: a token routed to top_k experts counts
# top_k times.
_LAYER = ("run", "layer")
MOE_LOAD_MAX = _gauge("pretrain_moe_expert_load_max_tokens", "token copies routed to a MoE layer's busiest expert in "
                      "the last step", _LAYER)
MOE_LOAD_MEAN = _gauge("pretrain_moe_expert_load_mean_tokens", "token copies routed to an expert of a MoE layer in the "
                       "last step, averaged over its experts (the even share)", _LAYER)
MOE_LOAD_MIN = _gauge("pretrain_moe_expert_load_min_tokens", "token copies routed to a MoE layer's least loaded "
                      "expert in the last step", _LAYER)
MOE_ROUTER_ENTROPY = _gauge("pretrain_moe_router_entropy_nats", "mean entropy of a token's expert probabilities in a "
                            "MoE layer, last step (ln num_experts: uniform; 0: one expert certain)", _LAYER)
MOE_DROPPED = _gauge("pretrain_moe_dropped_tokens", "token copies a MoE layer dropped at its experts' capacity in the "
                     "last step (always 0 dropless: model.moe.capacity_factor=0)", _LAYER)
MOE_BALANCE_LOSS = _gauge("pretrain_moe_balance_loss", "a MoE layer's balancing loss Σ f·P in the last step, "
                          "unweighted (1: even load; num_experts: one expert takes every token)", _LAYER)
# Controller: the run as a whole.
RESTARTS = _counter("pretrain_restarts_total", "gang restarts of the run since it began")
STRAGGLER_RATIO = _gauge("pretrain_straggler_ratio", "a rank's last busy time over the median of the other ranks",
                         RANK_LABELS)
STRAGGLER_THRESHOLD = _gauge("pretrain_straggler_threshold_ratio", "resources.straggler_factor: the ratio above which "
                             "a rank counts as a straggler")
RANKS = _gauge("pretrain_ranks", "ranks the controller is running")
# Dataprep: per stage of the pipeline, per removal rule.
_STAGE = ("run", "stage")
DATAPREP_DOCUMENTS_IN = _counter("pretrain_dataprep_input_documents_total", "documents read by a stage", _STAGE)
DATAPREP_DOCUMENTS_OUT = _counter("pretrain_dataprep_output_documents_total", "documents a stage kept", _STAGE)
DATAPREP_BYTES_IN = _counter("pretrain_dataprep_input_bytes_total", "UTF-8 text bytes read by a stage", _STAGE)
DATAPREP_TOKENS_OUT = _counter("pretrain_dataprep_output_tokens_total", "tokens a stage wrote", _STAGE)
DATAPREP_REMOVED = _counter("pretrain_dataprep_removed_documents_total", "documents a stage removed, by rule",
                            ("run", "stage", "rule"))

CATALOGUE: tuple[Metric, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Metric))
MOE_SERIES = {metric.name: metric for metric in (MOE_LOAD_MAX, MOE_LOAD_MEAN, MOE_LOAD_MIN, MOE_ROUTER_ENTROPY,
                                                 MOE_DROPPED, MOE_BALANCE_LOSS)}
# Dataprep counter names keyed by what a stage reports (see `DataprepExporter.publish`).
DATAPREP_COUNTS = {
    "documents_in": DATAPREP_DOCUMENTS_IN, "documents_out": DATAPREP_DOCUMENTS_OUT,
    "bytes_in": DATAPREP_BYTES_IN, "tokens_out": DATAPREP_TOKENS_OUT,
}


class MetricsPortError(UserError):
    """An exporter could not bind its port; the message names the `metrics.port` setting to change."""


class MetricStore(Collector):
    """Absolute values per (metric, label values), rendered into metric families at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[Metric, dict[tuple[str, ...], float]] = {}

    def set(self, metric: Metric, value: float, /, **labels: Any) -> None:
        key = tuple(str(labels[name]) for name in metric.labels)
        with self._lock:
            self._values.setdefault(metric, {})[key] = float(value)

    def update(self, values: Mapping[Metric, float], /, **labels: Any) -> None:
        """Set several series sharing `labels` under one lock acquisition (the per-step path)."""
        keys: dict[tuple[str, ...], tuple[str, ...]] = {}
        with self._lock:
            for metric, value in values.items():
                key = keys.get(metric.labels)
                if key is None:
                    key = keys[metric.labels] = tuple(str(labels[name]) for name in metric.labels)
                self._values.setdefault(metric, {})[key] = float(value)

    def add(self, metric: Metric, amount: float, /, **labels: Any) -> None:
        key = tuple(str(labels[name]) for name in metric.labels)
        with self._lock:
            series = self._values.setdefault(metric, {})
            series[key] = series.get(key, 0.0) + float(amount)

    def get(self, metric: Metric, /, **labels: Any) -> float | None:
        key = tuple(str(labels[name]) for name in metric.labels)
        with self._lock:
            return self._values.get(metric, {}).get(key)

    def collect(self) -> Iterable[Any]:
        with self._lock:
            snapshot = {metric: dict(series) for metric, series in self._values.items()}
        for metric, series in snapshot.items():
            family_type = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
            family = family_type(metric.name, metric.help, labels=metric.labels)
            for key, value in series.items():
                family.add_metric(key, value)
            yield family


class Exporter:
    """An HTTP endpoint serving one registry; `target` is the host:port Prometheus should scrape.

    `host` empty binds the address it is advertised at (`advertise_host`, else `node_address()`): the node's own
    interface, where Prometheus reaches it, rather than every interface of the machine.
    """

    def __init__(self, collector: Collector, *, host: str = "", port: int, advertise_host: str | None = None,
                 owner: str = "exporter"):
        host = host or advertise_host or node_address()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise MetricsPortError(
                f"metrics.port: the {owner} cannot listen on {host}:{port} ({e.strerror or e}); "
                "choose a free metrics.port, or 0 to pick free ports"
            ) from None
        self.host = host
        self.port = int(self._server.server_port)
        self.advertise_host = advertise_host or _reachable_host(host)

    @property
    def target(self) -> str:
        return f"{self.advertise_host}:{self.port}"

    def close(self) -> None:
        """Stop serving; closing again does nothing."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _reachable_host(bind: str) -> str:
    """The address other machines reach a server bound to `bind` at (a wildcard bind means this node's address)."""
    return node_address() if bind in ("", "0.0.0.0", "::") else bind


def node_address() -> str:
    """This node's address as other machines see it: Ray's node IP in a Ray process, else the source address of the
    route out of the machine (a UDP socket's, which sends nothing); 127.0.0.1 on a machine with no route."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 53))  # as Ray finds its node IP: the source address of the default route
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def controller_port(base: int) -> int:
    """The controller's port for `metrics.port = base` (0: any free port)."""
    return base


def rank_port(base: int, local_rank: int) -> int:
    """The port of the rank with this local rank for `metrics.port = base` (0: any free port)."""
    return base + 1 + local_rank if base else 0


# ---------------------------------------------------------------------------------------------- ranks


class RankExporter(BaseCallback):
    """Serves one rank's metrics as a training-loop callback (`parallel.callbacks.Callback`).

    Every rank publishes its own step time, throughput share and memory; rank 0 also publishes the run-level series
    (loss, learning rate, gradient norm, MFU, tokens, checkpoints) so each appears once per run, and a mixture of
    experts' routing per layer comes from the ranks whose steps carry it (one per pipeline stage). Hooks only store
    numbers: the HTTP server thread renders them when Prometheus scrapes, off the training loop's critical path.
    """

    def __init__(self, run: str, rank: int, *, node: str | None = None, local_rank: int = 0, host: str = "",
                 port: int = 0, checkpoint_every: int = 0, advertise_host: str | None = None):
        self.run, self.rank, self.node = run, rank, node or socket.gethostname()
        self.store = MetricStore()
        self._rank_labels = {"run": run, "rank": rank, "node": self.node}
        self._checkpoint = _CheckpointSize(run)
        self.store.set(STEP, 0, **self._rank_labels)
        if rank == 0:
            self.store.set(CHECKPOINT_INTERVAL, checkpoint_every, run=run)
            self.store.set(CHECKPOINT_STEP, 0, run=run)
            for action in SPIKE_ACTIONS:  # from 0, so that increase() sees the first spike
                self.store.set(LOSS_SPIKES, 0, run=run, action=action)
        self.exporter = Exporter(_Merged(self.store, self._checkpoint), host=host, port=rank_port(port, local_rank),
                                 advertise_host=advertise_host, owner=f"rank {rank}")

    @classmethod
    def from_spec(cls, spec: JobSpec, rank: int, local_rank: int, *, node: str | None = None,
                  advertise_host: str | None = None) -> RankExporter:
        m = spec.metrics
        return cls(spec.name, rank, node=node, local_rank=local_rank, host=m.host, port=m.port,
                   checkpoint_every=spec.checkpoint.every, advertise_host=advertise_host)

    @property
    def target(self) -> str:
        return self.exporter.target

    def on_train_start(self, step: int, rank: int) -> None:
        """The loop starts at `step` (a resumed run: the step of the checkpoint it loaded)."""
        self.store.set(STEP, step, **self._rank_labels)
        if self.rank == 0:
            self.store.set(CHECKPOINT_STEP, step, run=self.run)

    def on_step(self, stats: StepStats) -> None:
        values = {
            STEP: stats.step, STEP_DURATION: stats.step_seconds, GPU_MEMORY: stats.memory_peak_bytes,
            TOKENS_PER_SECOND: stats.tokens_per_second / max(stats.world_size, 1), LAST_STEP_TIME: time.time(),
        }
        if self.rank == 0:
            values.update({LOSS: stats.loss, LEARNING_RATE: stats.lr, GRAD_NORM: stats.grad_norm,
                           TOKENS: stats.total_tokens})
            if stats.mfu is not None:  # None where the device's peak FLOP/s is unknown (CPU)
                values[MFU] = stats.mfu
        if stats.busy_seconds is not None:
            values[STEP_BUSY] = stats.busy_seconds
        self.store.update(values, **self._rank_labels)
        for layer in stats.moe:
            self.store.update({MOE_SERIES[name]: value for name, value in layer.series().items()}, run=self.run,
                              layer=layer.layer)

    def on_eval(self, stats: EvalStats) -> None:
        if self.rank != 0:
            return
        if not math.isnan(stats.loss):  # nan: this evaluation ran only downstream tasks; the last loss stands
            self.store.set(EVAL_LOSS, stats.loss, run=self.run)
        for key, value in stats.scores.items():
            task, _, metric = key.rpartition("/")
            self.store.set(EVAL_SCORE, value, run=self.run, task=task, metric=metric)

    def on_spike(self, stats: SpikeStats) -> None:
        if self.rank == 0:
            self.store.add(LOSS_SPIKES, 1, run=self.run, action=stats.action)

    def on_checkpoint(self, stats: CheckpointStats) -> None:
        if self.rank == 0:
            self.store.set(CHECKPOINT_DURATION, stats.seconds, run=self.run, operation="save")
            self.store.set(CHECKPOINT_STEP, stats.step, run=self.run)
            self._checkpoint.path = stats.path

    def close(self) -> None:
        self.exporter.close()


class _CheckpointSize(Collector):
    """The newest checkpoint's size, measured at scrape time: walking its files on the loop's thread would stall it."""

    def __init__(self, run: str):
        self.run = run
        self.path: str | None = None
        self._sized: tuple[str, float] | None = None

    def collect(self) -> Iterable[Any]:
        path = self.path
        if path is None or "://" in path or not os.path.isdir(path):
            return
        if self._sized is None or self._sized[0] != path:
            self._sized = (path, float(_directory_bytes(path)))
        family = GaugeMetricFamily(CHECKPOINT_SIZE.name, CHECKPOINT_SIZE.help, labels=CHECKPOINT_SIZE.labels)
        family.add_metric((self.run, "save"), self._sized[1])
        yield family


def _directory_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                continue
    return total


class _Merged(Collector):
    def __init__(self, *collectors: Collector):
        self.collectors = collectors

    def collect(self) -> Iterable[Any]:
        for collector in self.collectors:
            yield from collector.collect()


# ---------------------------------------------------------------------------------------------- controller


class ControllerExporter:
    """The run-level view the controller has: restarts, stragglers, ranks, and where every exporter listens."""

    def __init__(self, run: str, *, host: str = "", port: int = 0, straggler_factor: float = 1.5,
                 restarts: int = 0, advertise_host: str | None = None):
        self.run = run
        self.store = MetricStore()
        self.store.set(RESTARTS, restarts, run=run)
        self.store.set(STRAGGLER_THRESHOLD, straggler_factor, run=run)
        self.store.set(RANKS, 0, run=run)
        self._targets_path: str | None = None
        self.exporter = Exporter(self.store, host=host, port=controller_port(port), advertise_host=advertise_host,
                                 owner="controller")

    @classmethod
    def from_spec(cls, spec: JobSpec, *, restarts: int = 0, advertise_host: str | None = None) -> ControllerExporter:
        m = spec.metrics
        return cls(spec.name, host=m.host, port=m.port, straggler_factor=spec.resources.straggler_factor,
                   restarts=restarts, advertise_host=advertise_host)

    @property
    def target(self) -> str:
        return self.exporter.target

    def record_restart(self, ranks: int) -> None:
        self.store.add(RESTARTS, 1, run=self.run)
        self.set_ranks(ranks)

    def set_ranks(self, ranks: int) -> None:
        self.store.set(RANKS, ranks, run=self.run)

    def set_step_times(self, step_times: Mapping[int, tuple[str, float]]) -> dict[int, float]:
        """Publish each rank's step time over the others' median ({rank: (node, seconds)}); returns {rank: ratio}."""
        ratios = straggler_ratios({rank: seconds for rank, (_, seconds) in step_times.items()})
        for rank, ratio in ratios.items():
            self.store.set(STRAGGLER_RATIO, ratio, run=self.run, rank=rank, node=step_times[rank][0])
        return ratios

    def write_targets(self, path: str | os.PathLike, rank_targets: Iterable[str]) -> None:
        """Advertise this exporter and the ranks' (host:port each) to Prometheus through a file_sd file, in place of
        what this run listed there before (the exporters of an earlier attempt)."""
        write_targets_file(path, [
            {"targets": [self.target], "labels": {"run": self.run, "role": "controller"}},
            {"targets": sorted(rank_targets), "labels": {"run": self.run, "role": "rank"}},
        ])
        self._targets_path = os.fspath(path)

    def close(self) -> None:
        """Take the run's targets out of the file_sd file, then stop serving: Prometheus stops scraping the run's
        exporters as they go away, rather than finding them down."""
        if self._targets_path is not None:
            remove_targets(self._targets_path, self.run)
            self._targets_path = None
        self.exporter.close()


def straggler_ratios(step_times: Mapping[int, float]) -> dict[int, float]:
    """Each rank's step time over the median of the other ranks: 1.0 is typical, above `straggler_factor` a straggler.

    The others', not all ranks': of two ranks the median of all is their mean, and a rank twice as slow as its partner
    would show 1.33 rather than 2; with many ranks the two agree.
    """
    if len(step_times) < 2:
        return {rank: 1.0 for rank in step_times}
    ranks = sorted(step_times, key=step_times.__getitem__)
    ordered = [step_times[r] for r in ranks]
    others = len(ordered) - 1

    def other(position: int, skipped: int) -> float:
        return ordered[position + (position >= skipped)]

    ratios = {}
    for skipped, rank in enumerate(ranks):
        median = (other(others // 2, skipped) + other((others - 1) // 2, skipped)) / 2
        ratios[rank] = step_times[rank] / median if median > 0 else 1.0
    return ratios


def write_targets_file(path: str | os.PathLike, groups: list[dict[str, Any]]) -> None:
    """List `groups` in a Prometheus file_sd targets file, replacing the earlier groups of the runs they name (their
    `run` label) and keeping other runs'. The file is replaced atomically, so Prometheus never reads half of one."""
    runs = {g["labels"].get("run") for g in groups}
    with _locked(path):
        kept = [g for g in _read_targets(path) if g.get("labels", {}).get("run") not in runs]
        _replace_targets(path, kept + [g for g in groups if g["targets"]])


def remove_targets(path: str | os.PathLike, run: str) -> None:
    """Take run `run`'s groups out of a file_sd targets file; the file goes when no group is left."""
    with _locked(path):
        kept = [g for g in _read_targets(path) if g.get("labels", {}).get("run") != run]
        if kept:
            _replace_targets(path, kept)
        elif os.path.exists(path):
            os.unlink(path)


@contextmanager
def _locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `path`'s directory (runs sharing one targets file update it in turn; a lock file
    would be left beside it)."""
    directory = os.path.dirname(os.fspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_targets(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The groups listed in `path` now (none when it does not exist); anything else there is the user's, kept."""
    if not os.path.exists(path):
        return []
    source = os.fspath(path)

    def refused(why: str) -> UserError:
        return UserError(f"metrics.targets_file: {source} is not a Prometheus file_sd list of target groups ({why}); "
                         "move it away or name another file")

    groups = load_json(source, bounds=WRITTEN_FILE_BOUNDS, error=lambda why: refused(why.removeprefix(f"{source}: ")))
    if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("labels", {}), dict) for g in groups):
        raise refused("each group is an object with targets and labels")
    return groups


def _replace_targets(path: str | os.PathLike, groups: list[dict[str, Any]]) -> None:
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".targets-", suffix=".json", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(groups, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def default_targets_path(targets_file: str, checkpoint_dir: str, run: str) -> str:
    """`metrics.targets_file`, else `<checkpoint.dir>/../targets.json`, else (remote checkpoints) `runs/<run>/`."""
    if targets_file:
        return targets_file
    if "://" in checkpoint_dir:
        return os.path.join("runs", run, "targets.json")
    return os.path.join(os.path.dirname(os.path.normpath(checkpoint_dir)), "targets.json")


# ---------------------------------------------------------------------------------------------- dataprep


class DataprepExporter:
    """A dataprep job's throughput and removals per stage, read from the job's own counters at each scrape."""

    def __init__(self, run: str, *, poll: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None,
                 host: str = "", port: int = 0, advertise_host: str | None = None):
        self.run = run
        self._poll = poll
        self._published: dict[str, Mapping[str, Any]] = {}
        self._lock = threading.Lock()
        self.exporter = Exporter(_PollingCollector(self._render), host=host, port=port,
                                 advertise_host=advertise_host, owner="dataprep exporter")

    @property
    def target(self) -> str:
        return self.exporter.target

    def publish(self, stage: str, counts: Mapping[str, Any]) -> None:
        """Set a stage's running totals: documents_in/out, bytes_in, tokens_out (ints) and removed ({rule: n})."""
        unknown = set(counts) - set(DATAPREP_COUNTS) - {"removed"}
        if unknown:
            raise ValueError(f"unknown dataprep counts {sorted(unknown)}; allowed: {sorted(DATAPREP_COUNTS)}, removed")
        with self._lock:
            self._published[stage] = dict(counts)

    def _render(self) -> MetricStore:
        with self._lock:
            stages = dict(self._published)
        if self._poll is not None:
            stages.update(self._poll())
        store = MetricStore()
        for stage, counts in stages.items():
            for key, metric in DATAPREP_COUNTS.items():
                if counts.get(key) is not None:
                    store.set(metric, counts[key], run=self.run, stage=stage)
            for rule, removed in (counts.get("removed") or {}).items():
                store.set(DATAPREP_REMOVED, removed, run=self.run, stage=stage, rule=rule)
        return store

    def close(self) -> None:
        self.exporter.close()


def prep_stage_counts(snapshot: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-stage counts from a `dataprep.stats.PrepStats.snapshot()` (flat counters: docs_in, bytes_in, docs_kept,
    removed_<reason>, train_tokens, val_tokens), the shape `DataprepExporter(poll=...)` takes.

    Ingest reads every document; select applies dedup and the quality filters (its removals carry the rule); pack
    writes the tokens.
    """
    counters = snapshot.get("counters", {})
    out: dict[str, dict[str, Any]] = {}
    if "docs_in" in counters or "bytes_in" in counters:
        out["ingest"] = {"documents_in": counters.get("docs_in"), "bytes_in": counters.get("bytes_in")}
    removed = {k.removeprefix("removed_"): v for k, v in counters.items() if k.startswith("removed_")}
    if "docs_kept" in counters:
        out["select"] = {"documents_in": counters.get("docs_in"), "documents_out": counters["docs_kept"],
                         "removed": removed}
    if "train_tokens" in counters:
        out["pack"] = {"tokens_out": counters["train_tokens"] + counters.get("val_tokens", 0)}
    return out


class _PollingCollector(Collector):
    def __init__(self, render: Callable[[], MetricStore]):
        self._render = render

    def collect(self) -> Iterable[Any]:
        return self._render().collect()
