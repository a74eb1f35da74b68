"""Experiment trackers: the run's scalars in TensorBoard, Weights & Biases and MLflow, beside Prometheus.

    metrics: {loggers: [prometheus, tensorboard, wandb, mlflow]}

Each tracker gets the scalars the Prometheus exporters publish, under the same names (`cluster.metrics`), at the
optimizer step they belong to, with the run's name and its resolved spec as the tracker run's config:
`pretrain_loss`, `pretrain_learning_rate`, `pretrain_grad_norm`, `pretrain_tokens_per_second` (the run's; the
exporters' per-rank series sum to it), `pretrain_tokens_total`, `pretrain_mfu_ratio` (on accelerators),
`pretrain_gpu_memory_bytes` and `pretrain_step_duration_seconds` / `pretrain_step_busy_seconds` (rank 0's),
`pretrain_eval_loss`, `pretrain_eval_score/<task>/<metric>` (Prometheus: `pretrain_eval_score{task, metric}`),
`pretrain_loss_spikes_total/<action>` (Prometheus: `pretrain_loss_spikes_total{action}`) and
`pretrain_checkpoint_duration_seconds`.

Rank 0 alone writes, and never on the loop's time: a hook turns its record into `(step, {name: value})` and appends
it to a queue of `QUEUE_RECORDS` that one background thread empties into every tracker, all the records queued
meanwhile at once (one MLflow commit, one TensorBoard flush for all of them). A tracker that falls that
far behind loses the oldest records rather than stalling the step (counted in `dropped`, and logged when the first
is lost and at the end); `close` drains what is queued, then closes the trackers, which flush. A tracker that fails
mid-run is logged and left out; the run goes on.

Resuming: the tracker runs' ids live in `<checkpoint.dir>/trackers.json` (written whole or not at all), and a resumed
run continues the same tracker runs: TensorBoard writes to the same directory with `purge_step` at the first step
trained again, so the replayed steps replace the ones the crash left; W&B resumes its run id (`resume="allow"`; in
offline mode each attempt is a directory of its own under the same id, which `wandb sync` joins); MLflow reopens its
run and skips the steps it already holds. Steps trained again within an attempt (a loss spike's rewind) likewise
replace the earlier ones in TensorBoard (a new event file with `purge_step` at the first of them) and keep the first
values in W&B and MLflow, which cannot replace a value.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from orchestrator.errors import UserError
from orchestrator.spec import LOGGERS, TRACKERS_INSTALL, JobSpec, spec_to_yaml
from parallel.callbacks import BaseCallback, CheckpointStats, EvalStats, SpikeStats, StepStats
from parallel.storage import Storage

log = logging.getLogger(__name__)

QUEUE_RECORDS = 10_000  # hours of steps at any realistic step time: only a tracker that hangs loses records
CLOSE_TIMEOUT_S = 120.0
IDS_FILE = "trackers.json"
TRACKERS = tuple(name for name in LOGGERS if name != "prometheus")
Scalars = dict[str, float]
Record = tuple[int, Scalars]  # (step, {name: value})


# ---------------------------------------------------------------------------------------------- names


def step_scalars(stats: StepStats) -> Scalars:
    out = {
        "pretrain_loss": stats.loss, "pretrain_learning_rate": stats.lr, "pretrain_grad_norm": stats.grad_norm,
        "pretrain_tokens_per_second": stats.tokens_per_second, "pretrain_tokens_total": stats.total_tokens,
        "pretrain_step_duration_seconds": stats.step_seconds, "pretrain_gpu_memory_bytes": stats.memory_peak_bytes,
    }
    if stats.mfu is not None:
        out["pretrain_mfu_ratio"] = stats.mfu
    if stats.busy_seconds is not None:
        out["pretrain_step_busy_seconds"] = stats.busy_seconds
    for layer in stats.moe:  # the layer as the last part of the name
        out |= {f"{name}/{layer.layer}": value for name, value in layer.series().items()}
    return out


def eval_scalars(stats: EvalStats) -> Scalars:
    out = {} if math.isnan(stats.loss) else {"pretrain_eval_loss": stats.loss}
    out.update({score_name(key): value for key, value in stats.scores.items()})
    return out


def score_name(key: str) -> str:
    """`pretrain_eval_score/<task>/<metric>` for a score keyed "task/metric"; characters a tracker refuses in a name
    (MLflow takes letters, digits, `_ - . /` and spaces) become `_`, so lm-eval's "acc,none" is "acc_none"."""
    task, _, metric = key.rpartition("/")
    return "/".join(["pretrain_eval_score"] + [re.sub(r"[^\w.\- ]", "_", part).strip(". ") or "_"
                                               for part in (task, metric)])


