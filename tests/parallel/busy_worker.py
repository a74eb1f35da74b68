"""One rank of a training run in which rank 1 spends `SLOW_S` in a callback after every step (as a rank that writes
extra logs would), recording what the loop reports per step into OUT/rank<R>.json. Started by torchrun from
tests/parallel/test_train.py.

    torchrun --nproc_per_node 2 tests/parallel/busy_worker.py OUT examples/tiny.yaml data.path=... ...
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from orchestrator.validate import load_spec
from parallel.callbacks import BaseCallback, StepStats
from parallel.launch import RankEnv
from parallel.train import run

SLOW_RANK, SLOW_S = 1, 0.3


class SlowRank(BaseCallback):
    def __init__(self, rank: int):
        self.rank = rank

    def on_step(self, stats: StepStats) -> None:
        if self.rank == SLOW_RANK:
            time.sleep(SLOW_S)


class Record(BaseCallback):
    def __init__(self):
        self.steps: list[dict] = []

    def on_step(self, stats: StepStats) -> None:
        self.steps.append({"step": stats.step, "step_seconds": stats.step_seconds, "busy_seconds": stats.busy_seconds})


def main(out: str, spec_path: str, overrides: list[str]) -> None:
    env = RankEnv.from_env()
    record = Record()
    run(load_spec(spec_path, overrides), env, callbacks=[SlowRank(env.rank), record])
    Path(out, f"rank{env.rank}.json").write_text(json.dumps(record.steps))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
