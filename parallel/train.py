"""The training loop: one rank of a run, from a resolved job spec to the last checkpoint.

    torchrun --nproc_per_node 2 -m orchestrator.cli train examples/tiny.yaml        # plain processes
    run(spec, RankEnv(rank=r, world_size=w, ...), callbacks=[heartbeat])            # what the Ray controller calls

Every rank runs the same loop: build the engine (model, parallelism, optimizer) and the loaders, resume from the
newest good checkpoint, then step, evaluate and checkpoint on the spec's cadence, telling each callback. A loss spike
is alerted, skipped or rewound over (`parallel.spikes`: a skipped or rewound step is trained again under its number),
and profiles are taken when asked for (`parallel.profiling`). Nothing here knows which backend runs the step or where
the rank runs.

The loss is read on the host once per step, for the callbacks; on a GPU that sync costs the overlap of one step's
launch with the previous one's tail, well under 1% for steps of 100 ms or more.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from orchestrator.errors import UserError
from orchestrator.spec import JobSpec
from parallel.callbacks import (
    Callback,
    EvalStats,
    HistoryCallback,
    LogCallback,
    StepStats,
    device_peak_flops,
    mfu,
    moe_layer_stats,
)
from parallel.checkpoint import Checkpointer
from parallel.downstream import build_downstream
from parallel.engine import Engine, build_engine
from parallel.float8 import float8_flops_per_token
from parallel.hf import open_init_weights, rope_changes
from parallel.launch import RankEnv, init_distributed, pick_device, shutdown_distributed
from parallel.loader import ShardLoader, build_loaders
from parallel.profiling import ProfileTrigger
from parallel.resume import Resumed, resume
from parallel.spikes import SpikeGuard
from parallel.trackers import tracker_callbacks

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """How one rank's training loop ended; the controller's `RunResult` is the whole job's, over restarts."""

    step: int  # the last step trained
    loss: float  # its loss
    resumed_from: int  # the step resumed after; 0 for a fresh start