# ---------------------------------------------------------------------------------------------- writers


class TensorBoardWriter:
    """Event files in one directory per run; a resumed run purges the steps it trains again."""

    name = "tensorboard"

    def __init__(self, directory: str, start: int, run: str, config_yaml: str):
        self.directory, self.writer = directory, None
        self.restart_at(start + 1)
        self.writer.add_text("run", run, start)
        self.writer.add_text("spec", "```yaml\n" + config_yaml + "```", start)
        self.id = None

    def write(self, records: list[Record]) -> None:
        for step, scalars in records:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        self.writer.flush()  # on the trackers' thread, not the loop's: a crashed attempt leaves what it recorded

    def restart_at(self, step: int) -> None:
        """Steps from `step` on are trained again: a writer whose `purge_step` tells TensorBoard's reader to drop the
        events recorded for them before."""
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is not None:
            self.writer.close()
        self.writer = SummaryWriter(self.directory, purge_step=step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbWriter:
    """A W&B run, offline by default (written under `directory`, uploaded later by `wandb sync`)."""

    name = "wandb"

    def __init__(self, spec: JobSpec, directory: str, config: Mapping[str, Any], run_id: str | None):
        import wandb

        w = spec.metrics.wandb
        # console off: W&B would wrap the rank's stdout, which Ray streams; stats off: the system metrics come from
        # Prometheus and DCGM, without a sampling process per run.
        settings = wandb.Settings(console="off", silent=True, save_code=False, disable_git=True,
                                  x_disable_stats=True)
        self.run = wandb.init(project=w.project, entity=w.entity or None, name=spec.name, id=run_id or _new_id(),
                              resume="allow", mode=w.mode, dir=directory, settings=settings)
        # After init rather than through it: a resumed run whose spec changed (more steps, another layout) would
        # otherwise be refused for changing a config value.
        self.run.config.update(dict(config), allow_val_change=True)
        self.id = self.run.id
        self.next = self.run.step  # online, a resumed run's next step: W&B refuses earlier ones

    def write(self, records: list[Record]) -> None:
        for step, scalars in records:
            if step >= self.next:
                self.run.log(scalars, step=step)
                self.next = step

    def restart_at(self, step: int) -> None:
        self.next += 1  # the steps trained again keep the values W&B has: it takes no earlier step

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowWriter:
    """An MLflow run through `MlflowClient` (thread-safe, unlike the fluent API's active run): the spec's fields as
    params, the scalars as metrics with their step."""

    name = "mlflow"

    def __init__(self, spec: JobSpec, uri: str, config: Mapping[str, Any], run_id: str | None):
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        self.next = 0
        run = None
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except MlflowException:
                run = None  # not in this store (metrics.mlflow.uri changed): a run of its own
        if run is None:
            experiment = spec.metrics.mlflow.experiment
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, artifact_location=_artifacts_beside(uri))
            run = self.client.create_run(experiment_id, run_name=spec.name)
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            history = self.client.get_metric_history(run.info.run_id, "pretrain_loss")
            self.next = max((m.step for m in history), default=-1) + 1
        self.id = run.info.run_id
        held = run.data.params  # params cannot change: a resumed run adds only what is new (a changed layout stays)
        params = [Param(k, v) for k, v in _flatten(config).items() if k not in held]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.id, params=params[i:i + 100])

    def write(self, records: list[Record]) -> None:
        """Every record in as few calls as MLflow takes (1,000 values each): each call is a database commit."""
        now, metrics = int(time.time() * 1000), []
        for step, scalars in records:
            if step >= self.next:
                metrics += [self._metric(k, float(v), now, step) for k, v in scalars.items()]
                self.next = step
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.id, metrics=metrics[i:i + 1000])

    def restart_at(self, step: int) -> None:
        self.next += 1  # the steps trained again keep the values MLflow has: it would hold both otherwise

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.id, status="FAILED" if failed else "FINISHED")


