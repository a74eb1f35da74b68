"""One rank for test_plan_memory: a real DeepSpeed engine takes a bf16 step on CPU, then rank 0 writes the bytes of
every tensor still alive (the model states the engine keeps between steps) as JSON.

    torchrun --nproc_per_node 2 tests/orchestrator/memory_probe.py OUT.json ZERO_STAGE
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch

from orchestrator.validate import parse_spec
from parallel.engine import build_engine
from parallel.launch import RankEnv, init_distributed, shutdown_distributed
from parallel.loader import MicroBatch

SPEC = {
    "model": {"vocab_size": 4096, "dim": 256, "n_layers": 4, "n_heads": 4, "multiple_of": 64},
    "data": {"seq_len": 64},
    "parallel": {"backend": "deepspeed", "precision": "bf16", "micro_batch_size": 2},
    "resources": {"device": "cpu"},
}


def live_tensor_bytes() -> int:
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def main(out: str, zero: int) -> None:
    env = RankEnv.from_env()
    spec = parse_spec(SPEC, overrides=[f"parallel.zero_stage={zero}", f"resources.gpus_per_node={env.world_size}"])
    init_distributed(env, torch.device("cpu"))
    engine = build_engine(spec, env, torch.device("cpu"))
    rows = torch.randint(0, 4096, (2, 65), generator=torch.Generator().manual_seed(env.rank))
    engine.train_step([MicroBatch(inputs=rows[:, :-1], targets=rows[:, 1:], sample_ids=torch.arange(2))])
    live = live_tensor_bytes()
    if env.rank == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"live_bytes": live}, f)
    shutdown_distributed()
    sys.stdout.flush()
    os._exit(0)  # ZeRO-3 can abort in interpreter teardown after finishing


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
