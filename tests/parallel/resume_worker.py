"""One rank of a small real training run for the resume tests (started by torchrun).

    python -m torch.distributed.run --nproc_per_node 2 tests/parallel/resume_worker.py job.yaml OUT [overrides]
        [--kill-at STEP] [--kill-while-saving STEP]

Trains with the DeepSpeed engine, `ShardLoader` and `Checkpointer`, resuming from the newest good checkpoint, and
writes OUT/rank_<r>.json (per-step loss and the sample ids this rank read) and OUT/params.pt (all weights, rank 0).
--kill-at: after checkpoint STEP is committed, every rank SIGKILLs itself. --kill-while-saving: every rank SIGKILLs
itself after writing the first file of checkpoint STEP, leaving it unfinished.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

import parallel.checkpoint as checkpoint
from orchestrator.validate import load_spec
from parallel.checkpoint import Checkpointer
from parallel.engine import build_engine
from parallel.launch import RankEnv, init_distributed, join_store, pick_device
from parallel.loader import ShardLoader
from parallel.resume import resume


def kill_after_first_file_of(step: int) -> None:
    """SIGKILL this rank right after its first file of checkpoint `step` is on disk."""
    save = torch.save

    def save_then_die(obj, path, *args, **kwargs):
        save(obj, path, *args, **kwargs)
        if f"step_{step}.partial" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.torch.save = save_then_die


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("out")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--kill-while-saving", type=int, default=0)
    args = parser.parse_args()
    env = join_store(RankEnv.from_env())  # the group's store is the launching test's
    spec = load_spec(args.spec, args.overrides)
    device = pick_device("cpu")
    init_distributed(env, device)
    torch.manual_seed(spec.schedule.seed)
    engine = build_engine(spec, env, device)
    dims, p = engine.dims, spec.parallel
    loader = ShardLoader(spec.data.path, seq_len=spec.data.seq_len, micro_batch_size=p.micro_batch_size,
                         grad_accum=p.grad_accum, dp_rank=dims.dp_rank, dp_size=dims.dp, seed=spec.data.seed,
                         prefetch=spec.data.prefetch)
    ckpt = Checkpointer(spec, dims)
    resumed = resume(ckpt, engine)
    start = 0
    if resumed is not None:
        loader.load_state_dict(resumed.loader_state)
        start = resumed.step
    record = {"rank": env.rank, "dp_rank": dims.dp_rank, "start": start, "losses": {}, "ids": {},
              "converted": bool(resumed and resumed.converted)}
    for step in range(start + 1, spec.schedule.steps + 1):
        batches = loader.next_step()
        result = engine.train_step(batches)
        record["losses"][step] = float(result.loss)
        record["ids"][step] = [int(i) for mb in batches for i in mb.sample_ids]
        if step % spec.checkpoint.every == 0:
            if step == args.kill_while_saving:
                kill_after_first_file_of(step)
            ckpt.save(step, engine, loader.state_dict())
            if step == args.kill_at:
                ckpt.wait()
                dist.barrier()
                os.kill(os.getpid(), signal.SIGKILL)
    ckpt.wait()
    loader.close()
    params = engine.full_state_dict()
    os.makedirs(args.out, exist_ok=True)
    if env.rank == 0:
        torch.save(params, os.path.join(args.out, "params.pt"))
    with open(os.path.join(args.out, f"rank_{env.rank}.json"), "w") as f:
        json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