def _new_id() -> str:
    return uuid.uuid4().hex[:16]


def _artifacts_beside(uri: str) -> str | None:
    """A sqlite store's artifacts beside its database file (MLflow's default is ./mlruns in whatever the cwd is)."""
    if not uri.startswith("sqlite:///"):
        return None
    return "file://" + os.path.join(os.path.dirname(os.path.abspath(uri.removeprefix("sqlite:///"))),
                                    "mlflow-artifacts")


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return out


# ---------------------------------------------------------------------------------------------- the callback


class TrackerCallback(BaseCallback):
    """Rank 0's trackers, opened when the loop starts (at the step it resumed from) and fed by a background thread.

    Opening happens on the loop's thread, so a tracker that cannot start (an unwritable directory, an unreachable
    server) stops the run with a message naming its setting before the first step, rather than silently recording
    nothing.
    """

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.writers: list[Any] = []
        self.dropped = 0
        self.spikes: dict[str, int] = {}  # by action, since this attempt started (as Prometheus counts them)
        self._queue: deque[tuple[int, Scalars | None]] = deque(maxlen=QUEUE_RECORDS)  # None: a restart of steps
        self._ready = threading.Condition()
        self._closing = self._failed = False
        self._thread: threading.Thread | None = None

    def on_train_start(self, step: int, rank: int) -> None:
        if rank != 0:
            return
        self.writers = open_writers(self.spec, step)
        self._thread = threading.Thread(target=self._drain, name="trackers", daemon=True)
        self._thread.start()

    def on_step(self, stats: StepStats) -> None:
        if stats.rank == 0:
            self._put(stats.step, step_scalars(stats))

    def on_eval(self, stats: EvalStats) -> None:
        if stats.rank == 0:
            self._put(stats.step, eval_scalars(stats))

    def on_checkpoint(self, stats: CheckpointStats) -> None:
        if stats.rank == 0:
            self._put(stats.step, {"pretrain_checkpoint_duration_seconds": stats.seconds})

    def on_spike(self, stats: SpikeStats) -> None:
        if stats.rank == 0:
            if stats.action == "rewind":  # first, so the spike's own step (never recorded) is not taken as held
                self._put(stats.rewound_to + 1, None)
            self.spikes[stats.action] = self.spikes.get(stats.action, 0) + 1
            self._put(stats.step, {f"pretrain_loss_spikes_total/{stats.action}": self.spikes[stats.action]})

    def _put(self, step: int, scalars: Scalars | None) -> None:
        """Queue `scalars` at `step`; None: the steps from `step` on are trained again."""
        if self._thread is None or scalars == {}:
            return
        with self._ready:
            if len(self._queue) == QUEUE_RECORDS:  # the deque drops its oldest record to take this one
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("trackers are %d records behind; dropping the oldest until they catch up",
                                QUEUE_RECORDS)
            self._queue.append((step, scalars))
            self._ready.notify()

    def _drain(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._queue or self._closing)
                batch = list(self._queue)
                self._queue.clear()
                closing = self._closing
            while batch:  # the records up to the next restart of steps together, then that restart
                cut = next((i for i, (_, scalars) in enumerate(batch) if scalars is None), len(batch))
                if cut:
                    self._write(batch[:cut])
                if cut < len(batch):
                    self._restart(batch[cut][0])
                batch = batch[cut + 1:]
            if closing:
                break
        if self.dropped:
            log.warning("trackers dropped %d records they could not keep up with", self.dropped)
        for writer in self.writers:
            try:
                writer.close(self._failed)
            except Exception as e:  # noqa: BLE001 - one tracker failing to close leaves the others to close
                log.warning("%s: closing failed: %s", writer.name, e)

    def _write(self, records: list[Record]) -> None:
        self._each_writer(lambda writer: writer.write(records), records[-1][0])

    def _restart(self, step: int) -> None:
        self._each_writer(lambda writer: writer.restart_at(step), step)

    def _each_writer(self, act: Callable[[Any], None], step: int) -> None:
        for writer in list(self.writers):
            try:
                act(writer)
            except Exception as e:  # noqa: BLE001 - a tracker's failure must not end the training run
                log.warning("%s stopped recording at step %d: %s", writer.name, step, e)
                self.writers.remove(writer)

    def close(self) -> None:
        """Drain the queue and close the trackers; a tracker run is marked failed when the loop is ending with an
        exception (the loop closes its callbacks in a `finally`; a resumed attempt marks the run running again)."""
        if self._thread is None:
            return
        with self._ready:
            self._failed = sys.exc_info()[0] is not None
            self._closing = True
            self._ready.notify()
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("trackers still writing after %.0f s; the last records may be missing", CLOSE_TIMEOUT_S)
        self._thread = None


