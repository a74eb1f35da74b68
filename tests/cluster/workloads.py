"""Small real training-loop stand-ins for controller tests: gloo collectives over the real rank wiring.

They follow `parallel.train.run`'s contract (spec, RankEnv, callbacks) but cost a fraction of a second per step,
so the controller's restart, hang and straggler paths are tested without building a model.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from parallel.callbacks import StepStats
from parallel.launch import init_distributed

STEP_S = 0.2


def allreduce_steps(spec, env, callbacks=()):
    """`spec.schedule.steps` steps of an all-reduce of the rank ids; the 'loss' is the reduced sum.

    `PRETRAIN_TEST_SLOW_RANK=R` gives rank R three times the work per step (a straggler). The busy time reported is
    the work asked for, not the sleep's measured length, which a loaded machine stretches at random.
    """
    init_distributed(env, torch.device("cpu"), timeout_s=60)
    compute = STEP_S * (3 if os.environ.get("PRETRAIN_TEST_SLOW_RANK") == str(env.rank) else 1)
    for step in range(1, spec.schedule.steps + 1):
        start = time.monotonic()
        time.sleep(compute)
        value = torch.tensor([float(env.rank + step)])
        dist.all_reduce(value)
        stats = StepStats(step=step, loss=float(value), lr=0.0, grad_norm=0.0, tokens=0,
                          step_seconds=time.monotonic() - start, tokens_per_second=0.0, mfu=0.0, rank=env.rank,
                          world_size=env.world_size, busy_seconds=compute)
        for callback in callbacks:
            callback.on_step(stats)
    dist.destroy_process_group()
