"""One rank of a layout run for the equivalence tests: fixed tokens, N steps, per-step losses and the final gathered
parameters written by rank 0. Started by torchrun from tests/helpers.py (run_layout).

    torchrun --nproc_per_node 4 tests/parallel/layout_worker.py OUT.pt parallel.pp=2 parallel.tp=2 ...

With `--cases CASES.json` ({name: [override, ...]}) one launch runs each case in turn on the same process group and
writes {name: result}: many small layouts for one start-up. A case that raises on any rank ends the launch, its
traceback in OUT.error (its peers would otherwise wait in a collective for the group's timeout).
A case may also be {"overrides": [...], "save": DIR, "save_at": N} (a native checkpoint written after step N) or
{"overrides": [...], "load": DIR} (resumed from it, training the steps after it): resume and reshard in the same
launch.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from orchestrator.validate import parse_spec
from parallel.documents import document_ids
from parallel.engine import build_engine
from parallel.launch import RankEnv, init_distributed, shutdown_distributed
from parallel.loader import MicroBatch

TINY = {
    "model": {"vocab_size": 128, "dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32},
    "data": {"seq_len": 32},
    "parallel": {"backend": "deepspeed", "precision": "fp32", "zero_stage": 0},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "weight_decay": 0.1, "grad_clip": 0.5, "eps": 1e-6},
    "schedule": {"steps": 10, "warmup_steps": 2, "lr_schedule": "cosine", "seed": 7},
    "resources": {"device": "cpu", "gpus_per_node": 1},
}
GLOBAL_BATCH = 8
GRAD_ACCUM = 2
EOS = 0  # the end-of-document token of specs with model.attention_mask=document


def fixed_tokens(steps: int, seq_len: int, vocab: int) -> torch.Tensor:
    """[steps, GLOBAL_BATCH, seq_len + 1] tokens, the same for every layout and the reference: arithmetic runs
    (random start and stride) mod vocab, learnable in a few steps so the losses move."""
    g = torch.Generator().manual_seed(11)
    start = torch.randint(0, vocab, (steps, GLOBAL_BATCH, 1), generator=g)
    stride = torch.randint(1, 5, (steps, GLOBAL_BATCH, 1), generator=g)
    return (start + stride * torch.arange(seq_len + 1)) % vocab


def spec_tokens(spec) -> torch.Tensor:
    """`fixed_tokens` of the spec; under document masking cut into documents: EOS at two drawn positions per row
    (the runs' own values moved off EOS)."""
    tokens = fixed_tokens(spec.schedule.steps, spec.data.seq_len, spec.model.vocab_size)
    if spec.model.attention_mask != "document":
        return tokens
    ends = torch.randint(2, spec.data.seq_len - 1, (*tokens.shape[:-1], 2), generator=torch.Generator().manual_seed(13))
    return tokens.masked_fill(tokens == EOS, EOS + 1).scatter(-1, ends, EOS)


def row_documents(rows: torch.Tensor, spec) -> torch.Tensor | None:
    """Document ids of rows' inputs (the loader's derivation) when the spec masks per document, else None."""
    return document_ids(rows[:, :-1], EOS) if spec.model.attention_mask == "document" else None


def rank_micro_batches(rows: torch.Tensor, dp_rank: int, dp: int, spec=None) -> list[MicroBatch]:
    """This rank's contiguous slice of a global batch cut into GRAD_ACCUM micro-batches (the loader's convention)."""
    mine = rows.chunk(dp)[dp_rank]
    return [MicroBatch(inputs=mb[:, :-1], targets=mb[:, 1:], sample_ids=torch.arange(len(mb)),
                       documents=None if spec is None else row_documents(mb, spec))
            for mb in mine.chunk(GRAD_ACCUM)]


def run_case(env: RankEnv, device: torch.device, overrides: list[str], save: str = "", save_at: int = 0,
             load: str = "") -> dict:
    """Train one spec for its steps (from a checkpoint's step when `load` names one; writing one after step
    `save_at` into `save` if named); the losses, gradient norms, learning rates of the steps run, eval loss and full
    parameters."""
    spec = parse_spec(TINY, overrides=[*overrides, f"resources.gpus_per_node={env.world_size}"])
    dp = env.world_size // (spec.parallel.cp * spec.parallel.pp * spec.parallel.tp)
    spec.parallel.micro_batch_size = GLOBAL_BATCH // (GRAD_ACCUM * dp)
    spec.parallel.grad_accum = GRAD_ACCUM
    engine = build_engine(spec, env, device)
    tokens = spec_tokens(spec)
    losses, norms, lrs = [], [], []
    start = engine.load(load)["step"] if load else 0
    for step in range(start, spec.schedule.steps):
        result = engine.train_step(rank_micro_batches(tokens[step], engine.dims.dp_rank, engine.dims.dp, spec))
        losses.append(float(result.loss))
        norms.append(float(result.grad_norm))
        lrs.append(result.lr)
        if save and step + 1 == save_at:
            engine.save(save, {"step": save_at})
    engine.wait_saved()
    eval_loss = float(engine.eval_loss(rank_micro_batches(tokens[0], engine.dims.dp_rank, engine.dims.dp, spec)))
    return {"losses": losses, "grad_norms": norms, "lrs": lrs, "eval_loss": eval_loss,
            "params": engine.full_state_dict()}


def main(out: str, args: list[str],
         run: Callable[..., dict] = run_case) -> None:
    """Run each case (or the one spec of `args`) with `run`; rank 0 saves the results to `out`."""
    env = RankEnv.from_env()
    device = torch.device("cpu")
    init_distributed(env, device)
    if args[:1] == ["--cases"]:
        results = {}
        for name, case in json.loads(Path(args[1]).read_text()).items():
            try:
                results[name] = run(env, device, case) if isinstance(case, list) else run(env, device, **case)
            except Exception:  # noqa: BLE001 - written for the tests, then the launch ends: torchrun stops the peers
                # The first rank's failure is the cause; the peers' that follow are lost connections.
                with contextlib.suppress(FileExistsError), open(f"{out}.error", "x") as failed:
                    failed.write(f"case {name!r} failed on rank {env.rank}:\n{traceback.format_exc()}")
                os._exit(1)
            gc.collect()
    else:
        results = run(env, device, args)
    if env.rank == 0:
        torch.save(results, out)
    shutdown_distributed()
    sys.stdout.flush()
    # ZeRO-3 can abort in interpreter teardown after finishing (ENV-NOTES); the results are already written.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