# ---------------------------------------------------------------------------------------------- opening


def tracker_callbacks(spec: JobSpec, rank: int) -> list[TrackerCallback]:
    """The run's tracker callback on rank 0 when `metrics.loggers` names a tracker; nothing otherwise."""
    if rank != 0 or not any(spec.metrics.uses(name) for name in TRACKERS):
        return []
    missing = spec.metrics.missing_trackers()
    if missing:
        raise UserError(f"metrics.loggers: {', '.join(missing)} named but not installed here: {TRACKERS_INSTALL}")
    return [TrackerCallback(spec)]


def run_directory(spec: JobSpec) -> str:
    """Where the trackers' files go by default: the checkpoint directory, or runs/<name> when that is remote."""
    return os.path.join("runs", spec.name) if "://" in spec.checkpoint.dir else spec.checkpoint.dir


def open_writers(spec: JobSpec, start: int) -> list[Any]:
    """Open every tracker the spec names, continuing the tracker runs in trackers.json when the run resumes."""
    m, home, storage = spec.metrics, run_directory(spec), Storage(spec.checkpoint.dir)
    ids = read_ids(storage) if spec.checkpoint.resume else {}
    config = yaml.safe_load(spec_to_yaml(spec))
    writers: list[Any] = []
    try:
        if m.uses("tensorboard"):
            directory = writable("metrics.tensorboard.dir", m.tensorboard.dir or os.path.join(home, "tensorboard"))
            writers.append(TensorBoardWriter(directory, start, spec.name, spec_to_yaml(spec)))
        if m.uses("wandb"):
            directory = writable("metrics.wandb.dir", m.wandb.dir or home)
            writers.append(_opened("metrics.wandb", lambda: WandbWriter(spec, directory, config, ids.get("wandb"))))
        if m.uses("mlflow"):
            uri = m.mlflow.uri or f"sqlite:///{os.path.abspath(os.path.join(home, 'mlflow.db'))}"
            if uri.startswith("sqlite:///"):
                writable("metrics.mlflow.uri", os.path.dirname(uri.removeprefix("sqlite:///")) or ".")
            writers.append(_opened("metrics.mlflow.uri", lambda: MlflowWriter(spec, uri, config, ids.get("mlflow"))))
        ids = {w.name: w.id for w in writers if w.id is not None}
        if ids:  # written whole or not at all (`Storage.write_bytes`), beside the checkpoints wherever they are
            storage.write_bytes(json.dumps(ids, indent=1).encode(), IDS_FILE)
    except BaseException:
        for writer in writers:
            writer.close(failed=True)
        raise
    return writers


def _opened(setting: str, start: Any) -> Any:
    """`start()`, its failure turned into one message naming the setting to look at."""
    try:
        return start()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the tracker's library raises, the user sees one line
        raise UserError(f"{setting}: the tracker could not start: {type(e).__name__}: {e}") from None


def writable(setting: str, directory: str) -> str:
    """`directory`, created, after checking a file can be written in it; else a message naming `setting`."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise UserError(f"{setting}: cannot write in {directory} ({e.strerror or e}); choose a writable "
                        "directory") from None
    return directory


def read_ids(storage: Storage) -> dict[str, str]:
    """The tracker run ids an earlier attempt of this run stored; none when there is no readable file."""
    try:
        ids = json.loads(storage.read_bytes(IDS_FILE))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}
