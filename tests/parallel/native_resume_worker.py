"""One rank of a native-backend run that saves or resumes a DCP checkpoint (tests/parallel/test_native_checkpoint.py).

    torchrun --nproc_per_node 2 tests/parallel/native_resume_worker.py save OUT.pt CKPT [overrides]
    torchrun --nproc_per_node 4 tests/parallel/native_resume_worker.py load OUT.pt CKPT parallel.pp=2 ...

save: trains all steps of layout_worker's fixed data, writing a checkpoint after step SAVE_AT (in the background,
while training goes on); load: restores that checkpoint into this layout and trains the steps after it. Rank 0 writes
the losses of the steps it ran, the checkpoint's client state and the final gathered parameters.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from layout_worker import GLOBAL_BATCH, GRAD_ACCUM, TINY, fixed_tokens, rank_micro_batches

from orchestrator.validate import parse_spec
from parallel.engine import build_engine
from parallel.launch import RankEnv

SAVE_AT = 5


def main(mode: str, out: str, ckpt: str, overrides: list[str]) -> None:
    env = RankEnv.from_env()
    spec = parse_spec(TINY, overrides=["parallel.backend=native", f"parallel.grad_accum={GRAD_ACCUM}", *overrides,
                                       f"resources.gpus_per_node={env.world_size}"])
    dp = env.world_size // (spec.parallel.cp * spec.parallel.pp * spec.parallel.tp)
    spec.parallel.micro_batch_size = GLOBAL_BATCH // (GRAD_ACCUM * dp)
    dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size,
                            init_method=f"tcp://{env.master_addr}:{env.master_port}")
    engine = build_engine(spec, env, torch.device("cpu"))
    tokens = fixed_tokens(spec.schedule.steps, spec.data.seq_len, spec.model.vocab_size)
    start, client_state = 0, None
    if mode == "load":
        client_state = engine.load(ckpt)
        start = client_state["step"]
    losses = {}
    for step in range(start, spec.schedule.steps):
        losses[step] = float(engine.train_step(rank_micro_batches(tokens[step], engine.dims.dp_rank,
                                                                  engine.dims.dp)).loss)
        if mode == "save" and step + 1 == SAVE_AT:
            engine.save(ckpt, {"step": SAVE_AT})
    engine.wait_saved()
    params = engine.full_state_dict()
    if env.rank == 0:
        torch.save({"losses": losses, "client_state": client_state, "params": params, "lr": engine.lr}, out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
