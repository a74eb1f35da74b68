"""Peak GPU memory of real training steps next to the planner's estimate, layout by layout.

    python benchmarks/gpu_memory.py                 # every layout the visible GPUs allow (1 or 2 H100s)
    python benchmarks/gpu_memory.py 1b-zero3-dp2    # some of them

Each layout runs in its own `torchrun` (NCCL, no Ray): the real engine (`parallel.engine.build_engine`) trains a
~1B Llama for a few bf16 steps on random tokens, and every rank reports `torch.cuda.max_memory_allocated` (tensors,
what the planner's `allocated` predicts) and the memory held after the engine is built (model states before the
first step). Rank 0 prints one line per layout:

    layout  GPUs  measured GiB (fullest rank)  estimate GiB  error %  static GiB  estimated states GiB

and one JSON line per layout (prefix `RESULT `) for the record. The planner is within its target where |error| ≤ 15%.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = {"vocab_size": 50304, "dim": 2048, "n_layers": 16, "n_heads": 16, "n_kv_heads": 8, "multiple_of": 256}
BASE = {
    "model": MODEL,
    "data": {"seq_len": 2048},
    "parallel": {"precision": "bf16", "micro_batch_size": 4, "grad_accum": 1, "compile": False},
    "schedule": {"steps": 3, "warmup_steps": 1},
    "resources": {"device": "cuda"},
}
STEPS = 3
LAYOUT_TIMEOUT_S = 300

# name → (GPUs, spec overrides)
LAYOUTS = {
    "1b-zero1-dp1": (1, ["parallel.zero_stage=1"]),
    "1b-zero1-ckpt-dp1": (1, ["parallel.zero_stage=1", "parallel.activation_checkpointing=full",
                              "parallel.micro_batch_size=8"]),
    "1b-zero1-dp2": (2, ["parallel.zero_stage=1"]),
    "1b-zero2-dp2": (2, ["parallel.zero_stage=2"]),
    "1b-zero3-dp2": (2, ["parallel.zero_stage=3"]),
    "1b-tp2-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=1"]),
    "1b-pp2": (2, ["parallel.pp=2", "parallel.zero_stage=1", "parallel.micro_batch_size=2", "parallel.grad_accum=4"]),
    # LoRA (rank 16 on every projection): frozen weights, adapters' gradients and moments only
    "1b-lora16-dp1": (1, ["parallel.zero_stage=1", "model.lora.rank=16"]),
    "1b-lora16-zero3-dp2": (2, ["parallel.zero_stage=3", "model.lora.rank=16"]),
    "1b-lora16-tp2": (2, ["parallel.tp=2", "parallel.zero_stage=1", "model.lora.rank=16"]),
}


def build_spec(overrides: list[str], world: int):
    from orchestrator.validate import parse_spec

    return parse_spec(BASE, overrides=[*overrides, f"resources.gpus_per_node={world}"])


def worker(name: str) -> None:
    """One rank: build the engine, train STEPS steps, report memory."""
    import torch
    import torch.distributed as dist

    from parallel.engine import build_engine
    from parallel.launch import RankEnv, init_distributed, pick_device, shutdown_distributed
    from parallel.loader import MicroBatch

    env = RankEnv.from_env()
    spec = build_spec(LAYOUTS[name][1], env.world_size)
    device = pick_device("cuda", env.local_rank)
    init_distributed(env, device)
    engine = build_engine(spec, env, device)
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    p = spec.parallel
    generator = torch.Generator().manual_seed(env.rank)
    for _ in range(STEPS):
        batches = []
        for _ in range(p.grad_accum):
            rows = torch.randint(0, spec.model.vocab_size, (p.micro_batch_size, spec.data.seq_len + 1),
                                 generator=generator)
            batches.append(MicroBatch(inputs=rows[:, :-1], targets=rows[:, 1:], sample_ids=torch.arange(len(rows))))
        float(engine.train_step(batches).loss)
    torch.cuda.synchronize()
    mine = torch.tensor([torch.cuda.max_memory_allocated(), static], dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(env.world_size)]
    dist.all_gather(every, mine)
    if env.rank == 0:
        peaks = [int(t[0]) for t in every]
        statics = [int(t[1]) for t in every]
        print("RANKS " + json.dumps({"name": name, "peaks": peaks, "statics": statics}), flush=True)
    shutdown_distributed()
    sys.stdout.flush()
    os._exit(0)  # DeepSpeed ZeRO-3 can abort in interpreter teardown after finishing


def run_layout(name: str) -> dict | None:
    from orchestrator.planner.memory import GiB, estimate_memory

    gpus, overrides = LAYOUTS[name]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", __file__,
           "--worker", name]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "4"}
    # A session of its own, so a layout that hangs is stopped with every rank torchrun started.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=LAYOUT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        print(f"{name}: no result within {LAYOUT_TIMEOUT_S} s", flush=True)
        return None
    line = next((x for x in stdout.splitlines() if x.startswith("RANKS ")), None)
    if proc.returncode != 0 or line is None:
        print(f"{name}: FAILED (exit {proc.returncode})\n{stdout[-2000:]}\n{stderr[-4000:]}", flush=True)
        return None
    ranks = json.loads(line[len("RANKS "):])
    estimate = estimate_memory(build_spec(overrides, gpus))
    measured = max(ranks["peaks"])
    states = estimate.weights + estimate.gradients + estimate.optimizer
    record = {
        "layout": name, "gpus": gpus, "measured_gib": measured / GiB, "estimate_gib": estimate.allocated / GiB,
        "error_pct": 100 * (estimate.allocated - measured) / measured, "static_gib": max(ranks["statics"]) / GiB,
        "estimated_states_gib": states / GiB, "breakdown_gib": {k: v / GiB for k, v in estimate.rows()},
        "peaks_gib": [x / GiB for x in ranks["peaks"]],
    }
    print(f"{name:<20}{gpus:>5}{record['measured_gib']:>14.2f}{record['estimate_gib']:>14.2f}"
          f"{record['error_pct']:>+10.1f}{record['static_gib']:>12.2f}{record['estimated_states_gib']:>14.2f}",
          flush=True)
    print("RESULT " + json.dumps(record), flush=True)
    return record


def main(names: list[str]) -> int:
    import torch

    visible = torch.cuda.device_count()
    chosen = names or [n for n, (gpus, _) in LAYOUTS.items() if gpus <= visible]
    unknown = [n for n in chosen if n not in LAYOUTS]
    if unknown or not chosen:
        print(f"unknown layouts {unknown} or no GPU; layouts: {', '.join(LAYOUTS)}", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name(0) if visible else 'no GPU'} × {visible}; "
          f"{STEPS} bf16 steps per layout, model {MODEL}")
    print(f"{'layout':<20}{'GPUs':>5}{'measured GiB':>14}{'estimate GiB':>14}{'error %':>10}{'static GiB':>12}"
          f"{'est. states':>14}")
    records = [r for r in (run_layout(n) for n in chosen) if r is not None]
    within = sum(abs(r["error_pct"]) <= 15 for r in records)
    print(f"{within} of {len(records)} layouts within ±15% ({len(chosen) - len(records)} failed to run)")
    return 0 if records else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        sys.exit(main(sys.argv[1:]))
