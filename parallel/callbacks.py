"""What the training loop tells the outside world, and how it is told: `StepStats` records and `Callback` hooks.

Metrics exporters, heartbeats and loggers implement `Callback`; the loop calls every hook on every rank, so a
callback that should act once per job checks `stats.rank` itself. Hooks must be cheap: they run on the critical path.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class MoELayerStats:
    """One MoE layer's routing over a step, summed over the data-parallel ranks (`parallel.moe.routing_stats`):
    token copies per expert (a token routed to top_k experts counts top_k times) and how the router decided."""

    layer: int
    max_load: float  # copies routed to the busiest expert
    mean_load: float  # ... to an expert on average: the even share
    min_load: float  # ... to the least loaded expert
    router_entropy: float  # mean entropy of a token's expert probabilities, in nats
    dropped_tokens: float  # copies dropped at capacity
    balance_loss: float  # Σ f·P, unweighted: 1 when the load is even

    def series(self) -> dict[str, float]:
        """The values under the names every logger gives them (the Prometheus series, `cluster.metrics`)."""
        return {"pretrain_moe_expert_load_max_tokens": self.max_load,
                "pretrain_moe_expert_load_mean_tokens": self.mean_load,
                "pretrain_moe_expert_load_min_tokens": self.min_load,
                "pretrain_moe_router_entropy_nats": self.router_entropy,
                "pretrain_moe_dropped_tokens": self.dropped_tokens, "pretrain_moe_balance_loss": self.balance_loss}


def moe_layer_stats(model) -> list[MoELayerStats]:
    """The routing of `model`'s MoE layers over the last step (none for a dense model); one host sync."""
    from parallel.moe import routing_stats

    return [MoELayerStats(r.layer, r.max_load, r.mean_load, min(r.tokens_per_expert), r.router_entropy,
                          r.dropped_tokens, r.aux_loss) for r in routing_stats(model)]


@dataclass
class StepStats:
    """One optimizer step as seen by one rank. Times in seconds, memory in bytes, rates per second."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int  # tokens consumed by the whole job in this step (all data-parallel ranks)
    step_seconds: float
    tokens_per_second: float  # whole job
    mfu: float | None  # model FLOPs utilisation of this rank's device, 0..1 (see `mfu`); None: peak unknown (CPU)
    memory_allocated_bytes: int = 0
    memory_peak_bytes: int = 0
    total_tokens: int = 0  # tokens consumed since step 0 (counting steps before a resume)
    rank: int = 0
    world_size: int = 1
    # This rank's own part of the step, without the time it waited for slower ranks: what tells a straggler, since
    # the collectives make the whole step equally long everywhere. None where the producer does not measure it.
    busy_seconds: float | None = None
    # A mixture of experts' routing, per MoE layer this rank holds; filled on one rank of each pipeline stage.
    moe: list[MoELayerStats] = field(default_factory=list)


@dataclass
class EvalStats:
    step: int
    loss: float  # held-out loss; nan when this evaluation ran only downstream tasks
    batches: int
    seconds: float
    rank: int = 0
    # Downstream task metrics by "task/metric" (e.g. "hellaswag/acc_norm"): what the in-loop evaluation measured.
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class SpikeStats:
    """A loss spike and what the loop did about it (`parallel.spikes`): the step's values against the median and
    median absolute deviation (MAD) of the steps before."""

    step: int
    action: str  # alert, skip or rewind: what was done (a rewind not possible is reported as an alert)
    loss: float
    grad_norm: float
    loss_median: float
    loss_mad: float
    grad_norm_median: float
    grad_norm_mad: float
    skipped: str = ""  # the data skipped, in data.skip's form: the batch (skip), everything read since the checkpoint
    rewound_to: int = 0  # rewind: the step of the checkpoint training went back to
    note: str = ""  # why an asked-for rewind was only an alert
    rank: int = 0


@dataclass
class CheckpointStats:
    step: int
    path: str
    seconds: float  # how long training was stalled by the save
    rank: int = 0


@runtime_checkable
class Callback(Protocol):
    """Named hooks of the training loop; implement the ones you need (see `BaseCallback`)."""

    def on_train_start(self, step: int, rank: int) -> None: ...

    def on_step(self, stats: StepStats) -> None: ...

    def on_eval(self, stats: EvalStats) -> None: ...

    def on_checkpoint(self, stats: CheckpointStats) -> None: ...

    def on_spike(self, stats: SpikeStats) -> None: ...

    def close(self) -> None: ...


class BaseCallback:
    """Every hook does nothing: subclass and override what you need."""

    def on_train_start(self, step: int, rank: int) -> None:
        pass

    def on_step(self, stats: StepStats) -> None:
        pass

    def on_eval(self, stats: EvalStats) -> None:
        pass

    def on_checkpoint(self, stats: CheckpointStats) -> None:
        pass

    def on_spike(self, stats: SpikeStats) -> None:
        pass

    def close(self) -> None:
        pass


def mfu(flops_per_token: float, tokens_per_second: float, num_devices: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: (6·N + 12·L·seq·dim) · tokens/s / (devices · peak FLOP/s of one device).

    `flops_per_token` is `ModelDims.flops_per_token(seq_len)` (the 6·N + attention term); `peak_flops` is the
    spec's `metrics.peak_flops` (989e12: dense bf16 of an H100 SXM). Recomputed activations are not counted, so
    activation checkpointing lowers MFU, as it should.
    """
    return flops_per_token * tokens_per_second / (num_devices * peak_flops)