def run(spec: JobSpec, env: RankEnv | None = None, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train this rank to `spec.schedule.steps`; every rank of the run calls it with its own `env`."""
    env = env or RankEnv.from_env()
    if spec.model.vocab_size is None:
        raise UserError(f"model.vocab_size: not set and no tokenizer size found in {spec.data.path or 'data.path'}"
                        "/manifest.json; run `pretrain prep` first or set model.vocab_size")
    device = pick_device(spec.resources.device, env.local_rank)
    init_distributed(env, device)
    torch.manual_seed(spec.schedule.seed)
    callbacks = [LogCallback(spec.schedule.log_every), *_history(spec), *tracker_callbacks(spec, env.rank), *callbacks]
    engine = build_engine(spec, env, device)
    train_loader, val_loader = build_loaders(spec, engine.dims.dp_rank, engine.dims.dp)
    checkpointer = Checkpointer(spec, engine.dims)
    try:
        resumed = resume(checkpointer, engine)
        start, rope = 0, []
        if resumed is not None:
            train_loader.load_state_dict(resumed.loader_state)
            start = resumed.step
        elif spec.checkpoint.init_from:
            weights = open_init_weights(spec.checkpoint.init_from, engine.model_dims)
            engine.load_full_state_dict(weights)
            rope = rope_changes(weights.dims, engine.model_dims)
        if env.rank == 0:
            print(_starting_point(spec, resumed, rope), flush=True)
        for callback in callbacks:
            callback.on_train_start(start, env.rank)
        step, loss = _train(spec, env, engine, train_loader, val_loader, checkpointer, callbacks, start)
        checkpointer.wait()
    finally:
        train_loader.close()
        if val_loader is not None:
            val_loader.close()
        for callback in callbacks:
            callback.close()
    shutdown_distributed()
    return TrainResult(step=step, loss=loss, resumed_from=start)


def _train(spec: JobSpec, env: RankEnv, engine: Engine, loader: ShardLoader, val_loader: ShardLoader | None,
           checkpointer: Checkpointer, callbacks: list[Callback], start: int) -> tuple[int, float]:
    s, p = spec.schedule, spec.parallel
    tokens_per_step = p.micro_batch_size * p.grad_accum * engine.dims.dp * spec.data.seq_len
    flops_per_token = engine.model_dims.flops_per_token(spec.data.seq_len)
    float8_share = float8_flops_per_token(engine.model_dims) / flops_per_token if p.float8 != "none" else 0.0
    peak = device_peak_flops(engine.device.type, spec.metrics.peak_flops, float8_share, spec.metrics.peak_flops_fp8)
    d = engine.dims  # a mixture of experts' routing is reported by the first rank of each pipeline stage
    reports_moe = engine.model_dims.moe is not None and d.rank == d.rank_of(d.pp_rank, 0, 0)
    guard, profiles = SpikeGuard(spec.spikes, engine, env.rank), ProfileTrigger(spec, env.rank, engine.device)
    downstream = build_downstream(spec, engine)
    step, loss = start, float("nan")
    last_end = time.perf_counter()
    while step < s.steps:
        step += 1
        begin = time.perf_counter()
        batch = loader.next_step()
        guard.before_step(step, loader)
        arrived = time.perf_counter()
        # The ranks line up here, so that a rank's own lag since its last step (its data, callbacks, evaluation,
        # checkpoint writes) is told apart from the others' waiting for it; inside the step the collectives make
        # every rank take as long as the slowest. One tiny collective, while the device is idle (the loss was read),
        # which also carries a profile request (`parallel.profiling`).
        profiles.sync(step)
        released = time.perf_counter()
        result = engine.train_step(batch, accept=guard.accept)
        loss = float(result.loss)  # waits for the step to finish, so the time below is the step's
        end = time.perf_counter()
        seconds, busy, last_end = end - begin, (arrived - last_end) + (end - released), end
        spike = guard.check(result)
        if spike is not None:
            again_after = guard.act(spike, checkpointer, engine, loader)
            for callback in callbacks:
                callback.on_spike(spike)
            if again_after is not None:  # the update was skipped or rewound over: train on after that step
                step = again_after
                continue
        rate = tokens_per_step / seconds
        stats = StepStats(
            step=step, loss=loss, lr=result.lr, grad_norm=float(result.grad_norm), tokens=tokens_per_step,
            step_seconds=seconds, tokens_per_second=rate, busy_seconds=busy,
            mfu=None if peak is None else mfu(flops_per_token, rate, env.world_size, peak),
            memory_allocated_bytes=_memory("memory_allocated", engine.device),
            memory_peak_bytes=_memory("max_memory_allocated", engine.device),
            total_tokens=step * tokens_per_step, rank=env.rank, world_size=env.world_size,
            moe=moe_layer_stats(engine.model) if reports_moe else [],
        )
        for callback in callbacks:
            callback.on_step(stats)
        held_out = val_loader is not None and s.eval_every and (step % s.eval_every == 0 or step == s.steps)
        tasks = downstream is not None and downstream.due(step)
        if held_out or tasks:
            evaluation = evaluate(engine, val_loader, s.eval_batches, step, env.rank) if held_out \
                else EvalStats(step=step, loss=float("nan"), batches=0, seconds=0.0, rank=env.rank)
            if tasks:
                downstream.score_into(evaluation)
            for callback in callbacks:
                callback.on_eval(evaluation)
        if step == s.steps or (spec.checkpoint.every and step % spec.checkpoint.every == 0):
            saved = checkpointer.save(step, engine, loader.state_dict())
            for callback in callbacks:
                callback.on_checkpoint(saved)
        profiles.after_step(step)
    profiles.close()
    return step, loss


def evaluate(engine: Engine, loader: ShardLoader, batches: int, step: int, rank: int) -> EvalStats:
    """Mean loss over the first `batches` global batches of the held-out split: the same ones at every evaluation."""
    begin = time.perf_counter()
    loader.rewind()
    losses = [engine.eval_loss(loader.next_step()) for _ in range(batches)]
    loss = float(torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in losses]).mean())
    return EvalStats(step=step, loss=loss, batches=batches, seconds=time.perf_counter() - begin, rank=rank)


def _starting_point(spec: JobSpec, resumed: Resumed | None, rope: list[str]) -> str:
    """The log line of where this attempt starts: the checkpoint and data position it resumed from, or why none;
    `rope`: the RoPE settings the run changes from the weights it starts from (`parallel.hf.rope_changes`)."""
    c = spec.checkpoint
    if resumed is None:
        weights = f"the weights of {c.init_from}" if c.init_from else "fresh weights"
        if rope:
            weights += f", RoPE as the job spec sets it ({'; '.join(rope)})"
        why = f"no checkpoint in {c.dir}" if c.resume else "checkpoint.resume=false"
        return f"starting at step 0 with {weights} ({why})"
    data = resumed.loader_state
    rows = f" of {data['rows']}" if "rows" in data else ""
    return (f"resumed from checkpoint {resumed.path} (step {resumed.step}); data position: epoch {data['epoch']}, "
            f"sample {data['index']}{rows}, seed {data['seed']}")


def _history(spec: JobSpec) -> list[Callback]:
    """A history.jsonl beside the checkpoints, where they are on a local or mounted filesystem."""
    if "://" in spec.checkpoint.dir:
        return []
    return [HistoryCallback(os.path.join(spec.checkpoint.dir, "history.jsonl"))]


def _memory(what: str, device: torch.device) -> int:
    return getattr(torch.cuda, what)(device) if device.type == "cuda" else 0
