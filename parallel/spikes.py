"""Loss spikes: found against the recent past, then alerted, skipped or rewound over, as `spikes.action` says.

A step is a spike when its loss or its gradient norm lies more than `spikes.threshold` median absolute deviations
(MADs) above the median of the last `spikes.window` steps, or is not finite. Median and MAD, not mean and standard
deviation, so that the spike itself and the noise of a few odd batches do not move the baseline. The MAD is floored
at 0.1% of the median: a window of near-equal values must not make ordinary noise a spike. Detection starts once
`spikes.min_steps_before_active` steps are trained and the window is full (a resumed attempt refills it first), except
for a non-finite loss or norm, which is a spike from the first step.

What follows a spike:
- alert: the loop's callbacks hear of it (`Callback.on_spike`): a log line, a history.jsonl record, the
  `pretrain_loss_spikes_total{action}` counter. The step's values join the baseline, so a lasting change of level
  stops counting as spikes once the window has seen it.
- skip: the engine is asked before its optimizer step (`Engine.train_step(accept=...)`) and drops the update; the step
  is trained again on the next batch, so a skipped batch costs no step of the schedule and the run ends where one
  that never read that batch (`data.skip` set to the window logged) ends. The ranks agree on the verdict through one
  tiny all-reduce; reading the values there is a host sync before the optimizer step. More than MAX_SKIPS_IN_A_ROW
  skips in a row stop the run: it is the model that diverged. The DeepSpeed engine steps inside DeepSpeed, which
  cannot drop an update once its gradients are reduced: validation refuses skip there.
- rewind: every rank goes back to the newest checkpoint (`parallel.resume.restore`: weights, optimizer, schedule,
  RNG) and the loader skips every position read since it (the loader's position is exact, so nothing else is
  skipped); training goes on from the checkpoint's step. At most `spikes.max_rewinds` times per attempt, and only with
  a checkpoint to go back to: otherwise the spike is alerted, saying why.

Spikes that are skipped or rewound over stay out of the baseline, and so do the steps a rewind undoes.

Tests only: `PRETRAIN_TEST_SPIKE=EPOCH:INDEX:FACTOR[:STEPS]` multiplies the loss of the step read from that loader
position (and of the STEPS - 1 steps read after it in that epoch, when given) by FACTOR. The engine's loss function
is wrapped, so the gradients grow with it; not under pipelining, whose schedule holds its own loss function. A batch
of bad data does the same to a real run.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.errors import UserError
from orchestrator.spec import SpikesConfig
from parallel.callbacks import SpikeStats
from parallel.checkpoint import Checkpointer
from parallel.engine import Engine, StepResult
from parallel.loader import ShardLoader
from parallel.resume import restore

INJECT_VARIABLE = "PRETRAIN_TEST_SPIKE"
MAX_SKIPS_IN_A_ROW = 10  # then it is the model that diverged, not a batch: skipping on would read the data to its end
MAD_FLOOR = 1e-3  # of the median


class SpikeDetector:
    """The baseline of the last `window` steps and the test of a step against it."""

    def __init__(self, config: SpikesConfig):
        self.config = config
        self.steps: deque[int] = deque(maxlen=config.window)
        self.losses: deque[float] = deque(maxlen=config.window)
        self.norms: deque[float] = deque(maxlen=config.window)

    def measure(self, step: int, loss: float, grad_norm: float, rank: int = 0) -> tuple[bool, SpikeStats]:
        """Whether these values at `step` are a spike, and the record of them against the baseline."""
        (loss_median, loss_mad), (norm_median, norm_mad) = _baseline(self.losses), _baseline(self.norms)
        active = step > self.config.min_steps_before_active and len(self.losses) == self.config.window
        limit = self.config.threshold
        found = not (math.isfinite(loss) and math.isfinite(grad_norm)) or (
            active and (loss > loss_median + limit * loss_mad or grad_norm > norm_median + limit * norm_mad))
        return found, SpikeStats(step=step, action=self.config.action, loss=loss, grad_norm=grad_norm,
                                 loss_median=loss_median, loss_mad=loss_mad, grad_norm_median=norm_median,
                                 grad_norm_mad=norm_mad, rank=rank)

    def add(self, step: int, loss: float, grad_norm: float) -> None:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.steps.append(step)
            self.losses.append(loss)
            self.norms.append(grad_norm)

    def forget_after(self, step: int) -> None:
        """Drop the values of steps after `step`: a rewind trains them again, so the baseline is the one a run that
        never saw the skipped data would have."""
        while self.steps and self.steps[-1] > step:
            self.steps.pop()
            self.losses.pop()
            self.norms.pop()


def _baseline(values: deque[float]) -> tuple[float, float]:
    """(median, MAD floored at MAD_FLOOR of the median); NaN for an empty window."""
    if not values:
        return math.nan, math.nan
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values)
    return median, max(mad, MAD_FLOOR * abs(median))


class SpikeGuard:
    """What the training loop calls around each step: `before_step`, the engine's `accept` hook (skip), `check`
    after the step, and `act` on a spike found."""

    def __init__(self, config: SpikesConfig, engine: Engine, rank: int):
        self.config, self.rank, self.device = config, rank, engine.device
        self.enabled = config.action != "none"
        self.detector = SpikeDetector(config)
        self.rewinds = self.skips_in_a_row = 0
        self._step = 0
        self._verdict: SpikeStats | None = None
        self._inject = _Injection.from_env(engine)

    @property
    def accept(self) -> Callable[[torch.Tensor, Any], bool] | None:
        """The engine's hook before its optimizer step, where updates are skipped; None otherwise."""
        return self._accept if self.config.action == "skip" else None

    def before_step(self, step: int, loader: ShardLoader) -> None:
        self._step, self._verdict = step, None
        if self._inject is not None:
            self._inject.arm(loader.last_read, loader.global_batch)

    def _accept(self, loss: torch.Tensor, grad_norm: Any) -> bool:
        self._verdict = self._judge(float(loss), float(grad_norm))
        return self._verdict is None

    def check(self, result: StepResult) -> SpikeStats | None:
        """The spike of the step just trained, if any; every rank gets the same answer where it acts on it."""
        if not self.enabled:
            return None
        if self.config.action == "skip":
            return self._verdict
        return self._judge(float(result.loss), float(result.grad_norm))

    def _judge(self, loss: float, grad_norm: float) -> SpikeStats | None:
        found, record = self.detector.measure(self._step, loss, grad_norm, self.rank)
        if self.config.action != "alert":
            found = _on_any_rank(found, self.device)
        if not found:
            self.skips_in_a_row = 0
        if not found or self.config.action == "alert":
            self.detector.add(self._step, loss, grad_norm)
        return record if found else None

    def act(self, spike: SpikeStats, checkpointer: Checkpointer, engine: Engine, loader: ShardLoader) -> int | None:
        """Carry out `spike.action` (rewriting it where it cannot be done); the step to train on after, or None to
        go on with this one (alert)."""
        if spike.action == "skip":
            self._count_skip(spike)
            epoch, index = loader.last_read
            spike.skipped = format_windows([(epoch, index, index + loader.global_batch)])
            return spike.step - 1
        if spike.action == "rewind":
            return self._rewind(spike, checkpointer, engine, loader)
        return None

    def _count_skip(self, spike: SpikeStats) -> None:
        self.skips_in_a_row += 1
        if self.skips_in_a_row > MAX_SKIPS_IN_A_ROW:
            raise UserError(f"spikes.action=skip: {self.skips_in_a_row} batches in a row were spikes (the last at step "
                            f"{spike.step}: loss {spike.loss:.4g}, grad norm {spike.grad_norm:.4g}): the model itself "
                            "has diverged, not a batch; resume from an earlier checkpoint with a lower optim.lr, or "
                            "use spikes.action=rewind")

    def _rewind(self, spike: SpikeStats, checkpointer: Checkpointer, engine: Engine, loader: ShardLoader) -> int | None:
        if self.rewinds >= self.config.max_rewinds:
            spike.action, spike.note = "alert", f"spikes.max_rewinds={self.config.max_rewinds} rewinds done"
            return None
        checkpointer.wait()
        name = checkpointer.find_resumable()
        if name is None:
            spike.action, spike.note = "alert", f"no checkpoint in {checkpointer.config.dir} to rewind to"
            return None
        read = loader.state_dict()
        resumed = restore(checkpointer, engine, name)
        windows = loader.windows_between(resumed.loader_state, read)
        loader.load_state_dict({**resumed.loader_state, "skip": [*loader.skips, *windows]})
        self.rewinds += 1
        self.detector.forget_after(resumed.step)
        spike.skipped, spike.rewound_to = format_windows(windows), resumed.step
        return resumed.step