def device_peak_flops(device_type: str, configured: float, float8_share: float = 0.0,
                      float8_peak: float = 0.0) -> float | None:
    """The peak FLOP/s of one device that MFU is measured against: `metrics.peak_flops` on an accelerator, blended
    with `metrics.peak_flops_fp8` for the share of the FLOPs that float8 GEMMs make (see `mixed_peak_flops`); None
    on a CPU, whose peak is not what those settings describe, so no MFU is shown or exported there."""
    return None if device_type == "cpu" else mixed_peak_flops(configured, float8_peak, float8_share)


def mixed_peak_flops(peak: float, float8_peak: float, float8_share: float) -> float:
    """The FLOP/s a step reaches when `float8_share` of its FLOPs run at `float8_peak` and the rest at `peak`.

    A float8 run's MFU against the bf16 peak alone would pass 1 before its bf16 part is even busy; against this
    peak, 1 still means every FLOP at its own precision's peak. torchtitan reports float8 MFU against the bf16 peak:
    compare its figures with `mfu` at `float8_share` 0.
    """
    if float8_share <= 0:
        return peak
    return 1.0 / ((1.0 - float8_share) / peak + float8_share / float8_peak)


class LogCallback(BaseCallback):
    """One log line every `every` steps on rank 0: the loop's own console output."""

    def __init__(self, every: int, print_fn=print):
        self.every = every
        self.print = print_fn

    def on_step(self, stats: StepStats) -> None:
        if stats.rank == 0 and (stats.step % self.every == 0 or stats.step == 1):
            mfu = "" if stats.mfu is None else f" | mfu {stats.mfu:.3f}"
            self.print(
                f"step {stats.step:>6} | loss {stats.loss:.4f} | lr {stats.lr:.3e} | grad norm {stats.grad_norm:.3f} "
                f"| {stats.tokens_per_second:,.0f} tok/s{mfu} | {stats.step_seconds * 1e3:.0f} ms",
                flush=True,
            )

    def on_eval(self, stats: EvalStats) -> None:
        if stats.rank == 0:
            parts = [f"val loss {stats.loss:.4f} ({stats.batches} batches)"] if stats.batches else []
            parts += [f"{name} {value:.4f}" for name, value in stats.scores.items()]
            self.print(f"step {stats.step:>6} | " + " | ".join(parts), flush=True)

    def on_checkpoint(self, stats: CheckpointStats) -> None:
        if stats.rank == 0:
            self.print(f"step {stats.step:>6} | checkpoint {stats.path} ({stats.seconds:.2f} s)", flush=True)

    def on_spike(self, stats: SpikeStats) -> None:
        if stats.rank == 0:
            done = {"alert": "alert only", "skip": f"update skipped, data {stats.skipped} skipped",
                    "rewind": f"rewound to step {stats.rewound_to}, data {stats.skipped} skipped"}[stats.action]
            self.print(f"step {stats.step:>6} | loss spike: loss {stats.loss:.4f} (median {stats.loss_median:.4f}, "
                       f"MAD {stats.loss_mad:.4f}), grad norm {stats.grad_norm:.3f} (median "
                       f"{stats.grad_norm_median:.3f}, MAD {stats.grad_norm_mad:.3f}): {done}"
                       + (f" ({stats.note})" if stats.note else ""), flush=True)


class HistoryCallback(BaseCallback):
    """Rank 0 appends every step, evaluation and checkpoint as a JSON line to `path`.

    The run's own record for reports and plots once the exporters are gone; it is appended to, so a resumed run
    continues the same file. It holds one record per step: a run resuming at step N trains the steps after N again,
    so at its start the records after N (and a line torn by the crash) are dropped, and the replayed steps replace them.
    """

    def __init__(self, path: str):
        self.path = path
        self._file = None

    def on_train_start(self, step: int, rank: int) -> None:
        if rank == 0 and os.path.exists(self.path):
            self._keep_until(step)

    def _keep_until(self, step: int) -> None:
        """Rewrite the file with the last record of each (kind, step) up to `step`, through a temporary file renamed
        over it: a crash meanwhile leaves the old file or the new one, never half of one."""
        kept: dict[tuple[str, int], str] = {}
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # the end of a line the crash cut off
                key = (record.get("kind"), record.get("step", 0))
                kept.pop(key, None)
                if key[1] <= step:
                    kept[key] = line.rstrip("\n") + "\n"
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept.values())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _write(self, kind: str, record: object) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._file.write(json.dumps({"kind": kind, **asdict(record)}) + "\n")
        self._file.flush()

    def on_step(self, stats: StepStats) -> None:
        if stats.rank == 0:
            self._write("step", stats)

    def on_eval(self, stats: EvalStats) -> None:
        if stats.rank == 0:
            self._write("eval", stats)

    def on_checkpoint(self, stats: CheckpointStats) -> None:
        if stats.rank == 0:
            self._write("checkpoint", stats)

    def on_spike(self, stats: SpikeStats) -> None:
        if stats.rank == 0:
            self._write("spike", stats)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_history(path: str) -> dict[str, list[dict]]:
    """The records of a history file by kind, one per step (in a file written before replayed steps replaced their
    records, a step trained again after a resume appears twice: its last record wins)."""
    latest: dict[str, dict[int, dict]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                latest.setdefault(record.pop("kind"), {})[record["step"]] = record
    return {kind: [records[s] for s in sorted(records)] for kind, records in latest.items()}