def format_windows(windows: list[tuple[int, int, int]]) -> str:
    """Windows in `data.skip`'s form."""
    return ",".join(f"{epoch}:{start}-{end}" for epoch, start, end in windows)


def _on_any_rank(found: bool, device: torch.device) -> bool:
    """Whether any rank found a spike: one tiny all-reduce, so that no rank skips or rewinds alone should a value
    differ in its last bit between ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return found
    flag = torch.tensor([float(found)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


class _Injection:
    """The test hook of `INJECT_VARIABLE`: the engine's loss function scaled for the step read from one position."""

    def __init__(self, engine: Engine, position: tuple[int, int], factor: float, steps: int):
        self.position, self.factor, self.steps, self.scale = position, factor, steps, 1.0
        loss_fn = engine.loss_fn
        engine.loss_fn = lambda logits, targets: loss_fn(logits, targets) * self.scale

    @classmethod
    def from_env(cls, engine: Engine) -> _Injection | None:
        value = os.environ.get(INJECT_VARIABLE, "")
        if not value:
            return None
        epoch, index, factor, *steps = value.split(":")
        return cls(engine, (int(epoch), int(index)), float(factor), int(steps[0]) if steps else 1)

    def arm(self, read_at: tuple[int, int], global_batch: int) -> None:
        (epoch, start), (at_epoch, at) = self.position, read_at
        hit = at_epoch == epoch and start <= at < start + self.steps * global_batch
        self.scale = self.factor if hit else 1.0
